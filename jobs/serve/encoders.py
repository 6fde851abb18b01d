"""The query encoders of ``mmfp serve``: their own Ray Serve deployment, so they can hold
GPUs (``num_gpus``) while the store replicas stay on CPUs, and so concurrent queries run
through a model together (``@serve.batch``).

One loaded encoder per feature set, version and modality, each the one recorded in the
feature set (``pipelines.encode.query_encoder``). A newer version made by the same
encoder configs reuses the loaded model (an append does not reload CLIP); one made by
other configs loads its own and the old one is dropped. A batch mixes feature sets and
modalities freely and is split by encoder. A query that does not decode gets its own
error, as text (an exception through a handle would carry a remote traceback), and the
rest of its batch is embedded.
"""

# No `from __future__ import annotations`: Serve inspects the batched method's signature.

import asyncio
import json
from typing import Any

import numpy as np
from ray import serve

from features.metadata import FeatureSetMeta, feature_table
from features.store import FeatureStore
from pipelines.errors import MmfpError

MAX_BATCH = 32
BATCH_WAIT_S = 0.005  # how long a lone query waits for company
Key = tuple[str, int, str]  # feature set, version, modality


# Helpers come before the deployment: Serve pickles the class when it is decorated.


def _grouped(items: list[tuple[str, int, str, Any]]) -> dict[Key, list[int]]:
    """Positions of the batch's items per encoder."""
    groups: dict[Key, list[int]] = {}
    for i, (name, version, modality, _) in enumerate(items):
        groups.setdefault((name, version, modality), []).append(i)
    return groups


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * MAX_BATCH)
class QueryEncoders:
    """Loads each recorded encoder on first use and embeds queries in batches."""

    def __init__(
        self,
        store_uri: str,
        *,
        storage_options: dict[str, str] | None = None,
        trust_store_code: bool = False,
    ) -> None:
        self.store = FeatureStore(store_uri, storage_options=storage_options)
        self.trust = trust_store_code
        self.loaded: dict[tuple[str, str, str], Any] = {}  # (set, modality, its configs)
        self.by_version: dict[Key, Any] = {}
        self.batches: list[int] = []  # the size of each batch run (``stats``)

    async def embed(
        self, feature_set: str, version: int, modality: str, value: str | bytes
    ) -> np.ndarray | str:
        """One query's embedding, or why it has none."""
        return await self._batched((feature_set, version, modality, value))

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batches), "largest": max(self.batches, default=0),
                "queries": sum(self.batches), "loaded": len(self.loaded)}  # fmt: skip

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, items: list[tuple[str, int, str, Any]]) -> list[np.ndarray | str]:
        """Each item's embedding, or the reason it has none; the model runs off the event
        loop, so the next batch gathers while this one computes."""
        self.batches.append(len(items))
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[tuple[str, int, str, Any]]) -> list[np.ndarray | str]:
        from pipelines.encode import embed_values

        out: list[np.ndarray | str] = [""] * len(items)
        for key, where in _grouped(items).items():
            try:
                vectors = embed_values(self._encoder(key), key[2], [items[i][3] for i in where])
            except MmfpError as e:
                vectors = [" ".join(str(e).split())] * len(where)
            for i, vector in zip(where, vectors, strict=True):
                out[i] = f"the {key[2]} query could not be decoded" if vector is None else vector
        return out

    def _encoder(self, key: Key) -> Any:
        from pipelines.encode import query_encoder

        if key not in self.by_version:
            name, version, modality = key
            table = feature_table(name)
            meta = FeatureSetMeta.of(self.store, self.store.delta(table, version), table=table)
            same = (name, modality, json.dumps(meta.encoder_hashes(), sort_keys=True))
            if same not in self.loaded:
                encoder = query_encoder(self.store, name, modality, version=version,
                                        trust_store_code=self.trust)  # fmt: skip
                for old in [k for k in self.loaded if k[:2] == same[:2]]:
                    del self.loaded[old]  # made by other configs: the served version moved on
                self.loaded[same] = encoder
            for old in [k for k in self.by_version if (k[0], k[2]) == (name, modality)]:
                del self.by_version[old]
            self.by_version[key] = self.loaded[same]
        return self.by_version[key]
