"""Pictures people would rather see than read: augmentations side by side.

Matplotlib with the Agg backend, imported inside the functions so that
``import features`` stays fast and works without a display.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.store import FeatureStore
from features.tables import string_field


def _image(data: bytes) -> np.ndarray:
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def _log_mel(data: bytes) -> np.ndarray:
    import librosa
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mel = librosa.feature.melspectrogram(y=audio.mean(axis=1), sr=rate, n_mels=64, n_fft=512)
    return librosa.power_to_db(mel, ref=np.max)


def augment_preview(store: FeatureStore, out: Path, *, samples: int = 4) -> Path | None:
    """A PNG grid: per sample, the original image and its views, then the spectrograms.

    ``None`` (and no file) when no train sample has two views with image and audio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = store.to_arrow("views", columns=["sample_id", "view", "image", "audio", "text"])
    views = views.sort_by([("sample_id", "ascending"), ("view", "ascending")]).to_pylist()
    by_sample: dict[str, list[dict]] = {}
    for v in views:
        if v["image"] and v["audio"]:
            by_sample.setdefault(v["sample_id"], []).append(v)
    chosen = [sid for sid, vs in by_sample.items() if len(vs) >= 2][:samples]
    if not chosen:
        return None
    wanted = pc.is_in(string_field("sample_id"), pa.array(chosen))
    originals = {
        r["sample_id"]: r
        for r in store.to_arrow(
            "samples", columns=["sample_id", "image", "audio", "text"], filter=wanted
        ).to_pylist()
    }
    n_views = 2
    width = 2 * (1 + n_views)
    fig, axes = plt.subplots(len(chosen), width, figsize=(3 * width, 2.6 * len(chosen)))
    axes = np.atleast_2d(axes)
    for row, sid in enumerate(chosen):
        columns = [("original", originals[sid])] + [
            (f"view {v['view']}", v) for v in by_sample[sid][:n_views]
        ]
        for col, (title, item) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(_image(item["image"]))
            ax.set_title(f"{title}\n{(item['text'] or '')[:28]}", fontsize=7)
            ax.axis("off")
            ax = axes[row, len(columns) + col]
            ax.imshow(_log_mel(item["audio"]), origin="lower", aspect="auto", cmap="magma")
            ax.set_title(f"{title}: log-mel", fontsize=7)
            ax.axis("off")
    fig.suptitle("originals and augmented views (image | audio)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
