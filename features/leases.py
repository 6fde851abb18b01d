"""Run leases: which runs are writing to a store right now, so vacuum leaves their files alone.

A run writes Parquet files under its tables before it commits them (named
``part-<run_id>-...``); until the commit, nothing in the Delta log refers to
them, and a vacuum would see orphans. So a run holds a lease,
``<store>/_leases/<run_id>.json``, rewritten every ``HEARTBEAT_S`` by a
background thread; ``vacuum`` never deletes the files of a run whose lease is
fresher than ``EXPIRY_S``. A killed run stops beating: once its lease expires
its uncommitted files are orphans that vacuum may remove.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pyarrow.fs as pafs

from features.storage import filesystem_for, join_uri
from features.tables import TableStore

LEASE_DIR = "_leases"
HEARTBEAT_S = 30.0
EXPIRY_S = 600.0  # ten missed beats: the run is dead


class Lease:
    """``with Lease(store, run_id):`` marks the run alive for as long as the block runs."""

    def __init__(self, store: TableStore, run_id: str, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.fs, root = filesystem_for(join_uri(store.uri, LEASE_DIR), store.storage_options)
        self.path = f"{root}/{run_id}.json"
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, daemon=True)

    def __enter__(self) -> Lease:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.fs.delete_file(self.path)

    def _beat(self) -> None:
        beat = {"run_id": self.run_id, "beat": datetime.now(UTC).isoformat()}
        with self.fs.open_output_stream(self.path) as out:
            out.write(json.dumps(beat).encode())

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._beat()


def live_runs(store: TableStore, *, expiry_s: float = EXPIRY_S) -> set[str]:
    """Ids of the runs whose lease beat within ``expiry_s`` (unreadable leases count as live)."""
    fs, root = filesystem_for(join_uri(store.uri, LEASE_DIR), store.storage_options)
    now = datetime.now(UTC)
    live = set()
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        run_id = info.base_name.removesuffix(".json")
        try:
            with fs.open_input_stream(info.path) as f:
                beat = datetime.fromisoformat(json.loads(f.read())["beat"])
        except (OSError, ValueError, KeyError):
            live.add(run_id)  # being written, or damaged: err on the side of keeping files
            continue
        if (now - beat).total_seconds() < expiry_s:
            live.add(run_id)
    return live


def written_by(path: str, runs: set[str]) -> bool:
    """True when ``path`` is a data file one of ``runs`` wrote (``part-<run_id>-...``)."""
    name = path.rsplit("/", 1)[-1]
    return any(name.startswith(f"part-{run}-") for run in runs)
