"""Fault injection: SIGKILL real mmfp processes at random moments, race writers, and check
that every store converges to what one clean build makes, with no row lost or duplicated.

    python benchmarks/faults.py [--trials 40] [--samples 60] [--seed 0] [--json OUT]

Scenarios (each trial in fresh temporary stores, each command a real ``python -m jobs``
process in its own process group, killed with SIGKILL):

- ``build`` / ``refresh`` / ``encode`` / ``train``: the command is killed after a random
  delay drawn from 0 .. its clean duration, then run again to completion (half the
  ``train`` trials kill one Ray Train worker instead of the whole run);
- ``worker``: a Ray worker process (not the driver) is killed inside the build's Ray
  Data job; the same command is then run again (it may have finished on its own);
- ``filter``: ``mmfp filter`` with new quality thresholds (moving kept samples out,
  reading refused inputs back in, relabelling others) killed on a store built with the
  old ones, then run again; the reference is a fresh build with the new thresholds;
- ``race``: four refreshes at once (two with ``on_removed: delete``, two ``keep``), or
  a refresh against ``store optimize`` or ``store vacuum --force --retention-hours 0``;
  then one more refresh.

After every trial the store opens, and ``samples``, ``views``, the feature set and
``quarantine`` hold exactly the keys a clean build of the same inputs holds: a key
missing is a row lost, a key twice a row duplicated. Every committed row's ``run_id``
must have a ``_runs`` row. The report prints a table per scenario; ``--json`` writes it
after every trial.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from jobs.demo import corpus  # noqa: E402

# what identifies a row; quarantine rows by input (relative to the trial's own folder)
KEYS = {
    "samples": ["sample_id"],
    "views": ["sample_id", "view"],
    "features/inputs": ["sample_id", "view"],
}
KEYS["quarantine"] = ["uri", "stage", "error_type"]
SCENARIOS = ("build", "refresh", "encode", "worker", "filter", "race", "train")
# the filter scenario: a store built with the first, then `mmfp filter` with the second, which
# moves some kept samples out and lets some refused inputs back in
QUALITY = (
    {"filters": [{"stat": "image_blur", "min": 1200}]},
    {"filters": [{"stat": "image_blur", "min": 700}, {"stat": "image_brightness", "max": 0.3}]},
)


@dataclass
class Trial:
    scenario: str
    detail: str
    converged: bool
    lost: int = 0
    duplicated: int = 0
    untraced: int = 0  # committed rows whose run_id has no _runs row
    error: str = ""


@dataclass
class Report:
    trials: list[Trial] = field(default_factory=list)

    def table(self) -> list[dict[str, object]]:
        rows = []
        for scenario in SCENARIOS:
            mine = [t for t in self.trials if t.scenario == scenario]
            if mine:
                rows.append(
                    {
                        "scenario": scenario,
                        "trials": len(mine),
                        # the kill landed while the command ran (not finished first / no busy
                        # worker at that moment)
                        "killed": sum(t.detail.startswith(("driver ", "worker ")) for t in mine),
                        "converged": sum(t.converged for t in mine),
                        "rows lost": sum(t.lost for t in mine),
                        "rows duplicated": sum(t.duplicated for t in mine),
                        "untraced rows": sum(t.untraced for t in mine),
                    }
                )
        return rows

    def save(self, path: Path) -> None:
        trials = [asdict(t) for t in self.trials]
        path.write_text(json.dumps({"table": self.table(), "trials": trials}, indent=1))


# ---- the corpus, its spec and the commands ------------------------------------------------


def write_spec(
    root: Path, store: Path, *, delete: bool = False, quality: int | None = None
) -> Path:
    """A spec over ``root/data``: labels, one augmented view, a weight-free feature set,
    and ``QUALITY[quality]`` when given."""
    spec = {
        "name": "faults",
        "sources": [{"kind": "directory", "uri": str(root / "data"), "class_folders": True}],
        "augment": {"views_per_sample": 1, "seed": 0, "audio": None},
        "encode": {
            "feature_sets": [
                {
                    "name": "inputs",
                    "encoders": [
                        {"name": "image_pixels", "params": {"size": 16}},
                        {"name": "audio_logmel", "params": {"n_mels": 16, "frames": 20}},
                    ],
                }
            ]
        },  # fmt: skip
        "refresh": {"on_removed": "delete" if delete else "keep"},
        "store": {"uri": str(store)},
    }
    if quality is not None:
        spec["quality"] = QUALITY[quality]
    name = f"{store.name}-{'delete' if delete else 'keep'}" + (
        f"-quality{quality}" if quality is not None else ""
    )
    path = store.parent / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    return path


def write_inputs(data: Path, samples: int, seed: int) -> None:
    corpus.write_directory_source(data, n_per_class=max(1, samples // 10), seed=seed)
    (data / "broken").mkdir(exist_ok=True)
    (data / "broken" / f"bad{seed}.jpg").write_bytes(b"not an image %d" % seed)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs", *args]


@dataclass
class Ran:
    seconds: float
    killed: str = ""  # "driver", "worker", "no busy worker" or "finished first"


def run(args: list[str], *, kill_after: float | None = None, kill: str = "driver") -> Ran:
    """Run a command in its own process group; SIGKILL it (or one Ray worker) after
    ``kill_after`` seconds. Returns the seconds it ran and what was killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    killed = ""
    if kill_after is not None:
        killed = "finished first"
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            if kill == "driver":
                _kill_tree(proc.pid)
                killed = "driver"
            else:
                killed = "worker" if _kill_one_worker(proc.pid) else "no busy worker"
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    seconds = time.perf_counter() - start
    if kill_after is None and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[2:])} failed ({proc.returncode}): {err[-2000:]}")
    _kill_tree(proc.pid)  # Ray processes that outlive a killed driver
    return Ran(seconds, killed)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    for target in [pid, *_children(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)


def _kill_one_worker(pid: int) -> bool:
    """SIGKILL one busy Ray worker process (a task or actor) under ``pid``, not the driver;
    False when none was busy at that moment."""
    workers = []
    for child in _children(pid):
        try:
            name = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if name.startswith(b"ray::") and b"IDLE" not in name:
            workers.append(child)
    if workers:
        os.kill(random.choice(workers), signal.SIGKILL)
    return bool(workers)


# ---- what a store holds ---------------------------------------------------------------------


def keys(store: Path) -> dict[str, Counter]:
    """For each checked table: how many rows each key has."""
    from features.store import FeatureStore

    fs = FeatureStore(str(store))
    out: dict[str, Counter] = {}
    for table, key in KEYS.items():
        rows = fs.to_arrow(table, columns=key).to_pylist() if fs.exists(table) else []
        out[table] = Counter(tuple(_relative(r[k], store) for k in key) for r in rows)
    return out


def _relative(value: object, store: Path) -> object:
    """A quarantine uri without the trial's own folder (each trial has a copy of the data)."""
    prefix = str(store.parent) + "/"
    return value.removeprefix(prefix) if isinstance(value, str) else value


def untraced(store: Path) -> int:
    from features.store import FeatureStore

    fs = FeatureStore(str(store))
    runs = set(fs.column_values("_runs", "run_id").to_pylist())
    return sum(
        1
        for table in ("samples", "views", "quarantine")
        if fs.exists(table)
        for run_id in fs.column_values(table, "run_id").to_pylist()
        if run_id not in runs
    )


def compare(scenario: str, detail: str, store: Path, reference: dict[str, Counter]) -> Trial:
    found = keys(store)
    lost = sum(len(set(reference[t]) - set(found[t])) for t in KEYS)
    extra = sum(len(set(found[t]) - set(reference[t])) for t in KEYS)
    duplicated = sum(n - 1 for t in KEYS for n in found[t].values() if n > 1)
    converged = lost == 0 and extra == 0 and duplicated == 0
    return Trial(scenario, detail, converged, lost, duplicated, untraced(store))


# ---- the scenarios ----------------------------------------------------------------------------


class Bench:
    """Trials run one at a time in one folder (``work/trial``), so every row's uri is the
    same as in the reference builds; a snapshot of the base corpus and store is restored
    before each trial."""

    def __init__(self, work: Path, samples: int, rng: random.Random) -> None:
        self.work, self.samples, self.rng = work, samples, rng
        self.root = work / "trial"
        write_inputs(self.root / "data", samples, seed=1)
        self.seconds: dict[str, float] = {}
        self.seconds["build"] = run(command("build", str(self.spec()))).seconds
        self.reference_base = keys(self.root / "store")
        shutil.copytree(self.root, work / "base")
        write_inputs(work / "new", samples // 2, seed=2)  # what a refresh finds later
        self.fresh(grown=True, with_base=False)
        run(command("build", str(self.spec())))
        self.reference_grown = keys(self.root / "store")

    def spec(self, *, delete: bool = False, quality: int | None = None) -> Path:
        return write_spec(self.root, self.root / "store", delete=delete, quality=quality)

    def fresh(self, *, grown: bool, with_base: bool) -> Path:
        """Restore the base corpus (and store), plus the new inputs; returns the store."""
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(self.work / "base", self.root)
        if not with_base:
            shutil.rmtree(self.root / "store")
        if grown:
            shutil.copytree(self.work / "new", self.root / "data" / "new")
        return self.root / "store"

    def killed(self, scenario: str, i: int) -> Trial:
        grown = scenario in ("refresh", "encode")
        store = self.fresh(grown=grown, with_base=scenario not in ("build", "worker"))
        spec = self.spec()
        args = {
            "build": command("build", str(spec)),
            "worker": command("build", str(spec)),
            "refresh": command("refresh", str(spec)),
            "encode": command("encode", str(spec), "--feature-set", "inputs", "--reencode"),
        }[scenario]
        if scenario not in self.seconds:  # the command's clean duration, once: kills land in it
            self.seconds[scenario] = run(args).seconds
            store = self.fresh(grown=grown, with_base=scenario not in ("build", "worker"))
        delay = self.rng.uniform(0.0, self.seconds[scenario])
        ran = run(args, kill_after=delay, kill="worker" if scenario == "worker" else "driver")
        run(command("refresh" if scenario == "refresh" else "build", str(spec)))
        reference = self.reference_grown if grown else self.reference_base
        return compare(scenario, f"{ran.killed} at {delay:.1f} s", store, reference)

    def filtered(self, i: int) -> Trial:
        """``mmfp filter`` killed while it moves samples out and reads refused ones again;
        a rerun of it must end where a fresh build with the new filters ends."""
        base = self.work / "filter-base"
        if not base.exists():  # once: the store built with the first filters, and the reference
            self.fresh(grown=False, with_base=False)
            run(command("build", str(self.spec(quality=1))))
            self.reference_filtered = keys(self.root / "store")
            self.fresh(grown=False, with_base=False)
            run(command("build", str(self.spec(quality=0))))
            shutil.copytree(self.root, base)
        if "filter" not in self.seconds:
            self._restore(base)
            self.seconds["filter"] = run(command("filter", str(self.spec(quality=1)))).seconds
        store = self._restore(base)
        args = command("filter", str(self.spec(quality=1)))  # the spec lives in the trial folder
        delay = self.rng.uniform(0.0, self.seconds["filter"])
        ran = run(args, kill_after=delay)
        run(args)
        return compare("filter", f"{ran.killed} at {delay:.1f} s", store, self.reference_filtered)

    def _restore(self, snapshot: Path) -> Path:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(snapshot, self.root)
        return self.root / "store"

    def race(self, i: int) -> Trial:
        store = self.fresh(grown=True, with_base=True)
        kind = ("refreshes", "optimize", "vacuum")[i % 3]
        keep, delete = self.spec(), self.spec(delete=True)
        if kind == "refreshes":
            jobs = [command("refresh", str(s)) for s in (keep, delete, keep, delete)]
        else:
            other = (
                command("store", "optimize", "samples", "--store", str(store))
                if kind == "optimize"
                else command("store", "vacuum", "--apply", "--force", "--retention-hours", "0",
                             "--store", str(store))
            )  # fmt: skip
            jobs = [command("refresh", str(keep)), other, other]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
        procs = [
            subprocess.Popen(j, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
            for j in jobs
        ]  # fmt: skip
        failures = [p for p in procs if p.wait(timeout=600) != 0]
        run(command("refresh", str(keep)))
        trial = compare("race", kind, store, self.reference_grown)
        if failures:  # a writer may stop with a clear error (e.g. its slot taken), never corrupt
            trial.error = "; ".join(p.stderr.read().decode()[-300:] for p in failures if p.stderr)
        return trial

    def train(self, i: int) -> Trial:
        store = self.fresh(grown=False, with_base=True)
        config = self.work / f"train{i}.yaml"
        config.write_text(json.dumps({
            "name": f"faults{i}", "store": str(store), "feature_set": "inputs",
            "modalities": {
                "image": {"kind": "cnn", "input": "image_pixels", "channels": [4], "out_dim": 8},
                "audio": {"kind": "cnn", "input": "audio_logmel", "channels": [4], "out_dim": 8},
            },
            "epochs": 3, "batch_size": 8, "num_workers": 1, "checkpoint_every_steps": 2,
        }))  # fmt: skip
        if "train" not in self.seconds:
            self.seconds["train"] = run(command("train", str(config))).seconds
            shutil.rmtree(store / "_train" / f"faults{i}")
        delay = self.rng.uniform(0.0, self.seconds["train"])
        kill = "worker" if i % 2 else "driver"  # a Ray Train worker, or the whole run
        ran = run(command("train", str(config)), kill_after=delay, kill=kill)
        run(command("train", str(config)))  # resumes from its last checkpoint
        metrics = store / "_train" / f"faults{i}"
        finished = any(
            json.loads(line).get("epoch") == 3
            for path in metrics.glob("checkpoint_*/metrics.jsonl")
            for line in path.read_text().splitlines()
            if line.strip()
        )
        trial = compare("train", f"{ran.killed} at {delay:.1f} s", store, self.reference_base)
        trial.converged = trial.converged and finished
        return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="kill trials per scenario")
    parser.add_argument("--races", type=int, default=6, help="concurrent-writer trials")
    parser.add_argument("--train-trials", type=int, default=4)
    parser.add_argument("--samples", type=int, default=60, help="corpus size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="which to run"
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mmfp-faults-") as tmp:
        bench = Bench(Path(tmp), args.samples, random.Random(args.seed))
        kills = [s for s in ("build", "refresh", "encode", "worker") if s in args.scenarios]
        plan = [(s, i) for i in range(args.trials) for s in kills]
        if "filter" in args.scenarios:
            plan += [("filter", i) for i in range(args.trials)]
        if "race" in args.scenarios:
            plan += [("race", i) for i in range(args.races)]
        if "train" in args.scenarios:
            plan += [("train", i) for i in range(args.train_trials)]
        for n, (scenario, i) in enumerate(plan, start=1):
            try:
                if scenario in ("race", "train", "filter"):
                    trial = getattr(bench, {"filter": "filtered"}.get(scenario, scenario))(i)
                else:
                    trial = bench.killed(scenario, i)
            except Exception as e:  # the rerun failed: the store did not converge
                trial = Trial(scenario, f"trial {i}", False, error=f"{type(e).__name__}: {e}"[:500])
            report.trials.append(trial)
            outcome = "ok" if trial.converged else "NOT CONVERGED"
            print(f"[{n}/{len(plan)}] {scenario}: {trial.detail} -> {outcome} {trial.error}")
            if args.json:  # after every trial, so a long run cut short keeps what it measured
                report.save(args.json)
    print(
        f"\n{'scenario':10} {'trials':>6} {'killed':>6} {'converged':>9} {'lost':>5} {'dup':>5} "
        f"{'untraced':>8}"
    )
    for row in report.table():
        counts = (row["rows lost"], row["rows duplicated"], row["untraced rows"])
        print(f"{row['scenario']:10} {row['trials']:>6} {row['killed']:>6} {row['converged']:>9} "
              f"{counts[0]:>5} {counts[1]:>5} {counts[2]:>8}")  # fmt: skip
    return 0 if all(t.converged for t in report.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
