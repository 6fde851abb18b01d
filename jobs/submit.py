"""Run mmfp jobs on a Ray cluster through Ray's Job Submission API, and watch them.

A job is ``python -m jobs KIND ARGS...`` (the ``mmfp`` command) run on the cluster with this
project shipped as the job's ``working_dir`` (the cluster image brings the dependencies; see
cluster.yaml).

Address: ``--address`` wins, then ``RAY_API_SERVER_ADDRESS``, then ``RAY_ADDRESS`` (as
Ray's own job CLI reads them; e.g. ``http://HEAD:8265``). There is no fallback to a local
Ray: a stale ``ray start`` on this machine must never receive a job meant for a cluster.

Token auth: Ray 2.60's client adds ``authorization: Bearer <token>`` only when this
process itself has ``RAY_AUTH_MODE=token``. We read the token the same places Ray does
(``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``)
and pass the header ourselves, so a user only needs the token. It is never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO, get_args

from pipelines.errors import MmfpError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

Kind = Literal["build", "encode", "refresh", "filter", "dedup", "train", "evaluate"]
KINDS: tuple[str, ...] = get_args(Kind)
JOBS_MODULE = "jobs"  # a job is `python -m jobs KIND ARGS...` in the job's working_dir
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never shipped: environments, VCS, caches, local stores and data (gitignore syntax).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    ".git/",
    "mmfp-demo/",
    "mmfp-store/",
    "*.egg-info/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    "/build/",  # anchored: pipelines/build/ is code
    "/dist/",
    "benchmarks/data/",
    "benchmarks/results/",
    "checkpoints/",
    "*.ckpt",
    "mmfp-schedules*",  # scheduler state (jobs/schedule.py)
)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ENV_LOCK = threading.Lock()  # guards the brief RAY_ADDRESS pinning in connect()
# the Job API's answer while the head has no job agent yet (Ray's job_head.py)
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 30.0  # a cluster that just started gets its job agent within seconds


class ClusterError(MmfpError):
    """The cluster could not be reached, refused us, or does not know the job."""


class JobExists(ClusterError):
    """A job with this submission id was already submitted to this cluster."""


class JobFailed(ClusterError):
    """A job we waited for ended FAILED or STOPPED."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


def resolve_address(address: str | None = None) -> str:
    """The Job API address: explicit, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``.

    It must be a URL (``http://HEAD:8265``). A bare ``HOST:PORT`` is a GCS address: inside
    a Ray job RAY_ADDRESS holds one for ``ray.init``, and Ray's client would spend ~45 s
    trying it as a GCS before failing, so it is refused here with a hint.
    """
    for name, value in (
        ("--address", address),
        ("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_API_SERVER_ADDRESS")),
        ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS")),
    ):
        if value and value.strip():
            value = value.strip().rstrip("/")
            if "://" not in value:
                raise ClusterError(
                    f"{name}={value} is a GCS address; job submission needs the Job API "
                    "(dashboard) URL, e.g. http://HEAD:8265"
                )
            return value
    raise ClusterError(
        "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
        "(use `mmfp build` to run on this machine)"
    )


def auth_token() -> tuple[str, str] | None:
    """``(token, where it came from)`` from Ray's usual places, or None without a token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return _checked_token(token, "RAY_AUTH_TOKEN"), "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_env or "~/.ray/auth_token").expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as e:
        if path_env:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path_env} does not exist") from e
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ClusterError(f"cannot read the Ray token file {path}: {type(e).__name__}") from e
    return (_checked_token(token, str(path)), str(path)) if token else None


def _checked_token(token: str, source: str) -> str:
    """A token is one word of printable characters: anything else would end up in (or
    break) an HTTP header, and the error that says so would print the header."""
    if not token.isprintable() or any(c.isspace() for c in token):
        raise ClusterError(
            f"the token in {source} holds whitespace or control characters (a line break "
            "inside?); a Ray auth token is a single word"
        )
    return token


def first_line(text: str | None) -> str:
    """Ray's job messages append the job's last logs; the first line says what happened."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line.split(", last available logs")[0]


def _summary(text: str) -> str:
    """One line of a Ray error: a server traceback's last line, else the first line."""
    lines = [ln.strip() for ln in text.strip().rstrip(".").splitlines() if ln.strip()]
    if not lines:
        return text
    return lines[-1] if "Traceback" in text else lines[0]


@contextlib.contextmanager
def _cluster_errors(address: str, job: str | None = None) -> Iterator[None]:
    """Turn the ways a Job API call fails into one ClusterError line (never the token)."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        # 403 says "Authentication failed"; a 401, or Ray finding no token, says otherwise.
        if "Authentication failed" not in str(e):
            raise ClusterError(
                f"the cluster at {address} requires a token: set RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH) to its auth token"
            ) from None
        found = auth_token()
        source = found[1] if found else "Ray's token file"
        raise ClusterError(
            f"the cluster at {address} rejected the token from {source}: "
            "it is not this cluster's token"
        ) from None
    except (ConnectionError, requests.ConnectionError, aiohttp.ClientConnectionError) as e:
        raise ClusterError(
            f"cannot reach the Ray Job API at {address} ({type(e).__name__}); is the "
            "cluster up and is this its dashboard address (http://HEAD:8265)?"
        ) from None
    except (requests.RequestException, aiohttp.ClientError) as e:
        # the exception's text can quote request headers (the token): name its type only
        raise ClusterError(f"a request to {address} failed: {type(e).__name__}") from None
    except RuntimeError as e:
        msg = str(e)
        if "already exists" in msg:
            raise JobExists(f"job {job} already exists on {address}") from None
        if job and ("status code 404" in msg or f"Job {job} does not exist" in msg):
            raise ClusterError(f"no job {job!r} on {address} (see `mmfp jobs list`)") from None
        raise ClusterError(f"the Ray Job API at {address} failed: {_summary(msg)}") from None


@contextlib.contextmanager
def _pinned_address(url: str) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override an explicit address; hide it meanwhile."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    if all(os.environ.get(n, url) == url for n in names):
        yield
        return
    with _ENV_LOCK:
        saved = {n: os.environ.pop(n) for n in names if n in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def connect(address: str | None = None) -> JobSubmissionClient:
    """A JobSubmissionClient for the cluster, carrying the auth token when there is one."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token[0]}"} if token else None
    with _cluster_errors(url), _pinned_address(url):
        return JobSubmissionClient(url, headers=headers)


def entrypoint(module: str, args: Sequence[str]) -> str:
    """The shell command the cluster runs: ``python -m MODULE ARGS...`` (quoted)."""
    if not _MODULE.fullmatch(module):
        raise ClusterError(f"entrypoint module {module!r} is not a dotted module name")
    return shlex.join(["python", "-m", module, *args])


def job_args(args: Sequence[str], working_dir: Path) -> list[str]:
    """Local files under working_dir become relative paths, as the job sees them there.

    Other existing files are made absolute: they work on a loopback cluster or a shared
    filesystem only. Anything else (options, URIs) passes through unchanged.
    """
    root, out = working_dir.resolve(), []
    for arg in args:
        path = Path(arg)
        if arg.startswith("-") or "://" in arg or not path.is_file():
            out.append(arg)
            continue
        path = path.resolve()
        out.append(path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path))
    return out


def runtime_env(
    working_dir: Path,
    *,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    pip: Sequence[str] | None = None,
    env_vars: dict[str, str] | None = None,
) -> dict[str, object]:
    """The job's runtime_env: this project as working_dir, minus what must not ship."""
    if not (working_dir / "pyproject.toml").is_file():
        raise ClusterError(
            f"working_dir {working_dir} is not an mmfp checkout (no pyproject.toml); "
            "pass --working-dir PROJECT_ROOT"
        )
    env: dict[str, object] = {"working_dir": str(working_dir), "excludes": list(excludes)}
    if pip:
        env["pip"] = list(pip)
    # a submitted job's log (``mmfp jobs logs``) is its run log: Ray's lines stay in it
    env["env_vars"] = {"MMFP_VERBOSE": "1", **(env_vars or {})}
    return env


def new_submission_id(kind: str) -> str:
    """Readable and unique: ``mmfp-build-20261125T011500Z-3f9a1c``."""
    return f"mmfp-{kind}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def submit(
    kind: Kind,
    args: Sequence[str],
    *,
    address: str | None = None,
    submission_id: str | None = None,
    module: str | None = None,
    working_dir: str | Path = PROJECT_ROOT,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    pip: Sequence[str] | None = None,
    env_vars: dict[str, str] | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: int | None = None,
    resources: dict[str, float] | None = None,
    metadata: dict[str, str] | None = None,
    wait: bool = False,
    out: TextIO | None = None,
) -> str:
    """Submit ``python -m jobs KIND ARGS`` (or ``python -m MODULE ARGS``); return its id.

    ``submission_id`` makes the submission idempotent: Ray refuses a second job with the
    same id (``JobExists``). ``num_cpus``/``num_gpus``/``memory``/``resources`` reserve
    resources for the entrypoint process itself. With ``wait`` the job's logs stream to
    ``out`` and ``JobFailed`` is raised unless it ends SUCCEEDED.
    """
    if kind not in KINDS:
        raise ClusterError(f"unknown job kind {kind!r} (valid: {', '.join(KINDS)})")
    if submission_id is not None and not _ID.fullmatch(submission_id):
        raise ClusterError(
            f"submission id {submission_id!r} must be 1-128 of A-Z a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    working_dir = Path(working_dir).resolve()
    args = job_args(args, working_dir)
    command = entrypoint(module, args) if module else entrypoint(JOBS_MODULE, [kind, *args])
    env = runtime_env(working_dir, excludes=excludes, pip=pip, env_vars=env_vars)
    sid = submission_id or new_submission_id(kind)
    client = connect(address)
    with _cluster_errors(client.get_address(), sid):
        sid = submit_when_agent_ready(
            client,
            entrypoint=command,
            submission_id=sid,
            runtime_env=env,
            metadata={"mmfp.kind": kind, **(metadata or {})},
            entrypoint_num_cpus=num_cpus,
            entrypoint_num_gpus=num_gpus,
            entrypoint_memory=memory,
            entrypoint_resources=resources,
        )
    if wait:
        details = follow(sid, address=address, out=out, client=client)
        if details.status != "SUCCEEDED":
            raise JobFailed(
                f"job {sid} ended {details.status}: {first_line(details.message) or 'no message'}",
                status=str(details.status),
            )
    return sid


def submit_when_agent_ready(client: JobSubmissionClient, **job: object) -> str:
    """``client.submit_job(**job)``, again while the head answers that it has no job agent
    yet (a cluster that just started, or an agent restarting): that request created no
    job, so trying again cannot submit one twice. Gives up after ``AGENT_WAIT_S``."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if NO_AGENT not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def follow(
    submission_id: str,
    *,
    address: str | None = None,
    out: TextIO | None = None,
    client: JobSubmissionClient | None = None,
) -> JobDetails:
    """Stream a job's logs to ``out`` until it ends; return its final details."""
    client = client or connect(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    with _cluster_errors(client.get_address(), submission_id):
        asyncio.run(tail())
    # The log stream closes as the job ends; its status can trail by a moment.
    return wait_for(submission_id, client=client, timeout=30)


def wait_for(
    submission_id: str,
    *,
    address: str | None = None,
    client: JobSubmissionClient | None = None,
    timeout: float | None = None,
    poll_s: float = 0.5,
) -> JobDetails:
    """Poll until the job is SUCCEEDED/FAILED/STOPPED (or ``timeout``); return its details."""
    client = client or connect(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        details = job_info(submission_id, client=client)
        if str(details.status) in TERMINAL:
            return details
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {submission_id} is still {details.status} after {timeout}s")
        time.sleep(poll_s)


def job_info(
    submission_id: str, *, address: str | None = None, client: JobSubmissionClient | None = None
) -> JobDetails:
    client = client or connect(address)
    with _cluster_errors(client.get_address(), submission_id):
        return client.get_job_info(submission_id)


def list_jobs(*, address: str | None = None) -> list[JobDetails]:
    """Every job the cluster knows, oldest first."""
    client = connect(address)
    with _cluster_errors(client.get_address()):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_logs(submission_id: str, *, address: str | None = None) -> str:
    client = connect(address)
    with _cluster_errors(client.get_address(), submission_id):
        return client.get_job_logs(submission_id)


def stop(submission_id: str, *, address: str | None = None) -> bool:
    """Ask the job to stop; False when it had already ended."""
    client = connect(address)
    with _cluster_errors(client.get_address(), submission_id):
        return client.stop_job(submission_id)
