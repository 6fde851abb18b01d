"""The HTTP API of ``mmfp serve``: a Ray Serve deployment with a FastAPI ingress.

Each replica holds the served feature sets' embedding matrices (``ServedStore``) and
polls the Delta log every ``poll_seconds``; a newer version is loaded beside the
served one and swapped in. Read-only. With a token, every route but ``/healthz`` needs
``Authorization: Bearer <token>`` (401 otherwise; the token is never logged). Bad
requests are a 4xx with a one-line JSON error; an unexpected error is a 500 with a
one-line JSON error too, never a traceback.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at
# run time, and Serve's class-based view does not resolve them from strings.

import asyncio
import base64
import binascii
import functools
import hmac
import logging
import mimetypes
import threading
import time
from importlib.resources import files
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow.compute as pc
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from features import browse
from features.errors import StoreError
from features.metadata import feature_table
from features.runs import recent_runs
from features.search import ExactQuery, ResidentColumn
from features.store import FeatureStore
from features.summary import table_summary
from features.tables import string_field
from features.vectors import where_rows
from jobs.serve.encoders import QueryEncoders
from jobs.serve.resident import NotServed, ServedStore
from pipelines.errors import MmfpError

log = logging.getLogger("mmfp.serve")
MAX_BODY_BYTES = 32 * 2**20  # an uploaded query file, base64 included
TOO_LARGE = f"request body over {MAX_BODY_BYTES} bytes"
MAX_IDS = 1000
EXACT_BATCH = 16  # exact queries that arrive together share one pass over the matrix
MAX_PAGE = 500  # rows per page of samples, quarantine, runs
MAP_POINTS = 5000  # the most points an embedding map draws
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

api = FastAPI(
    title="mmfp serve",
    description="Online features and nearest neighbours of an mmfp feature store.",
)


class Unauthorized(MmfpError):
    pass


@api.exception_handler(NotServed)
async def _not_found(_: Request, e: NotServed) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=404)


@api.exception_handler(Unauthorized)
async def _unauthorized(_: Request, e: Unauthorized) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


@api.exception_handler(MmfpError)
async def _bad_request(_: Request, e: MmfpError) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown route, a wrong method, a body over the bound) in
    the same one-line JSON as every other error."""
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return JSONResponse({"error": f"{where}: {first.get('msg')}".strip(": ")}, status_code=422)


@api.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error")  # the replica's log has the traceback, the client not
    return JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)


class _Guarded:
    """Every request's bounds and timing, as a plain ASGI wrapper: FastAPI's ``http``
    middlewares (``BaseHTTPMiddleware``) cost each request a task group and memory
    streams, milliseconds on a small machine, twice over with two of them.

    A body declared (``Content-Length``) or streamed (chunked) past ``MAX_BODY_BYTES`` is
    a 413 before the route reads it. The replica's time goes to the Prometheus histogram
    ``mmfp_serve_request_ms`` per route template and status (Serve's own metrics add the
    proxy's view) and to the ``Server-Timing`` header (``app;dur=MS``), so a client can
    tell the replica's time from the HTTP hop's.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _too_large()(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        received = [0]

        async def bounded_receive() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > MAX_BODY_BYTES:  # a chunked body has no length to check first
                raise StarletteHTTPException(413, TOO_LARGE)
            return message

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                took = f"app;dur={(time.perf_counter() - start) * 1000:.2f}"
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", took.encode())]}  # fmt: skip
            await send(message)

        await self.app(scope, bounded_receive, timed_send)
        route = scope.get("route")
        _latency().observe(
            (time.perf_counter() - start) * 1000,
            tags={"route": getattr(route, "path", "unmatched"), "status": str(status[0])},
        )


def _too_large() -> JSONResponse:
    return JSONResponse({"error": TOO_LARGE}, 413)


api.add_middleware(_Guarded)


_LATENCY: list[Any] = []  # made in the replica on first use (a metric is not picklable)


def _latency() -> Any:
    if not _LATENCY:
        from ray.serve.metrics import Histogram

        _LATENCY.append(Histogram(
            "mmfp_serve_request_ms", description="mmfp serve: a replica's time per request",
            boundaries=LATENCY_MS, tag_keys=("route", "status"),
        ))  # fmt: skip
    return _LATENCY[0]


async def _authorized(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """With a token, the request must carry it (checked before the body is validated;
    ``async``: a plain function would cost every request a hop to the thread pool)."""
    token = getattr(request.app.state, "token", None)
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token")


class SearchRequest(BaseModel):
    """Exactly one query: ``text``, ``image``/``audio`` (a file, base64), ``vector`` or a
    stored ``sample_id``."""

    model_config = ConfigDict(extra="forbid")

    feature_set: str
    column: str | None = None  # the embedding column; may be left out when there is one
    k: int = Field(10, ge=1, le=1000)
    where: str | None = Field(None, max_length=2000)  # the same filter as `mmfp search`
    method: Literal["exact", "ann"] = "exact"  # ann: the version's index (`mmfp store index`)
    text: str | None = Field(None, max_length=10_000)
    image: str | None = None
    audio: str | None = None
    vector: list[float] | None = None
    sample_id: str | None = None

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [n for n in ("text", "image", "audio", "vector", "sample_id") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of text, image, audio, vector, sample_id; got {given}"
            )
        return self


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feature_set: str
    text: str | None = Field(None, max_length=10_000)
    image: str | None = None
    audio: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "EmbedRequest":
        if sum(v is not None for v in (self.text, self.image, self.audio)) != 1:
            raise ValueError("give exactly one of text, image, audio")
        return self


# Helpers come before the deployment: Serve pickles the class when it is decorated.


PAGE = files("jobs.serve").joinpath("page.html").read_text(encoding="utf-8")


def _query_input(text: str | None, image: str | None, audio: str | None) -> tuple[str, str | bytes]:
    if text is not None:
        return "text", text
    modality, encoded = ("image", image) if image is not None else ("audio", audio)
    try:
        return modality, base64.b64decode(encoded or "", validate=True)
    except (binascii.Error, ValueError) as e:
        raise StoreError(f"{modality}: not base64 ({e})") from e


def _unit(vector: Any, dim: int) -> np.ndarray:
    q = np.asarray(vector, np.float32).reshape(-1)
    if q.shape != (dim,) or not np.isfinite(q).all() or not np.linalg.norm(q):
        raise StoreError(f"the query vector must be {dim} finite numbers, not all zero")
    return q / np.linalg.norm(q)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * EXACT_BATCH)
@serve.ingress(api)
class StoreService:
    """One replica: the served feature sets in memory, a poller that swaps versions."""

    def __init__(
        self,
        store_uri: str,
        *,
        storage_options: dict[str, str] | None = None,
        feature_sets: list[str] | None = None,
        token: str | None = None,
        poll_seconds: float = 5.0,
        encoders: Any = None,  # the QueryEncoders deployment's handle (`store_app` binds it)
    ) -> None:
        api.state.token = token  # read by `_authorized` (one deployment per replica process)
        self.store = FeatureStore(store_uri, storage_options=storage_options)
        self.served = ServedStore(self.store, feature_sets)
        self.encoders = encoders
        self.poll_seconds = poll_seconds
        threading.Thread(target=self._poll, name="mmfp-serve-poll", daemon=True).start()

    def _poll(self) -> None:
        """Load newer versions as they are committed, beside the served ones (a thread)."""
        while True:
            time.sleep(self.poll_seconds)
            try:
                if self.served.refresh():
                    log.info("now serving %s", self.served.versions())
            except Exception:  # a failed load keeps the served versions; try again later
                log.exception("refresh failed; still serving %s", self.served.versions())

    # ---- routes -----------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "feature_sets": self.served.versions(),
                "token_required": api.state.token is not None}  # fmt: skip

    @api.get("/tables", dependencies=[Depends(_authorized)])
    def tables(self) -> list[dict[str, Any]]:
        return [table_summary(self.store, name) for name in self.store.tables()]

    @api.post("/search", dependencies=[Depends(_authorized)])
    async def search(self, body: SearchRequest) -> dict[str, Any]:
        """Exact queries that arrive together are answered from one pass over the matrix
        (``_exact``); ANN queries each go through the version's index."""
        served = self.served.get(body.feature_set)
        column = served.column(body.column)
        if body.sample_id is not None:
            q = await asyncio.to_thread(column.vector_of, body.sample_id)
            exclude = [body.sample_id]
        elif body.vector is not None:
            q, exclude = _unit(body.vector, column.column.dim), []
        else:
            modality, value = _query_input(body.text, body.image, body.audio)
            q, exclude = _unit(await self._embed(served, modality, value), column.column.dim), []
        if body.method == "ann":
            # a loaded index answers in ~2 ms, less than a hop to a thread and back on a
            # busy machine; reading the index or a filter's rows is I/O: a thread's job
            index = served.indexes.get(column.column.column) or await asyncio.to_thread(
                served.index, self.store, column
            )
            search = functools.partial(
                column.search, self.store, q, body.k, where=body.where, exclude=exclude,
                index=index, samples=self.served.samples,
            )  # fmt: skip
            hits = search() if body.where is None else await asyncio.to_thread(search)
        else:
            rows = None
            if body.where is not None:  # a bad filter fails its own request, not a batch
                rows = await asyncio.to_thread(where_rows, self.store, column.keys, body.where)
            hits = await self._exact((column, ExactQuery(q, body.k, rows, exclude)))
        return {
            "feature_set": served.name,
            "version": served.version,
            "column": column.column.column,
            "method": body.method,
            "hits": hits.to_pylist(),
        }

    @api.post("/embed", dependencies=[Depends(_authorized)])
    async def embed(self, body: EmbedRequest) -> dict[str, Any]:
        served = self.served.get(body.feature_set)
        modality, value = _query_input(body.text, body.image, body.audio)
        vector = await self._embed(served, modality, value)
        return {"feature_set": served.name, "version": served.version, "modality": modality,
                "embedding": vector.tolist()}  # fmt: skip

    @api.get("/features/{feature_set}", dependencies=[Depends(_authorized)])
    def features(
        self,
        feature_set: str,
        ids: Annotated[str, Query(max_length=100_000, description="comma-separated sample ids")],
    ) -> dict[str, Any]:
        """Online feature lookup (Feast's get-online-features): the original rows of ``ids``
        at the served version, embeddings included; unknown ids are left out."""
        served = self.served.get(feature_set)
        wanted = [i for i in ids.split(",") if i][:MAX_IDS]
        rows = self.store.to_arrow(
            feature_table(feature_set),
            served.version,
            filter=string_field("sample_id").isin(wanted) & (pc.field("view") == -1),
        )
        return {"feature_set": feature_set, "version": served.version, "rows": rows.to_pylist()}

    @api.get("/samples/{sample_id}", dependencies=[Depends(_authorized)])
    def sample(self, sample_id: str) -> dict[str, Any]:
        row = self._sample(sample_id)
        return {k: v for k, v in row.items() if k not in ("image", "audio")}

    @api.get("/media/{sample_id}/{modality}", dependencies=[Depends(_authorized)])
    def media(
        self,
        sample_id: str,
        modality: Literal["image", "audio"],
        view: Annotated[int | None, Query(ge=0, description="an augmented view's number")] = None,
    ) -> Response:
        """The stored bytes of a sample's (or one of its views') image or audio."""
        found = browse.media(self.store, sample_id, modality, view)
        if found is None:
            of = f"sample {sample_id!r}" + (f" view {view}" if view is not None else "")
            raise NotServed(f"{of} has no {modality}")
        data, kind = found
        content_type = mimetypes.types_map.get(f".{kind.lower()}", "application/octet-stream")
        return Response(data, media_type=content_type, headers={"Cache-Control": "no-store"})

    # ---- the browser view and the pages it reads --------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        """The browser view (one static page; it asks for the token and sends it itself)."""
        return HTMLResponse(PAGE)

    @api.get("/overview", dependencies=[Depends(_authorized)])
    def overview(self) -> dict[str, Any]:
        """Tables, served feature sets and their columns, samples per split and label,
        quarantined inputs per error type."""
        served = {
            name: {"version": s.version, "columns": sorted(s.columns),
                   "rows": max((c.matrix.shape[0] for c in s.columns.values()), default=0)}
            for name, s in self.served.served.items()
        }  # fmt: skip
        return {
            "store": self.store.uri,
            "tables": [table_summary(self.store, name) for name in self.store.tables()],
            "served": served,
            **browse.counts(self.store),
        }

    @api.get("/quality", dependencies=[Depends(_authorized)])
    def quality(self) -> dict[str, Any]:
        """Quality stats per split: percentiles and histograms (``mmfp store stats quality``)."""
        return browse.quality(self.store)

    @api.get("/samples", dependencies=[Depends(_authorized)])
    def samples(
        self,
        split: str | None = None,
        label: str | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 48,
    ) -> dict[str, Any]:
        """A page of samples (no media bytes) by sample id."""
        return browse.samples_page(self.store, split=split, label=label, offset=offset,
                                   limit=limit)  # fmt: skip

    @api.get("/samples/{sample_id}/views", dependencies=[Depends(_authorized)])
    def views(self, sample_id: str) -> list[dict[str, Any]]:
        return browse.views_of(self.store, sample_id)

    @api.get("/quarantine", dependencies=[Depends(_authorized)])
    def quarantine(
        self,
        error_type: str | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> dict[str, Any]:
        """Quarantined inputs with their reasons, newest first."""
        return browse.quarantine_page(self.store, error_type=error_type, offset=offset,
                                      limit=limit)  # fmt: skip

    @api.get("/runs", dependencies=[Depends(_authorized)])
    def runs(self, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> list[dict[str, Any]]:
        return recent_runs(self.store, limit).to_pylist()

    @api.get("/map/{feature_set}", dependencies=[Depends(_authorized)])
    def map(
        self,
        feature_set: str,
        column: str | None = None,
        points: Annotated[int, Query(ge=2, le=MAP_POINTS)] = 2000,
    ) -> dict[str, Any]:
        """A 2-D map (principal components) of a served embedding column's original rows."""
        served = self.served.get(feature_set)
        resident = served.column(column)
        return {
            "feature_set": served.name,
            "version": served.version,
            "column": resident.column.column,
            **browse.projection(resident.matrix, resident.keys, points),
        }

    # ---- helpers ----------------------------------------------------------------------

    def _sample(self, sample_id: str) -> dict[str, Any]:
        if not self.store.exists("samples"):
            raise NotServed("the store has no samples table")
        rows = self.store.to_arrow("samples", filter=string_field("sample_id") == sample_id)
        if rows.num_rows == 0:
            raise NotServed(f"no sample {sample_id!r}")
        return rows.slice(0, 1).to_pylist()[0]

    async def _embed(self, served: Any, modality: str, value: str | bytes) -> np.ndarray:
        """The query's embedding from the encoder deployment (batched with others there)."""
        result = await self.encoders.embed.remote(served.name, served.version, modality, value)
        if isinstance(result, str):
            raise StoreError(result)
        return result

    @serve.batch(max_batch_size=EXACT_BATCH, batch_wait_timeout_s=0.001)
    async def _exact(self, items: list[tuple[ResidentColumn, ExactQuery]]) -> list[Any]:
        return await asyncio.to_thread(self._exact_now, items)

    def _exact_now(self, items: list[tuple[ResidentColumn, ExactQuery]]) -> list[Any]:
        """Each query's hits; the queries of one column (and version) share its product."""
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (column, _) in enumerate(items):
            groups.setdefault(id(column), []).append(i)
        for where in groups.values():
            column = items[where[0]][0]
            queries = [items[i][1] for i in where]
            hits = column.search_many(self.store, queries, samples=self.served.samples)
            for i, found in zip(where, hits, strict=True):
                out[i] = found
        return out


def store_app(
    store_uri: str,
    *,
    storage_options: dict[str, str] | None = None,
    feature_sets: list[str] | None = None,
    token: str | None = None,
    poll_seconds: float = 5.0,
    trust_store_code: bool = False,
    replicas: int = 1,
    encoder_replicas: int = 1,
    encoder_gpus: float = 0,
) -> Any:
    """The Serve application: the store replicas, and the query encoders as their own
    deployment (on ``encoder_gpus`` GPUs each, where the cluster has them)."""
    encoders = QueryEncoders.options(
        num_replicas=encoder_replicas,
        ray_actor_options={"num_cpus": 0, "num_gpus": encoder_gpus},
    ).bind(store_uri, storage_options=storage_options, trust_store_code=trust_store_code)
    return StoreService.options(num_replicas=replicas).bind(
        store_uri,
        storage_options=storage_options,
        feature_sets=feature_sets,
        token=token,
        poll_seconds=poll_seconds,
        encoders=encoders,
    )


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run jobs.serve.app:app_builder store=URI [feature_sets=a,b]
    [token_env=VAR] [poll_seconds=5] [encoder_gpus=1]`` and a Serve config file
    (``deploy/serve.yaml``, where ``num_replicas`` of each deployment is set too)."""
    import os

    token_env = args.get("token_env")
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        raise MmfpError(f"token_env={token_env}: that environment variable is empty")
    names = [n for n in args.get("feature_sets", "").split(",") if n] or None
    return store_app(
        args["store"],
        feature_sets=names,
        token=token,
        poll_seconds=float(args.get("poll_seconds", 5.0)),
        encoder_gpus=float(args.get("encoder_gpus", 0)),
    )
