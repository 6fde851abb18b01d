"""Serve benchmark (issue 15): exact top-10 through ``mmfp serve`` against bare NumPy.

    python benchmarks/serve.py [--rows 1000000] [--dim 384] [--queries 50]
                               [--concurrency 1,8,32] [--replicas 1] [--ann]

One run, one machine. A feature set of ``--rows`` unit vectors, and a ``samples`` table
with a caption and a source per row (so each hit carries its sample's columns, as in a
real store), are written to a temporary store and served by ``jobs.serve.app.store_app``
on a local Ray (Serve's proxy on 127.0.0.2). Then:

- **latency**: each query is timed bare (``X @ q`` + top 10 on the same in-memory
  float32 matrix, in this process), then each through the service (HTTP POST
  ``/search`` with the vector, keep-alive; a second pass, so this process's BLAS
  threads are idle); p50 / p99 of both and the median of the per-query ratios
  (target <= 1.5, the HTTP hop included);
- **throughput** at each ``--concurrency`` (threads, each its own connection): queries
  per second, p50 / p99 latency;
- **ann** (``--ann``): the version's faiss IVF index (``build_index``, nprobe tuned to
  recall@10 >= 0.95) through the service: p50 / p99 and recall@10 against bare exact
  top-10 (target p50 <= 5 ms at recall >= 0.95);
- **swap**: seconds from a commit of a new version to the service answering with it
  (the replicas poll every 0.5 s here);
- **memory**: the replicas' resident memory against the matrix's size.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import requests  # noqa: E402

from benchmarks.search import CHUNK, bare_top10, make_vectors, write_store  # noqa: E402
from features.ann import build_index  # noqa: E402
from features.commit import RunCommits, write_file  # noqa: E402
from features.schema import SAMPLES, conform  # noqa: E402
from features.store import FeatureStore  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def replica_rss(deployment: str = "StoreService") -> list[int]:
    """Resident bytes of each replica of ``deployment`` (its processes' command line
    names it: ``ray::ServeReplica:<app>:<deployment>``)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if f"ServeReplica:bench:{deployment}".encode() in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                found.append(int(status.split("VmRSS:")[1].split()[0]) * 1024)
        except (OSError, IndexError, ValueError):
            continue
    return found


def write_samples(store: FeatureStore, rows: int) -> None:
    """The samples behind the vectors: id, source, uri and a caption each, one commit."""
    store.ensure_table("samples", SAMPLES)
    uri = store.table_uri("samples")
    actions = []
    for start in range(0, rows, CHUNK):
        ids = range(start, min(start + CHUNK, rows))
        table = conform(pa.table({
            "sample_id": [f"s{i:08d}" for i in ids],
            "source": ["bench"] * len(ids),
            "source_uri": [f"s3://bench/captions/{i:08d}.txt" for i in ids],
            "split": [("train", "val", "test")[i % 3] for i in ids],
            "modalities": [["text"]] * len(ids),
            "text": [f"caption number {i} of the benchmark corpus" for i in ids],
        }), SAMPLES)  # fmt: skip
        actions.append(write_file(uri, {}, table, "bench"))
    commits = RunCommits(store, "bench")
    commits.add("samples", actions)
    commits.commit("samples")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ann", action="store_true", help="also build the index and time ANN")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from jobs.serve.app import store_app

    # queries from the same clusters as the rows, held out of the store (as ANN's tuning
    # queries are): a query near no stored row would measure another distribution
    both = make_vectors(argparse.Namespace(**{**vars(args), "rows": args.rows + args.queries}))
    vectors, queries = both[: args.rows], both[args.rows :]
    with tempfile.TemporaryDirectory(prefix="mmfp-bench-serve-") as tmp:
        store = write_store(Path(tmp) / "store", vectors, "sink")
        write_samples(store, args.rows)
        if args.ann:
            t0 = time.perf_counter()
            built = build_index(store, "bench", queries=min(200, args.rows // 10))
            took = time.perf_counter() - t0
            print(f"index: nlist {built['nlist']}, nprobe {built['nprobe']}, recall@10 at "
                  f"build {built['recall_at_10']:.3f}, {took:.1f} s")  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            port = s.getsockname()[1]
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.2", "port": port})
        t0 = time.perf_counter()
        app = store_app(store.uri, poll_seconds=0.5, replicas=args.replicas)
        serve.run(app, name="bench", route_prefix="/")
        url = f"http://127.0.0.2:{port}"
        print(f"served {args.rows:,} x {args.dim} in {time.perf_counter() - t0:.1f} s "
              f"({args.replicas} replica(s))")  # fmt: skip
        session = requests.Session()

        inside: dict[str, list[float]] = {"exact": [], "ann": []}  # the replica's own time

        def ask(q: np.ndarray, http: requests.Session = session, method: str = "exact") -> list:
            body = {"feature_set": "bench", "k": 10, "vector": q.tolist(), "method": method}
            reply = http.post(f"{url}/search", json=body, timeout=120)
            reply.raise_for_status()
            took = reply.headers["server-timing"].removeprefix("app;dur=")
            inside[method].append(float(took) / 1e3)
            return [h["sample_id"] for h in reply.json()["hits"]]

        def split_time(method: str, total: list[float]) -> str:
            """The replica's p50 (Server-Timing) and the rest of the p50: the HTTP hop."""
            replica = percentile(inside[method][-len(total) :], 50)
            return (f"in the replica p50 {replica * 1e3:.2f} ms, the HTTP hop "
                    f"{(percentile(total, 50) - replica) * 1e3:.2f} ms")  # fmt: skip

        ask(queries[0])  # warm the connection and the replica
        # two passes, not interleaved: right after a product here, this process's BLAS
        # threads still spin and would slow the replica's next query
        bare, tops = [], []
        for q in queries:
            t = time.perf_counter()
            tops.append(bare_top10(vectors, q))
            bare.append(time.perf_counter() - t)
        time.sleep(1.0)
        served, agree = [], 0
        for q, top in zip(queries, tops, strict=True):
            t = time.perf_counter()
            ids = ask(q)
            served.append(time.perf_counter() - t)
            agree += ids == [f"s{i:08d}" for i in top]
        ratios = [s / b for s, b in zip(served, bare, strict=True)]
        print(f"bare NumPy   p50 {percentile(bare, 50) * 1e3:8.2f} ms  p99 "
              f"{percentile(bare, 99) * 1e3:8.2f} ms")  # fmt: skip
        print(f"service      p50 {percentile(served, 50) * 1e3:8.2f} ms  p99 "
              f"{percentile(served, 99) * 1e3:8.2f} ms")  # fmt: skip
        print(f"service / bare: median of per-query ratios {statistics.median(ratios):.2f}, "
              f"p50 {percentile(served, 50) / percentile(bare, 50):.2f}, p99 "
              f"{percentile(served, 99) / percentile(bare, 99):.2f} (target <= 1.5); same "
              f"top-10 as bare in {agree}/{len(queries)}")  # fmt: skip
        print(f"service exact: {split_time('exact', served)}")

        if args.ann:
            ask(queries[0], method="ann")  # the replica reads the index on first use
            ann, found = [], []
            for q in queries:
                t = time.perf_counter()
                ids = ask(q, method="ann")
                ann.append(time.perf_counter() - t)
                truth = {f"s{i:08d}" for i in bare_top10(vectors, q)}
                found.append(len(truth & set(ids)) / 10)
            print(f"service ann  p50 {percentile(ann, 50) * 1e3:8.2f} ms  p99 "
                  f"{percentile(ann, 99) * 1e3:8.2f} ms  recall@10 {np.mean(found):.3f} "
                  "(target p50 <= 5 ms at recall >= 0.95)")  # fmt: skip
            print(f"service ann: {split_time('ann', ann)}")

        def worker(offset: int, latencies: list[float]) -> None:
            http = requests.Session()
            for i in range(args.queries):
                t = time.perf_counter()
                ask(queries[(i + offset) % len(queries)], http)
                latencies.append(time.perf_counter() - t)  # list.append is atomic

        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            latencies: list[float] = []
            threads = [
                threading.Thread(target=worker, args=(n, latencies)) for n in range(concurrency)
            ]
            t0 = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - t0
            print(f"concurrency {concurrency:3d}: {len(latencies) / wall:8.1f} q/s, p50 "
                  f"{percentile(latencies, 50) * 1e3:.1f} ms, p99 "
                  f"{percentile(latencies, 99) * 1e3:.1f} ms")  # fmt: skip

        each = ", ".join(f"{b / 2**20:,.0f}" for b in replica_rss())
        encoders = sum(replica_rss("QueryEncoders")) / 2**20
        print(f"replica memory: {each} MiB resident per store replica for a "
              f"{vectors.nbytes / 2**20:,.0f} MiB matrix"
              f"{' and its ANN index' if args.ann else ''}; the query encoders' replica "
              f"{encoders:,.0f} MiB")  # fmt: skip

        before = requests.get(f"{url}/healthz", timeout=30).json()["feature_sets"]["bench"]
        write_store(Path(tmp) / "store", vectors[:1000], "sink")  # a new version
        t0 = time.perf_counter()
        while requests.get(f"{url}/healthz", timeout=30).json()["feature_sets"]["bench"] == before:
            time.sleep(0.05)
        print(f"commit -> served: {time.perf_counter() - t0:.2f} s (poll every 0.5 s)")
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
