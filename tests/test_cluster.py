"""`mmfp submit` / `mmfp jobs` against a real two-node token-auth Ray cluster on loopback,
plus the cluster configs (cluster.yaml against Ray's own schema, KubeRay, systemd).

The CLI runs in subprocesses (``python -m jobs.cli_cluster``, the same commands `mmfp`
registers), so this process never joins the cluster.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from features.store import FeatureStore
from jobs import submit as jobsubmit
from jobs.demo.corpus import write_directory_source
from pipelines.spec import write_spec
from tests.cluster_fixtures import (
    ROOT,
    LocalCluster,
    alive_nodes,
    cluster_env,
    free_port,
    ray_cluster,
)
from tests.helpers import make_spec

__all__ = ["cluster_env", "ray_cluster"]  # fixtures, imported for this module


def mmfp(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli_cluster", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, Path]:
    """A 10-sample directory corpus, a spec that builds it, and a spec with no sources."""
    root = tmp_path_factory.mktemp("submit")
    stems = write_directory_source(root / "photos", n_per_class=1)
    source = {"kind": "directory", "name": "photos", "uri": str(root / "photos")}
    good = root / "good.yaml"
    write_spec(make_spec(root / "store", [{**source, "class_folders": True}]), good)
    bad = root / "bad.yaml"
    bad.write_text("sources: []\n", encoding="utf-8")
    return {"good": good, "bad": bad, "store": root / "store", "n": len(stems)}


def test_two_nodes_on_loopback(ray_cluster: LocalCluster):
    assert alive_nodes(ray_cluster) == 2
    assert ray_cluster.address.startswith("http://127.0.0.1:")


def test_job_api_refuses_requests_without_the_token(ray_cluster: LocalCluster):
    url = f"{ray_cluster.address}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert requests.get(url, headers=wrong, timeout=10).status_code == 403
    assert requests.get(url, headers=ray_cluster.headers, timeout=10).status_code == 200


def test_cli_without_a_token_says_so_in_one_line(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    proc = mmfp("jobs", "list", env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: the cluster at http://127.0.0.1:")
    assert "requires a token: set RAY_AUTH_TOKEN" in proc.stderr


def test_a_wrong_token_is_named_by_its_source_never_shown(cluster_env, tmp_path, monkeypatch):
    (tmp_path / "token").write_text("wrong-token\n", encoding="utf-8")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(
        jobsubmit.ClusterError, match="rejected the token from .*token: it is not"
    ) as e:
        jobsubmit.list_jobs()
    assert "wrong-token" not in str(e.value)
    assert cluster_env.token not in str(e.value)


@pytest.fixture(scope="module")
def waited(ray_cluster: LocalCluster, specs) -> dict[str, subprocess.CompletedProcess[str]]:
    """`submit --wait` of the good and the bad spec, run side by side (each costs ~10-30 s).

    The second starts once the first job runs: Ray unpacks one working_dir package for
    both, and two jobs setting up the same package at the same moment can start a driver
    before the unpack ends (ModuleNotFoundError; ray-project/ray#49254, still open)."""
    runs = {
        "build-ok": ["build", str(specs["good"])],
        "bad-spec": ["build", str(specs["bad"])],
    }
    procs = {}
    for sid, args in runs.items():
        if procs:
            _wait_until_started("build-ok", ray_cluster.env)
        procs[sid] = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli_cluster", "submit", *args, "--wait", "--id", sid],
            cwd=ROOT,
            env=ray_cluster.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    done = {}
    for sid, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        done[sid] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _wait_until_started(sid: str, env: dict[str, str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = mmfp("jobs", "status", sid, env=env).stdout
        if any(state in status for state in ("RUNNING", "SUCCEEDED", "FAILED", "STOPPED")):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {sid} did not start within {timeout} s")


def test_submit_build_wait_succeeds_and_the_store_is_readable(ray_cluster, specs, waited):
    proc = waited["build-ok"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # --wait followed the job's own output up to the build summary
    assert "Running entrypoint for job build-ok: python -m jobs build" in proc.stdout
    assert f"{specs['n']} new samples" in proc.stdout
    assert "job build-ok SUCCEEDED" in proc.stdout

    store = FeatureStore(str(specs["store"]))
    assert store.to_arrow("samples").num_rows == specs["n"]

    status = mmfp("jobs", "status", "build-ok", env=ray_cluster.env)
    assert status.returncode == 0
    assert "build-ok: SUCCEEDED" in status.stdout
    listing = mmfp("jobs", "list", env=ray_cluster.env)
    assert "build-ok" in listing.stdout
    assert "bad-spec" in listing.stdout


def test_bad_spec_job_fails_and_submit_wait_exits_nonzero(waited):
    proc = waited["bad-spec"]
    assert proc.returncode == 1
    assert "invalid spec" in proc.stdout  # the job's own error, followed live
    assert proc.stderr.strip().splitlines()[-1].startswith("error: job bad-spec ended FAILED")
    assert "Traceback" not in proc.stderr


def test_logs_and_a_reused_id(cluster_env, specs, waited):
    logs = jobsubmit.job_logs("build-ok")
    assert f"{specs['n']} new samples" in logs
    proc = mmfp("submit", "build", str(specs["good"]), "--id", "build-ok", env=cluster_env.env)
    assert proc.returncode == 2
    assert "job build-ok already exists" in proc.stderr


def test_follow_then_stop_a_running_job(ray_cluster):
    """`submit --wait` streams a running job's lines; `jobs stop` ends it; --wait exits 1."""
    args = ["submit", "build", "--id", "sleeper", "--module", "tests.cluster_fixtures", "--wait"]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli_cluster", *args, "--", "sleep", "120"],
        cwd=ROOT,
        env=ray_cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiting.stdout is not None
        for line in waiting.stdout:  # live log lines, before the job ends
            if line.startswith("tick 1"):
                break
        stop = mmfp("jobs", "stop", "sleeper", "--wait", env=ray_cluster.env)
        assert stop.returncode == 0, stop.stderr
        assert "sleeper: STOPPED" in stop.stdout
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.send_signal(signal.SIGINT)
            waiting.wait(timeout=30)
    assert waiting.returncode == 1
    assert "ended STOPPED" in err
    again = mmfp("jobs", "stop", "sleeper", env=ray_cluster.env)
    assert "had already ended: STOPPED" in again.stdout


def test_unknown_job_is_one_line(cluster_env):
    proc = mmfp("jobs", "status", "no-such-job", env=cluster_env.env)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: no job 'no-such-job' on {cluster_env.address} (see `mmfp jobs list`)\n"
    )
    with pytest.raises(jobsubmit.ClusterError, match="no job 'nope'"):
        jobsubmit.stop("nope")


def test_unreachable_cluster_and_address_precedence(cluster_env, monkeypatch, waited):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(jobsubmit.ClusterError, match=f"cannot reach the Ray Job API at {dead}"):
        jobsubmit.list_jobs(address=dead)
    # --address wins over RAY_ADDRESS (Ray's own client would let the variable win) ...
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert any(
        j.submission_id == "build-ok" for j in jobsubmit.list_jobs(address=cluster_env.address)
    )
    assert os.environ["RAY_ADDRESS"] == dead  # ... and the variable is put back
    # RAY_API_SERVER_ADDRESS beats RAY_ADDRESS, as in `ray job`
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", cluster_env.address)
    assert jobsubmit.resolve_address() == cluster_env.address
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what a job's driver sees: a GCS
    with pytest.raises(jobsubmit.ClusterError, match="RAY_ADDRESS=127.0.0.1:6379 is a GCS"):
        jobsubmit.list_jobs()
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(jobsubmit.ClusterError, match="no cluster address"):
        jobsubmit.list_jobs()


# ---- submission pieces, no cluster ---------------------------------------------------------


def test_entrypoint_and_job_args(tmp_path, monkeypatch):
    spec = ROOT / "pyproject.toml"  # any file inside the project
    outside = tmp_path / "my spec.yaml"
    outside.write_text("x")
    monkeypatch.chdir(ROOT / "jobs")
    args = jobsubmit.job_args(["../pyproject.toml", str(outside), "--flag", "s3://b/k"], ROOT)
    assert args == ["pyproject.toml", str(outside), "--flag", "s3://b/k"]
    assert jobsubmit.job_args([str(spec)], ROOT) == ["pyproject.toml"]
    command = jobsubmit.entrypoint("jobs.build", [str(outside)])
    assert command == f"python -m jobs.build '{outside}'"
    with pytest.raises(jobsubmit.ClusterError, match="not a dotted module"):
        jobsubmit.entrypoint("jobs.build; rm -rf /", [])


def test_runtime_env_ships_the_project_only(tmp_path):
    env = jobsubmit.runtime_env(ROOT, pip=["x==1"], env_vars={"A": "1"})
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", ".git/", "mmfp-demo/"} <= set(env["excludes"])
    assert (env["pip"], env["env_vars"]) == (["x==1"], {"MMFP_VERBOSE": "1", "A": "1"})
    with pytest.raises(jobsubmit.ClusterError, match="not an mmfp checkout"):
        jobsubmit.runtime_env(tmp_path)


def test_submit_checks_kind_and_id_before_any_request():
    with pytest.raises(jobsubmit.ClusterError, match="unknown job kind 'deploy'"):
        jobsubmit.submit("deploy", [], address="http://127.0.0.1:1")  # type: ignore[arg-type]
    with pytest.raises(jobsubmit.ClusterError, match="submission id 'a b'"):
        jobsubmit.submit("build", [], address="http://127.0.0.1:1", submission_id="a b")
    assert jobsubmit.new_submission_id("build").startswith("mmfp-build-")


def test_token_sources_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert jobsubmit.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobsubmit.auth_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobsubmit.auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-env ")
    assert jobsubmit.auth_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(jobsubmit.ClusterError, match="RAY_AUTH_TOKEN_PATH=.*does not exist"):
        jobsubmit.auth_token()


# ---- configs -----------------------------------------------------------------------------


def test_cluster_yaml_validates_against_rays_schema():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs first

    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    images = [raw["docker"]["head_image"], raw["docker"]["worker_image"]]
    images.append(types["gpu_worker"]["docker"]["worker_image"])
    assert all(img.startswith(f"rayproject/ray:{ray.__version__}-") for img in images)
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("pip install" in c and "/home/ray/mmfp" in c for c in raw["setup_commands"])

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_wrokers"] = 1
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def _ray_containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _token_env(container: dict) -> dict:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    return env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]


def test_kuberay_manifests():
    deploy = ROOT / "deploy"
    rc = yaml.safe_load((deploy / "kuberay-raycluster.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for container in _ray_containers(spec):
        assert _token_env(container) == {"name": "mmfp-ray-token", "key": "auth_token"}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"

    job = yaml.safe_load((deploy / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert job["spec"]["entrypoint"].startswith("python -m jobs.refresh ")
    _token_env(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])

    cron = yaml.safe_load((deploy / "kuberay-cronjob.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(pod["args"])
    assert "mmfp submit refresh" in script
    assert '--id "refresh-nightly-$slot" --wait -- specs/nightly.yaml --slot "$epoch"' in script
    assert "$(" not in script.replace("$$(", "")  # escaped from Kubernetes' $(VAR) expansion


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as section -> (key, value) lines; keys repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            key, _, value = line.partition("=")
            sections[current].append((key, value))
    return sections


def test_systemd_unit_runs_the_scheduler():
    unit = _unit(ROOT / "deploy" / "mmfp-scheduler.service")
    service = dict(unit["Service"])
    assert service["ExecStart"].split()[1:4] == ["schedule", "run", "--file"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    envs = [v for k, v in unit["Service"] if k == "Environment"]
    assert "RAY_AUTH_TOKEN_PATH=%d/ray_auth_token" in envs
    assert service["LoadCredential"].startswith("ray_auth_token:")
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"


def test_the_cli_module_registers_on_an_app():
    import typer

    from jobs.cli_cluster import register

    app = typer.Typer()
    register(app)
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == {"submit", "jobs", "schedule"}


class _AgentStartingClient:
    """Answers the way a head that just started does, ``refusals`` times, then accepts.
    (A real head has no job agent only for a moment after it starts: not reproducible on
    demand, so this stands in for it.)"""

    def __init__(self, refusals: int, message: str = jobsubmit.NO_AGENT) -> None:
        self.refusals, self.message, self.calls = refusals, message, 0

    def submit_job(self, **job: object) -> str:
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.message}.")
        return str(job["submission_id"])


def test_submit_waits_for_the_job_agent_and_nothing_else(monkeypatch):
    monkeypatch.setattr(jobsubmit.time, "sleep", lambda s: None)
    client = _AgentStartingClient(refusals=2)
    assert jobsubmit.submit_when_agent_ready(client, submission_id="a") == "a"
    assert client.calls == 3
    other = _AgentStartingClient(refusals=1, message="Job with submission_id a already exists")
    with pytest.raises(RuntimeError, match="already exists"):
        jobsubmit.submit_when_agent_ready(other, submission_id="a")
    assert other.calls == 1  # any other refusal is not retried
    monkeypatch.setattr(jobsubmit, "AGENT_WAIT_S", 0.0)
    never = _AgentStartingClient(refusals=99)
    with pytest.raises(RuntimeError, match=jobsubmit.NO_AGENT):
        jobsubmit.submit_when_agent_ready(never, submission_id="a")
    assert never.calls == 1
