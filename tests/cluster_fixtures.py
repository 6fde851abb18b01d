"""A real two-node Ray cluster on loopback with token auth, for tests that submit jobs.

Each node is ``ray start --block`` in its own process group with its own ports and its
own ``--temp-dir``, so the cluster never meets the session's local Ray (``ray_session``)
or another engineer's Ray on the same machine. Teardown signals those process groups and
then kills, by pid, any process still naming this cluster's temp dir; never `ray stop`.
Tests talk to the cluster only over HTTP (Job Submission API) or through the CLI in a
subprocess.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
_CLEARED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")


@dataclass
class LocalCluster:
    """What a test needs to reach the cluster; ``env`` is the environment of a client."""

    address: str  # dashboard / Job API, e.g. http://127.0.0.1:8265
    gcs_address: str
    token: str
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """A client environment: the token, this cluster's address, no stray Ray settings."""
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_ADDRESS=self.address)
        return env

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all sockets stay open until all are picked, so the
    kernel cannot hand out one port twice (it did, one by one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(ray), "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown signals only this
        )


def _wait_until(check, *, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a ray node exited while waiting for {what}")
        with contextlib.suppress(requests.RequestException):
            if check():
                return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_cluster(*, workers: int = 1, num_cpus: int = 1, timeout: float = 120) -> LocalCluster:
    """Start a head and ``workers`` worker nodes on 127.0.0.1; return once all are alive."""
    # A short path: Ray puts unix sockets under it (the limit is ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="mmfp-rt-", dir="/tmp"))
    token = secrets.token_hex(24)
    # Every listener of every node gets its own port: nodes on one host must not share.
    ports = iter(free_ports(3 + len(_NODE_PORTS) * (workers + 1)))
    port, dash_port, client_port = next(ports), next(ports), next(ports)

    def node_ports() -> list[str]:
        return [f"--{name}={next(ports)}" for name in _NODE_PORTS]

    cluster = LocalCluster(
        address=f"http://127.0.0.1:{dash_port}",
        gcs_address=f"127.0.0.1:{port}",
        token=token,
        temp_dir=temp_dir,
    )
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # Job entrypoints say `python`: make it this virtualenv's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=150000000",
    ]
    try:
        head = [
            "--head",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={client_port}",
        ]
        cluster.procs.append(
            _start_node([*head, *common, *node_ports()], env, temp_dir / "head.log")
        )
        _wait_until(
            lambda: (
                requests.get(
                    f"{cluster.address}/api/version", headers=cluster.headers, timeout=2
                ).ok
            ),
            timeout=timeout,
            what="the dashboard",
            procs=cluster.procs,
        )
        for i in range(workers):
            args = [f"--address={cluster.gcs_address}", *common, *node_ports()]
            cluster.procs.append(_start_node(args, env, temp_dir / f"worker{i}.log"))
        _wait_until(
            lambda: alive_nodes(cluster) == workers + 1,
            timeout=timeout,
            what=f"{workers + 1} alive nodes",
            procs=cluster.procs,
        )
    except BaseException:
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in temp_dir.glob("*.log"))
        stop_cluster(cluster)
        raise RuntimeError(f"test cluster did not start:\n{logs}") from None
    return cluster


def alive_nodes(cluster: LocalCluster) -> int:
    r = requests.get(
        f"{cluster.address}/api/v0/nodes",
        params={"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"},
        headers=cluster.headers,
        timeout=5,
    )
    r.raise_for_status()
    return len(r.json()["data"]["result"]["result"])


def _stop_running_jobs(cluster: LocalCluster) -> None:
    """Stop jobs first, so their drivers (own sessions) end before the nodes go."""
    with contextlib.suppress(requests.RequestException, ValueError, KeyError):
        jobs = requests.get(f"{cluster.address}/api/jobs/", headers=cluster.headers, timeout=5)
        for job in jobs.json():
            if job["status"] in ("PENDING", "RUNNING") and job.get("submission_id"):
                requests.post(
                    f"{cluster.address}/api/jobs/{job['submission_id']}/stop",
                    headers=cluster.headers,
                    timeout=5,
                )


def _leftovers(temp_dir: Path) -> list[int]:
    """Pids of this cluster's processes that left its process groups (e.g. job drivers).

    Found by their command line or working directory naming the cluster's unique temp dir
    (Linux ``/proc``), so nothing else on the machine is touched.
    """
    mark, found = str(temp_dir), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if mark in cmdline or os.readlink(entry / "cwd").startswith(mark):
                found.append(int(entry.name))
    return found


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, or its zombie keeps the group "alive"
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_cluster(cluster: LocalCluster, *, grace: float = 3) -> None:
    """SIGTERM each node's process group, SIGKILL what is left, then remove the temp dir.

    `ray start --block` and the head's gcs_server/raylet ignore SIGTERM for a long time
    (measured: >10 s), so the grace is short; a test cluster has nothing worth flushing.
    """
    _stop_running_jobs(cluster)
    for proc in reversed(cluster.procs):  # workers first, head last
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_alive(p) for p in cluster.procs):
        time.sleep(0.2)
    for proc in cluster.procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    for pid in _leftovers(cluster.temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    """One two-node token-auth cluster per test module (starting one costs ~10 s)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture
def cluster_env(ray_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    """This process set up as a client of ``ray_cluster`` (token, address) for one test."""
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    return ray_cluster


def _stub_job(argv: list[str]) -> int:
    """Cheap stand-in job entrypoints: ``SPEC [--slot S]`` validates a spec as a refresh
    would first (a scheduler test's entrypoint), ``sleep SECONDS`` prints a line a second
    (a job to follow and to stop)."""
    if argv and argv[0].endswith((".yaml", ".yml")) and argv[1:2] in ([], ["--slot"]):
        from pipelines.spec import load_spec

        print(f"stub refresh of {load_spec(argv[0]).store.uri} {' '.join(argv[1:])}", flush=True)
        return 0
    if argv[:1] == ["sleep"] and len(argv) == 2:
        for i in range(int(argv[1])):
            print(f"tick {i}", flush=True)
            time.sleep(1)
        return 0
    print(f"usage: python -m tests.cluster_fixtures SPEC | sleep SECONDS; got {argv}")
    return 2


if __name__ == "__main__":
    sys.exit(_stub_job(sys.argv[1:]))
