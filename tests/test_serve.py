"""``mmfp serve``: the Ray Serve app on the session's local Ray, over loopback HTTP.

Every route, with and without the token, bad input as one-line 4xx JSON, and a version
swap under a concurrent request loop that loses no request."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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

    from jobs.serve.app import store_app

    workdir, _ = demo
    app = store_app(str(workdir / "store"), token=TOKEN, poll_seconds=0.5)
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
    routes = [("get", "/tables"), ("post", "/search"), ("get", "/samples/x"), ("get", "/samples"),
              ("get", "/overview"), ("get", "/quarantine"), ("get", "/runs"), ("get", "/map/clip"),
              ("get", "/samples/x/views"), ("get", "/quality")]  # fmt: skip
    for method, path in routes:
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
        ("get", "/media/nope/image", None, 404, "has no image"),
        ("get", "/media/x/video", None, 422, "modality"),
        ("get", "/media/x/audio?view=-1", None, 422, "view"),
        ("get", "/samples?limit=0", None, 422, "limit"),
        ("get", "/samples?offset=-1", None, 422, "offset"),
        ("get", "/quarantine?limit=100000", None, 422, "limit"),
        ("get", "/map/nope", None, 404, "not served"),
        ("get", "/map/clip?points=1", None, 422, "points"),
        ("get", "/map/inputs", None, 404, "no embedding column"),
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
    assert "request body over" in reply.json()["error"]

    def chunks():  # streamed: no Content-Length to refuse it by
        for _ in range(33):
            yield b"x" * 2**20

    reply = requests.post(f"{url}/search", data=chunks(), headers={**AUTH, "Content-Type":
                          "application/json"}, timeout=60)  # fmt: skip
    assert reply.status_code == 413
    assert "request body over" in reply.json()["error"]
    # Starlette's own errors are one-line JSON too; every reply says the replica's time
    reply = requests.get(f"{url}/no-such-route", headers=AUTH, timeout=60)
    assert (reply.status_code, reply.json()) == (404, {"error": "Not Found"})
    assert re.fullmatch(r"app;dur=\d+\.\d\d", reply.headers["server-timing"])


def test_a_new_version_is_swapped_in_without_losing_a_request(serve_http, tmp_path):
    """Requests run in a loop while a new version is committed: every one succeeds, and
    the service moves to the new version by itself."""
    from ray import serve

    from features.ann import build_index
    from jobs.serve.app import store_app

    store = FeatureStore(str(tmp_path / "store"))
    first = write_synthetic_feature_set(store, "syn", per_class=4, files=1)
    build_index(store, "syn", "image_emb", queries=8)
    serve.run(store_app(store.uri, poll_seconds=0.2), name="swap", route_prefix="/swap")
    url = f"{serve_http}/swap"
    query = {"feature_set": "syn", "column": "image_emb", "k": 5, "vector": [1.0] * 48}
    exact, ann = (requests.post(f"{url}/search", json={**query, "method": m}, timeout=60).json()
                  for m in ("exact", "ann"))  # fmt: skip
    assert ann["method"] == "ann"
    assert {h["sample_id"] for h in ann["hits"]} == {h["sample_id"] for h in exact["hits"]}
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
        no_index = requests.post(f"{url}/search", json={**query, "method": "ann"}, timeout=60)
    finally:
        stop.set()
        worker.join()
        serve.delete("swap")
    assert not failures
    assert {first, second} <= seen
    assert no_index.status_code == 400  # the new version has no index yet: say how to build one
    assert "mmfp store index syn --column image_emb" in no_index.json()["error"]


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
    port, metrics_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "jobs", "serve", "--store", store.uri, "--host", "127.0.0.2",
               "--port", str(port), "--token-file", str(tmp_path / "token"),
               "--metrics-port", str(metrics_port)]  # fmt: skip
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
        metrics = next(line for line in lines if "Prometheus metrics at" in line).split()[-1]
        assert metrics.endswith(f":{metrics_port}/metrics")
        assert requests.get(metrics, timeout=10).status_code == 200
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
    from jobs.serve.app import QueryEncoders, StoreService

    assert {d["name"] for d in app["deployments"]} == {StoreService.name, QueryEncoders.name}
    monkeypatch.delenv("MMFP_SERVE_TOKEN")
    with pytest.raises(Exception, match="MMFP_SERVE_TOKEN"):
        builder({**app["args"], "store": str(tmp_path)})


def test_the_pages_the_browser_view_reads(service):
    """Overview counts, sample and quarantine pages, a sample's views and their media, the
    run history and the embedding map, each against the store itself."""
    url, store = service
    get = lambda path, **params: requests.get(f"{url}{path}", params=params, headers=AUTH,  # noqa: E731
                                              timeout=60).json()  # fmt: skip
    samples = store.to_arrow("samples", columns=["sample_id", "split", "label"])
    overview = get("/overview")
    assert sum(r["samples"] for r in overview["labels"]) == samples.num_rows
    assert overview["served"]["clip"]["columns"] == ["image_emb", "text_emb"]
    quarantine = store.to_arrow("quarantine", columns=["error_type"])
    assert sum(r["inputs"] for r in overview["quarantine"]) == quarantine.num_rows
    quality = get("/quality")  # the demo spec filters nothing out: every sample was measured
    per_split = {s: p["n"] for s, p in quality["stats"]["text_chars"]["splits"].items()}
    with_text = samples.join(store.to_arrow("samples", columns=["sample_id", "text"]), "sample_id")
    with_text = with_text.filter(pc.is_valid(pc.field("text")))
    assert per_split == dict(Counter(with_text.column("split").to_pylist()))

    train = [r["sample_id"] for r in samples.to_pylist() if r["split"] == "train"]
    first, second = get("/samples", split="train", limit=5), get("/samples", split="train",
                                                                 offset=5, limit=5)  # fmt: skip
    assert first["total"] == len(train)
    assert [r["sample_id"] for r in first["rows"] + second["rows"]] == sorted(train)[:10]
    assert "image" not in first["rows"][0]
    injected = get("/samples", label="x' OR '1'='1")  # a bound parameter, not SQL
    assert injected == {"total": 0, "rows": []}

    views = store.to_arrow("views", columns=["sample_id", "view", "image"]).to_pylist()
    view = next(v for v in views if v["image"] is not None)
    listed = get(f"/samples/{view['sample_id']}/views")
    assert view["view"] in [v["view"] for v in listed]
    media = requests.get(f"{url}/media/{view['sample_id']}/image", params={"view": view["view"]},
                         headers=AUTH, timeout=30)  # fmt: skip
    assert media.content == view["image"]
    assert media.headers["content-type"] == "image/png"

    assert get("/quarantine", limit=500)["total"] == quarantine.num_rows
    assert [r["run_id"] for r in get("/runs")] == store.to_arrow("_runs").sort_by(
        [("started_at", "descending")]).column("run_id").to_pylist()  # fmt: skip
    projected = get("/map/clip", column="image_emb", points=20)
    assert len(projected["points"]) == len(projected["sample_id"]) == 20
    assert set(projected["sample_id"]) <= set(samples.column("sample_id").to_pylist())
    assert projected == get("/map/clip", column="image_emb", points=20)  # the same map each time


def test_request_latency_per_route_reaches_prometheus(service):
    """Each replica records ``mmfp_serve_request_ms`` per route template and status; Ray's
    metrics agent exports it with Serve's own metrics."""
    import ray

    url, _ = service
    for _ in range(3):
        requests.get(f"{url}/samples/nope", headers=AUTH, timeout=30)
    node = next(n for n in ray.nodes() if n["Alive"])
    metrics = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        text = requests.get(metrics, timeout=10).text
        lines = [line for line in text.splitlines() if "mmfp_serve_request_ms_count{" in line]
        if any('route="/samples/{sample_id}"' in line and 'status="404"' in line for line in lines):
            break
        time.sleep(2)
    else:
        pytest.fail(f"no per-route latency in Ray's metrics: {lines}")


CHROMIUM = os.environ.get("MMFP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [  # headless, no sandbox (root in CI), and no calls home on a closed network
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip


def test_the_browser_view_in_headless_chromium(service, tmp_path):
    """The page in a real Chromium: it asks for the token, each tab loads what the store
    holds, a stored clip plays, "find similar" and the map open the known samples, and
    the console stays clean. Screenshots go to the test's tmp dir."""
    from playwright.sync_api import sync_playwright

    from features.search import search

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run tools/install-browser (or set MMFP_CHROMIUM)")
    url, store = service
    samples = store.to_arrow("samples", columns=["sample_id", "audio", "label"]).to_pylist()
    with_audio = sorted(r["sample_id"] for r in samples if r["audio"] is not None)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/")
        page.wait_for_selector("#login.on")  # a token is required, so it asks first
        page.fill("#token", TOKEN)
        page.click("#login button")
        page.wait_for_selector("#overview h2")
        tables = page.locator("#overview table").first.inner_text()
        assert "samples" in tables
        assert "features/clip" in tables
        page.screenshot(path=tmp_path / "overview.png", full_page=True)

        page.click("#tab-samples")
        page.wait_for_selector("#s-grid .card img[src^='blob:']")
        assert page.locator("#s-grid .card").count() == min(48, len(samples))
        sid = with_audio[0]  # samples are listed by id: the first with audio is on page 1
        page.click(f"#s-grid .card[data-sample='{sid}']")
        page.wait_for_selector("#detail.on audio[src^='blob:']")
        played = page.evaluate("""async () => {
            const audio = document.querySelector('#detail audio');
            await audio.play();
            await new Promise((r) => setTimeout(r, 300));
            const bytes = (await (await fetch(audio.src)).arrayBuffer()).byteLength;
            return {paused: audio.paused, time: audio.currentTime, bytes};
        }""")
        stored = next(r["audio"] for r in samples if r["sample_id"] == sid)
        assert played["time"] > 0, played  # it decoded and played the stored clip
        assert played["bytes"] == len(stored)
        views = store.to_arrow("views", columns=["sample_id"]).column("sample_id").to_pylist()
        assert page.locator("#detail .views .card").count() == 1 + views.count(sid)
        page.screenshot(path=tmp_path / "sample.png")

        want = search(store, "clip", column="image_emb", sample_id=sid, k=1)
        page.click("#detail button:has-text('find similar')")
        page.wait_for_selector("#x-grid .card")
        first = page.get_attribute("#x-grid .card >> nth=0", "data-sample")
        assert first == want.column("sample_id")[0].as_py()  # the known neighbour
        page.fill("#x-text", "a red circle")
        page.click("#x-form button")
        page.wait_for_function("document.querySelector('#x-info').textContent.includes('hits')")
        page.screenshot(path=tmp_path / "search.png")

        page.click("#tab-quarantine")
        page.wait_for_selector("#q-table tr:nth-child(2)")
        rows = page.locator("#q-table tr").count() - 1
        assert rows == store.to_arrow("quarantine", columns=["uri"]).num_rows

        page.click("#tab-map-tab")
        page.wait_for_function("state.map && state.map.screen")
        x, y, picked = page.evaluate("[...state.map.screen[3], state.map.sample_id[3]]")
        box = page.locator("#map").bounding_box()
        scale = box["width"] / page.evaluate("document.querySelector('#map').width")
        page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
        page.wait_for_selector("#detail.on h2")
        assert picked in page.inner_text("#detail table")
        page.screenshot(path=tmp_path / "map.png")

        page.click("#detail button:has-text('close')")
        hostile = '<img src=x onerror="window.pwned=1">'  # a caption reaches the page as text
        shown = page.evaluate("""(text) => {
            const node = card({sample_id: "x", text, modalities: []});
            document.body.append(node);
            return [node.querySelector(".meta").textContent, node.querySelectorAll("img").length];
        }""", hostile)  # fmt: skip
        assert shown == [hostile, 0]  # no element was made of it
        page.wait_for_timeout(200)
        assert page.evaluate("window.pwned") is None
        page.click("#tab-quality")
        blur = page.locator("#qs-grid figure[data-stat='image_blur']")
        blur.wait_for()
        splits = set(store.to_arrow("samples", columns=["split"]).column("split").to_pylist())
        assert blur.locator("svg polyline").count() == len(splits)  # one outline per split
        measured = sum(int(n) for n in re.findall(r"\((\d+)\):", blur.inner_text()))
        assert measured == store.to_arrow("samples").filter(pc.is_valid(pc.field("image"))).num_rows
        page.screenshot(path=tmp_path / "quality.png", full_page=True)
        page.click("#tab-runs")
        page.wait_for_selector("#r-table tr:nth-child(2)")
        assert page.locator("#r-table tr").count() - 1 == store.to_arrow("_runs").num_rows
        browser.close()
    assert errors == []
    assert {f.name for f in tmp_path.glob("*.png")} == {
        "overview.png", "sample.png", "search.png", "map.png", "quality.png"}  # fmt: skip


def test_concurrent_queries_are_embedded_in_batches(service):
    """Sixteen text queries at once reach the encoder deployment together: it runs them
    in fewer, larger batches, and a batched embedding is the one a lone query gets."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    url, _ = service
    texts = [f"a red circle number {i}" for i in range(16)]

    def embed(text: str) -> list[float]:
        body = {"feature_set": "clip", "text": text}
        return requests.post(f"{url}/embed", json=body, headers=AUTH, timeout=60).json()[
            "embedding"
        ]

    encoders = serve.get_deployment_handle("QueryEncoders", app_name="demo")
    before = encoders.stats.remote().result()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(embed, texts))
    after = encoders.stats.remote().result()
    assert after["queries"] - before["queries"] == 16
    assert after["batches"] - before["batches"] < 16  # some queries shared a batch
    assert after["largest"] > 1
    alone = embed(texts[5])
    np.testing.assert_allclose(together[5], alone, atol=1e-5)


def test_serve_refuses_what_it_cannot_start(ray_session, tmp_path):
    """Asking for GPUs a local Ray lacks, or a metrics port on a cluster it only joins,
    is a one-line error before anything is deployed."""
    from typer.testing import CliRunner

    from jobs.cli import app

    store = str(tmp_path / "store")
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--store", store, "--encoder-gpus", "1"])
    assert result.exit_code != 0
    assert "--encoder-gpus 1: this machine's Ray has 0 GPUs" in result.output
    result = runner.invoke(app, ["serve", "--store", store, "--metrics-port", "9999",
                                 "--address", "127.0.0.2:6379"])  # fmt: skip
    assert result.exit_code != 0
    assert "--metrics-port is for a local run" in result.output
    assert "Traceback" not in result.output


def test_hits_show_the_held_samples_and_follow_a_new_samples_version(demo, tmp_path):
    """A replica attaches each hit's sample columns from memory (what a read of the
    table gives), and a commit to ``samples`` alone is picked up by the next poll."""
    import shutil

    from features.search import ResidentSamples, _with_samples
    from jobs.serve.resident import ServedStore

    workdir, _ = demo
    shutil.copytree(workdir / "store", tmp_path / "store")  # the demo store stays as it is
    store = FeatureStore(str(tmp_path / "store"))
    served = ServedStore(store, ["clip"])
    column = served.get("clip").column("image_emb")
    q = column.matrix[0]
    hits = column.search(store, q, 10, samples=served.samples)
    assert hits.equals(column.search(store, q, 10))
    keys = hits.select(["sample_id", "view", "score", "split", "label"])
    ids = ["nope", *keys["sample_id"].to_pylist()[1:]]
    unknown = keys.set_column(0, "sample_id", pa.array(ids))
    assert served.samples.attach(unknown).equals(_with_samples(store, unknown))
    assert ResidentSamples.load(FeatureStore(str(tmp_path / "empty"))).attach(unknown)[
        "text"].null_count == 10  # fmt: skip

    first = hits["sample_id"][0].as_py()
    store.delta("samples").update({"text": "'renamed'"}, predicate=f"sample_id = '{first}'")
    assert served.refresh() == ["samples"]
    again = column.search(store, q, 10, samples=served.samples)
    assert again["text"][0].as_py() == "renamed"


def test_concurrent_exact_searches_each_get_their_own_answer(service):
    """Exact queries that arrive together share one product in the replica: each still
    gets its own top-k, filter and exclusion, as the library gives them one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from features.search import search

    url, store = service
    rng = np.random.default_rng(3)
    vectors = [rng.standard_normal(12) for _ in range(12)]  # the demo's clip is 12-d
    sid = _a_sample(store)["sample_id"]
    bodies = [{"vector": v.tolist(), "k": 3 + i % 4, **({"where": "split = 'train'"} if i % 3
               else {})} for i, v in enumerate(vectors)] + [{"sample_id": sid, "k": 5}]  # fmt: skip

    def ask(body: dict) -> list[str]:
        body = {"feature_set": "clip", "column": "image_emb", **body}
        reply = requests.post(f"{url}/search", headers=AUTH, json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        return [h["sample_id"] for h in reply.json()["hits"]]

    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(ask, bodies))
    for body, ids in zip(bodies, got, strict=True):
        query = {"vector": body["vector"]} if "vector" in body else {"sample_id": sid}
        want = search(store, "clip", column="image_emb", k=body["k"], where=body.get("where"),
                      **query)  # fmt: skip
        assert ids == want.column("sample_id").to_pylist()
