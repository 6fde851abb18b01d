"""The largest near-duplicate sets side by side: each row a kept sample, then its duplicates
(images as they are stored, audio as a log-mel spectrogram, captions as titles)."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from features.stats import _pyplot, _save
from features.tables import TableStore, string_field

SETS = 6
PER_SET = 6


def plot_duplicate_sets(store: TableStore, rows: pa.Table, out_png: str | Path) -> Path:
    """Write the picture of the ``SETS`` largest sets (kept first) to ``out_png``."""
    members: dict[str, list[str]] = defaultdict(list)
    for sample, kept in zip(
        rows.column("sample_id").to_pylist(), rows.column("duplicate_of").to_pylist(), strict=True
    ):
        members[kept].append(sample)
    largest = sorted(members, key=lambda k: (-len(members[k]), k))[:SETS]
    sets = [[kept, *sorted(members[kept])[: PER_SET - 1]] for kept in largest]
    wanted = sorted({s for group in sets for s in group})
    samples = store.to_arrow(
        "samples",
        rows.column("samples_version")[0].as_py() if rows.num_rows else None,
        columns=["sample_id", "text", "image", "audio"],
        filter=string_field("sample_id").isin(pa.array(wanted, pa.string())),
    )
    by_id = {r["sample_id"]: r for r in samples.to_pylist()}
    plt = _pyplot()
    width = max((len(g) for g in sets), default=1)
    fig, axes = plt.subplots(
        max(1, len(sets)), width, figsize=(2.2 * width, 2.4 * max(1, len(sets))), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, group in enumerate(sets):
        for c, sample_id in enumerate(group):
            _draw(axes[r][c], by_id.get(sample_id, {}), sample_id, kept=c == 0)
    if not sets:
        axes[0][0].text(0.5, 0.5, "no near duplicates", ha="center")
    return _save(fig, plt, out_png)


def _draw(ax: object, row: dict, sample_id: str, *, kept: bool) -> None:
    import cv2

    if row.get("image"):
        pixels = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
        if pixels is not None:
            ax.imshow(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))
    elif row.get("audio"):
        import librosa
        import soundfile as sf

        wave, rate = sf.read(io.BytesIO(row["audio"]), dtype="float32", always_2d=True)
        mel = librosa.feature.melspectrogram(y=wave.mean(axis=1), sr=rate, n_mels=48)
        ax.imshow(librosa.power_to_db(mel, ref=np.max), origin="lower", aspect="auto")
    caption = (row.get("text") or "")[:28]
    ax.set_title(f"{'kept' if kept else 'dup'} {sample_id[:8]}\n{caption}", fontsize=7)
