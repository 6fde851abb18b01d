"""``mmfp serve``: the Ray Serve app on the session's local Ray, over loopback HTTP.

Every route, with and without the token, bad input as one-line 4xx JSON, and a version
swap under a concurrent request loop that loses no request."""

from __future__ import annotations

import base64
import socket
import threading
import time

import numpy as np
import pytest
import requests

from features.store import FeatureStore
from jobs.demo.synthetic_features import write_synthetic_feature_set

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_http(ray_session):
    """Ray Serve's proxy on 127.0.0.2 (loopback; Ray rewrites 127.0.0.1)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.2", "port": port})
    yield f"http://127.0.0.2:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def service(serve_http, demo):
    """The demo store served with a token (the demo's `clip` and `inputs` feature sets)."""
    from ray import serve

    from jobs.serve.app import StoreService

    workdir, _ = demo
    app = StoreService.bind(str(workdir / "store"), token=TOKEN, poll_seconds=0.5)
    serve.run(app, name="demo", route_prefix="/demo")
    store = FeatureStore(str(workdir / "store"))
    return f"{serve_http}/demo", store


def _a_sample(store: FeatureStore) -> dict:
    rows = store.to_arrow("samples", columns=["sample_id", "image", "audio", "image_format"])
    return next(r for r in rows.to_pylist() if r["image"] is not None)


def test_healthz_needs_no_token_and_names_the_served_versions(service):
    url, store = service
    body = requests.get(f"{url}/healthz", timeout=30).json()
    assert body["status"] == "ok"
    assert body["feature_sets"]["clip"] == store.version("features/clip")


def test_every_other_route_needs_the_token(service):
    url, _ = service
    for method, path in (("get", "/tables"), ("post", "/search"), ("get", "/samples/x")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            reply = requests.request(method, f"{url}{path}", headers=headers, timeout=30)
            assert reply.status_code == 401, (path, headers)
            assert TOKEN not in reply.text
            assert list(reply.json()) == ["error"]


def test_search_by_text_image_vector_and_stored_id(service):
    url, store = service
    sample = _a_sample(store)
    queries = [
        {"text": "a red circle"},
        {"image": base64.b64encode(sample["image"]).decode()},
        {"sample_id": sample["sample_id"]},
    ]
    for query in queries:
        body = {"feature_set": "clip", "column": "image_emb", "k": 3, **query}
        reply = requests.post(f"{url}/search", json=body, headers=AUTH, timeout=60)
        assert reply.status_code == 200, reply.text
        hits = reply.json()["hits"]
        assert len(hits) == 3
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert {"sample_id", "view", "split", "label", "source", "text"} <= set(hits[0])
    # the service's answer is the library's: search by the stored vector of the sample
    from features.search import search

    want = search(store, "clip", column="image_emb", sample_id=sample["sample_id"], k=3)
    got = requests.post(f"{url}/search", headers=AUTH, timeout=60, json={
        "feature_set": "clip", "column": "image_emb", "k": 3, "sample_id": sample["sample_id"],
    }).json()["hits"]  # fmt: skip
    assert [h["sample_id"] for h in got] == want.column("sample_id").to_pylist()
    np.testing.assert_allclose([h["score"] for h in got], want.column("score").to_numpy(), 1e-5)
    filtered = requests.post(f"{url}/search", headers=AUTH, timeout=60, json={
        "feature_set": "clip", "column": "image_emb", "k": 50, "text": "a red circle",
        "where": "split = 'test'",
    }).json()["hits"]  # fmt: skip
    assert filtered
    assert {h["split"] for h in filtered} == {"test"}


def test_embed_features_samples_media_and_tables(service):
    url, store = service
    sample = _a_sample(store)
    sid = sample["sample_id"]
    emb = requests.post(f"{url}/embed", headers=AUTH, timeout=60,
                        json={"feature_set": "clip", "text": "a red circle"}).json()  # fmt: skip
    assert emb["modality"] == "text"
    assert abs(np.linalg.norm(emb["embedding"]) - 1) < 1e-4
    features = requests.get(f"{url}/features/clip", params={"ids": f"{sid},nope"},
                            headers=AUTH, timeout=30).json()  # fmt: skip
    assert [r["sample_id"] for r in features["rows"]] == [sid]  # the unknown id is left out
    assert len(features["rows"][0]["image_emb"]) > 0
    row = requests.get(f"{url}/samples/{sid}", headers=AUTH, timeout=30).json()
    assert row["sample_id"] == sid
    assert "image" not in row  # bytes only through /media
    media = requests.get(f"{url}/media/{sid}/image", headers=AUTH, timeout=30)
    assert media.status_code == 200
    assert media.content == sample["image"]
    assert media.headers["content-type"].startswith("image/")
    tables = requests.get(f"{url}/tables", headers=AUTH, timeout=30).json()
    assert {"samples", "features/clip"} <= {t["table"] for t in tables}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("post", "/search", {"feature_set": "clip"}, 422, "exactly one of"),
        ("post", "/search", {"feature_set": "nope", "text": "x"}, 404, "not served"),
        ("post", "/search", {"feature_set": "clip", "column": "image_emb", "vector": [1.0]},
         400, "must be"),
        ("post", "/search", {"feature_set": "clip", "column": "image_emb", "image": "%%"},
         400, "not base64"),
        ("post", "/search", {"feature_set": "clip", "column": "image_emb",
                             "image": base64.b64encode(b"not an image").decode()},
         400, "could not be decoded"),
        ("post", "/search", {"feature_set": "clip", "column": "image_emb", "text": "x",
                             "where": "split = 'test'; DROP TABLE samples"}, 400, "filter"),
        ("post", "/search", {"feature_set": "clip", "column": "nope", "text": "x"}, 404,
         "no embedding column"),
        ("get", "/samples/nope", None, 404, "no sample"),
        ("get", "/media/nope/image", None, 404, "no sample"),
        ("get", "/media/x/video", None, 422, "modality"),
    ],
)  # fmt: skip
def test_bad_requests_are_one_line_json_errors(service, method, path, body, status, message):
    url, _ = service
    reply = requests.request(method, f"{url}{path}", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error
    assert "\n" not in error
    assert "Traceback" not in reply.text


def test_an_oversized_body_is_refused_before_it_is_read(service):
    url, _ = service
    huge = b"x" * (33 * 2**20)
    reply = requests.post(f"{url}/search", data=huge, headers={**AUTH, "Content-Type":
                          "application/json"}, timeout=60)  # fmt: skip
    assert reply.status_code == 413


def test_a_new_version_is_swapped_in_without_losing_a_request(serve_http, tmp_path):
    """Requests run in a loop while a new version is committed: every one succeeds, and
    the service moves to the new version by itself."""
    from ray import serve

    from jobs.serve.app import StoreService

    store = FeatureStore(str(tmp_path / "store"))
    first = write_synthetic_feature_set(store, "syn", per_class=4, files=1)
    serve.run(StoreService.bind(store.uri, poll_seconds=0.2), name="swap", route_prefix="/swap")
    url = f"{serve_http}/swap"
    query = {"feature_set": "syn", "column": "image_emb", "k": 5, "vector": [1.0] * 48}
    seen, failures, stop = set(), [], threading.Event()

    def loop() -> None:
        while not stop.is_set():
            reply = requests.post(f"{url}/search", json=query, timeout=60)
            if reply.status_code != 200:
                failures.append(reply.text)
            else:
                seen.add(reply.json()["version"])

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        time.sleep(1.0)
        second = write_synthetic_feature_set(store, "syn", per_class=4, files=1, seed=7)
        deadline = time.monotonic() + 60
        while second not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
        serve.delete("swap")
    assert not failures
    assert {first, second} <= seen


def test_mmfp_serve_runs_the_app_from_the_command_line(tmp_path):
    """The one command a user runs: its own local Ray, loopback, a token from a file;
    SIGTERM (docker stop, systemd) stops it, as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import sys

    store = FeatureStore(str(tmp_path / "store"))
    write_synthetic_feature_set(store, "syn", per_class=2, files=1)
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = _free_port()
    command = [sys.executable, "-m", "jobs", "serve", "--store", store.uri, "--host", "127.0.0.2",
               "--port", str(port), "--token-file", str(tmp_path / "token")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.2:{port}"
    try:
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.5)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        assert health["feature_sets"] == {"syn": store.version("features/syn")}
        assert requests.get(f"{url}/tables", timeout=10).status_code == 401
        assert requests.get(f"{url}/tables", headers=AUTH, timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    output = "".join(lines)
    assert TOKEN not in output  # never printed
    assert "bearer token required" in output
    assert "stopping" in output
    assert proc.returncode == 0


def test_a_token_must_be_one_word(tmp_path):
    from jobs.cli_serve import read_token
    from pipelines.errors import MmfpError

    (tmp_path / "t").write_text("two\nlines")
    with pytest.raises(MmfpError, match="one word"):
        read_token(tmp_path / "t")
    (tmp_path / "t").write_text("  fine-token \n")
    assert read_token(tmp_path / "t") == "fine-token"


def test_the_serve_config_file_builds_the_app(tmp_path, monkeypatch):
    """``deploy/serve.yaml`` names an importable builder whose args make the deployment."""
    import importlib
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy/serve.yaml").read_text())
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("MMFP_SERVE_TOKEN", TOKEN)
    built = builder({**app["args"], "store": str(tmp_path)})
    assert type(built).__name__ == "Application"
    assert app["deployments"][0]["name"] == "StoreService"
    monkeypatch.delenv("MMFP_SERVE_TOKEN")
    with pytest.raises(Exception, match="MMFP_SERVE_TOKEN"):
        builder({**app["args"], "store": str(tmp_path)})
