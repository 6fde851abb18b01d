"""Caption views: cheap, local text noise (no models, no network), seeded.

Word dropout, word swaps, case and punctuation noise, then a paraphrase
template; a pure function of the caption and the seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.augment_spec import TextAugment
from pipelines.errors import AugmentError

_PUNCT = (".", ",", "!", "?", ";")


def augment_text(text: str, *, spec: TextAugment, seed: int) -> tuple[str, dict]:
    """Word dropout, swaps, case and punctuation noise, then a paraphrase template.

    Works on whitespace-separated words; at least one word of the caption always survives.
    """
    words = text.split()
    if not words:
        raise AugmentError("text: the caption is empty")
    rng = np.random.default_rng(seed)
    keep = rng.random(len(words)) >= spec.word_delete_p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    record: dict[str, Any] = {"seed": seed, "deleted": np.flatnonzero(~keep).tolist()}
    words = [w for w, k in zip(words, keep, strict=True) if k]
    swaps = []
    for _ in range(spec.word_swaps if len(words) > 1 else 0):
        i, j = (int(v) for v in rng.choice(len(words), size=2, replace=False))
        words[i], words[j] = words[j], words[i]
        swaps.append([i, j])
    case, punct = {}, {}
    for i, word in enumerate(words):
        if rng.random() < spec.case_noise_p:
            style = ("lower", "upper", "capitalize")[int(rng.integers(3))]
            words[i] = getattr(word, style)()
            case[str(i)] = style
        if rng.random() < spec.punct_noise_p:
            stripped = words[i].rstrip("".join(_PUNCT))
            if stripped and stripped != words[i]:
                words[i], punct[str(i)] = stripped, "-"
            else:
                mark = _PUNCT[int(rng.integers(len(_PUNCT)))]
                words[i], punct[str(i)] = words[i] + mark, mark
    template = spec.templates[int(rng.integers(len(spec.templates)))] if spec.templates else None
    out = " ".join(words)
    if template is not None:
        out = template.replace("{text}", out)  # replace, not format: captions may hold braces
    record |= {"swaps": swaps, "case": case, "punct": punct, "template": template}
    return out, record
