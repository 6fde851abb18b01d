"""``mmfp serve``: run the store's HTTP service (``jobs.serve.app``) until Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from jobs.errors import user_errors
from jobs.options import DEFAULT_STORE, RayAddressOpt, StoreOpt, key_values
from jobs.report import console
from pipelines.errors import MmfpError

TOKEN_ENV = "MMFP_SERVE_TOKEN"


@user_errors
def serve_command(
    store: StoreOpt = DEFAULT_STORE,
    feature_set: Annotated[
        list[str] | None, typer.Option(help="Serve only these feature sets (repeatable).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas, each holding the matrices.")] = 1,
    token_file: Annotated[
        Path | None,
        typer.Option(help=f"File holding the bearer token (else ${TOKEN_ENV}; none: no auth)."),
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(min=0.1, help="How often a replica looks for a newer version.")
    ] = 5.0,
    storage_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the store (repeatable).")
    ] = None,
    trust_store_code: Annotated[
        bool, typer.Option(help="Import encoders the store names by import path.")
    ] = False,
    encoder_gpus: Annotated[
        float,
        typer.Option(min=0, help="GPUs for the query encoders' replica (0: they run on CPU)."),
    ] = 0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Port of the Prometheus metrics (Ray Serve's and mmfp's) of a local run.",
        ),
    ] = None,  # fmt: skip
    address: RayAddressOpt = None,
) -> None:
    """Serve the store over HTTP (Ray Serve): search, embed, online features, samples, media."""
    import ray
    from ray import serve

    from features.storage import normalize_uri
    from jobs.runtime import cluster_address, init_ray
    from jobs.serve.app import store_app

    token = read_token(token_file)
    if metrics_port is not None and cluster_address(address):
        raise MmfpError("--metrics-port is for a local run; a cluster's nodes export metrics "
                        "on the port `ray start --metrics-export-port` gave them")  # fmt: skip
    init_ray(address, **({"_metrics_export_port": metrics_port} if metrics_port else {}))
    gpus = ray.cluster_resources().get("GPU", 0)
    if encoder_gpus > gpus and not cluster_address(address):  # a cluster may scale up to them
        raise MmfpError(f"--encoder-gpus {encoder_gpus:g}: this machine's Ray has {gpus:g} GPUs")
    serve.start(http_options={"host": host, "port": port})
    app = store_app(
        normalize_uri(store),
        storage_options=key_values(storage_option, "--storage-option"),
        feature_sets=feature_set or None,
        token=token,
        poll_seconds=poll_seconds,
        trust_store_code=trust_store_code,
        replicas=replicas,
        encoder_gpus=encoder_gpus,
    )
    serve.run(app, name="mmfp", route_prefix="/")
    auth = "bearer token required" if token else "no token: anyone who can connect may read"
    console.print(f"serving {store} at http://{host}:{port} ({auth}); API docs at /docs")
    if metrics_port is not None:
        node = ray.util.get_node_ip_address()
        console.print(f"Prometheus metrics at http://{node}:{metrics_port}/metrics")
    stop = threading.Event()  # Ctrl-C, or SIGTERM from systemd / docker stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    console.print("stopping")
    serve.shutdown()


def read_token(path: Path | None) -> str | None:
    """The token from ``path`` or ``$MMFP_SERVE_TOKEN``: one word, never printed."""
    raw = path.read_text(encoding="utf-8") if path else os.environ.get(TOKEN_ENV)
    if raw is None:
        return None
    token = raw.strip()
    if not token or any(c.isspace() for c in token):
        where = str(path) if path else f"${TOKEN_ENV}"
        raise MmfpError(f"{where}: the token must be one word (no spaces or line breaks)")
    return token
