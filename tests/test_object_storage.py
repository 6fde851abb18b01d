"""Sources and the store on S3, against a real local S3-compatible server (moto)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.storage import redact
from features.store import FeatureStore
from pipelines.build import build
from pipelines.spec import parse_spec

boto3 = pytest.importorskip("boto3")

BUCKET = "mmfp-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_options():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    options = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    client = boto3.client(
        "s3",
        endpoint_url=options["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield options, client
    proc.terminate()
    proc.wait(timeout=10)


def _upload(client, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.mark.usefixtures("ray_session")
def test_build_from_s3_sources_into_an_s3_store(s3_options, corpus):
    options, client = s3_options
    _upload(client, Path(corpus["photos"]), "corpus/photos")
    _upload(client, Path(corpus["catalog"]).parent, "corpus/catalog")
    _upload(client, Path(corpus["shards"][0]).parent, "corpus/shards")
    base = f"s3://{BUCKET}/corpus"
    spec = parse_spec(
        {
            "sources": [
                {
                    "kind": "directory",
                    "uri": f"{base}/photos",
                    "class_folders": True,
                    "storage_options": options,
                },
                {
                    "kind": "manifest",
                    "uri": f"{base}/catalog/manifest.jsonl",
                    "storage_options": options,
                },
                {"kind": "webdataset", "uri": f"{base}/shards", "storage_options": options},
            ],
            "store": {"uri": f"s3://{BUCKET}/store", "storage_options": options},
        }
    )
    result = build(spec)
    expected = sum(corpus["counts"].values())
    assert result.counts["samples"] == expected
    assert result.counts["quarantined"] == 0
    store = FeatureStore(f"s3://{BUCKET}/store", storage_options=options)
    assert store.tables() == ["_inputs", "_runs", "_stages", "quarantine", "samples"]
    assert store.to_arrow("samples").num_rows == expected
    assert store.table("samples", columns=["sample_id"]).count() == expected
    keys = [
        o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="store/samples/")["Contents"]
    ]
    assert any(k.endswith(".parquet") for k in keys)
    assert any("_delta_log" in k for k in keys)
    _assert_secret_stored_nowhere(client, options["AWS_SECRET_ACCESS_KEY"], store)
    # a rebuild on object storage is idempotent too
    again = build(spec)
    assert again.counts["samples"] == 0
    assert not again.changed


def _assert_secret_stored_nowhere(client, secret: str, store: FeatureStore) -> None:
    """No object the build wrote (data files, logs, run records) holds the secret key."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="store/")
    names = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert len(names) > 10
    for name in names:
        body = client.get_object(Bucket=BUCKET, Key=name)["Body"].read()
        assert secret.encode() not in body, name
    for table in store.tables():  # decoded too, in case a Parquet page hides the bytes
        assert secret not in str(store.to_arrow(table).to_pylist()), table


def test_secrets_never_reach_the_spec_hash_or_messages():
    options = {"AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_REGION": "eu-west-1"}
    spec = parse_spec(
        {"sources": [{"kind": "directory", "uri": "s3://b/x", "storage_options": options}]}
    )
    assert redact(options) == {"AWS_SECRET_ACCESS_KEY": "***", "AWS_REGION": "eu-west-1"}
    other = parse_spec(
        {
            "sources": [
                {
                    "kind": "directory",
                    "uri": "s3://b/x",
                    "storage_options": {**options, "AWS_SECRET_ACCESS_KEY": "other"},
                }
            ]
        }
    )
    assert spec.spec_hash() == other.spec_hash()
