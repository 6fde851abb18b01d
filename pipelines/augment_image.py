"""Image views with albumentations: the one module that knows albumentations.

Which transforms a view pipeline accepts, how one is built from a spec entry
(strict: an unknown argument is an error), how a pipeline is seeded so every
transform draws its own stream, and the op itself: bytes and a seed in, PNG
bytes and a record of the applied params out. Outputs are lossless (PNG) so
replayed views compare equal byte for byte; errors that odd inputs cause in
OpenCV or albumentations become ``AugmentError``s naming the cause.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from functools import cache
from typing import Any, Protocol

import numpy as np

from pipelines.errors import AugmentError

_MAX_RECORDED_ARRAY = 16  # larger arrays (noise maps) are recorded by shape, not values


class NamedOp(Protocol):
    """A spec's image op: an albumentations class name and its params."""

    name: str
    params: dict[str, Any]


def _albumentations() -> Any:
    # albumentations checks PyPI for a newer version on import unless told not to: no
    # network at run time (DESIGN §6). setdefault keeps a user's explicit choice.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


# Transforms that need more than an image (bboxes, reference images, fonts, callables) or
# that do not return uint8 pixels, so they cannot run in a view pipeline.
_UNSUPPORTED = frozenset(
    {
        "AtLeastOneBBoxRandomCrop", "BBoxSafeRandomCrop", "RandomSizedBBoxSafeCrop",
        "RandomCropNearBBox", "CropNonEmptyMaskIfExists", "MaskDropout", "FDA",
        "HistogramMatching", "PixelDistributionAdaptation", "Mosaic", "OverlayElements",
        "TextImage", "Lambda", "Normalize", "ToFloat", "FromFloat", "ImageOnlyTransform",
        "DualTransform",
    }
)  # fmt: skip

_EXAMPLES = ("HorizontalFlip", "RandomResizedCrop", "Affine", "ColorJitter", "GaussNoise")


@cache
def image_transform_names() -> tuple[str, ...]:
    """Names of the albumentations transforms a view pipeline accepts (2-D, image in/out)."""
    A = _albumentations()
    from albumentations.core.transforms_interface import Transform3D

    def ok(name: str) -> bool:
        cls = getattr(A, name)
        return (
            isinstance(cls, type)
            and issubclass(cls, A.ImageOnlyTransform | A.DualTransform)
            and not issubclass(cls, Transform3D)
            and name not in _UNSUPPORTED
        )

    return tuple(sorted(n for n in dir(A) if ok(n)))


def build_transform(name: str, params: dict[str, Any]) -> Any:
    """Construct one albumentations transform in strict mode, so an unknown argument is an
    error rather than the warning albumentations gives by default."""
    A = _albumentations()
    valid = image_transform_names()
    if name in _UNSUPPORTED or (name not in valid and isinstance(getattr(A, name, None), type)):
        raise ValueError(
            f"albumentations transform {name!r} cannot run in a view pipeline: it needs more "
            "than an image (bboxes, reference images, callables), is not a 2-D image transform, "
            "or does not return uint8 pixels"
        )
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(_EXAMPLES)}"
        raise ValueError(
            f"unknown albumentations transform {name!r}; {hint} ({len(valid)} are supported)"
        )
    try:
        return getattr(A, name)(**{**params, "strict": True})
    except (TypeError, ValueError) as e:
        raise ValueError(f"image op {name}: invalid params {params}: {e}") from e


def _jsonable(value: Any) -> Any:
    """Applied albumentations params as plain JSON values (numpy scalars, tuples, arrays)."""
    if isinstance(value, np.ndarray):
        if value.size <= _MAX_RECORDED_ARRAY:
            return _jsonable(value.tolist())
        return {"ndarray": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """16-bit and float images scaled to uint8: albumentations' pixel ops expect uint8."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.round(img / 257.0).astype(np.uint8)
    if img.dtype.kind == "f":
        return np.round(np.clip(np.nan_to_num(img), 0.0, 1.0) * 255).astype(np.uint8)
    raise AugmentError(f"image: unsupported pixel type {img.dtype}")


def _compose(ops: Sequence[NamedOp], seed: int) -> Any:
    """A fresh pipeline per view, seeded with ``seed`` (a reused one carries its RNG state
    from call to call, so a view would depend on the views made before it).

    ``Compose(seed=s)`` gives every transform the *same* seed, so their draws are identical
    streams: with p=0.5 each, all ops fire together or not at all. Each transform is therefore
    reseeded with its own derived seed after the Compose has set them.
    """
    import cv2

    A = _albumentations()
    transforms = [build_transform(op.name, op.params) for op in ops]
    # Alpha rides along as the mask: geometric ops move it with the pixels, colour ops leave
    # it alone; linear interpolation keeps soft edges soft.
    compose = A.Compose(
        transforms, seed=seed, save_applied_params=True, mask_interpolation=cv2.INTER_LINEAR
    )
    for i, transform in enumerate(transforms):
        transform.set_random_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
    return compose


def augment_image(data: bytes, *, ops: Sequence[NamedOp], seed: int) -> tuple[bytes, dict]:
    """Decode, augment with the albumentations ``ops``, encode as PNG.

    Grayscale inputs become 3-channel BGR (colour ops need 3 channels); BGRA inputs keep
    their alpha, transformed as a mask. Returns the PNG and a record: the op names, the
    params of the ops that fired, the seed, and the input and output shapes.
    """
    import cv2

    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise AugmentError(f"image: OpenCV cannot decode {len(data)} bytes: {e}") from e
    if img is None:
        raise AugmentError(f"image: OpenCV cannot decode {len(data)} bytes")
    img = _to_uint8(img)
    input_shape = list(img.shape)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    alpha = None
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img, alpha = np.ascontiguousarray(img[:, :, :3]), np.ascontiguousarray(img[:, :, 3])
    elif img.shape[2] != 3:
        raise AugmentError(f"image: {img.shape[2]} channels; expected 1, 3 or 4")
    from albumentations.augmentations.crops.transforms import CropSizeError  # not a ValueError

    targets = {"image": img} if alpha is None else {"image": img, "mask": alpha}
    try:
        out = _compose(ops, seed)(**targets)
    except (cv2.error, ValueError, CropSizeError) as e:
        names = [op.name for op in ops]
        raise AugmentError(f"image: {names} failed on a {input_shape} image: {e}") from e
    pixels = out["image"]
    if alpha is not None:
        pixels = np.dstack([pixels, out["mask"]])
    ok, buf = cv2.imencode(".png", pixels)
    if not ok:
        raise AugmentError(f"image: OpenCV cannot encode a {list(pixels.shape)} PNG")
    record = {
        "seed": seed,
        "ops": [op.name for op in ops],
        "applied": [{"name": n, "params": _jsonable(p)} for n, p in out["applied_transforms"]],
        "input_shape": input_shape,
        "output_shape": list(pixels.shape),
    }
    return buf.tobytes(), record
