"""Weight-free featurizers: model inputs stored as features (pixels, log-mel, token ids).

They run entirely in ``preprocess`` on CPU tasks (``needs_model = False``);
``encode`` only passes the arrays through, so every encoder has one shape.
A trainer that reads these columns does no decoding of its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from features.metadata import ColumnMeta, EncoderMeta
from features.schema import list_of
from pipelines.encoders import media
from pipelines.encoders.base import Encoder, EncoderParams

# OpenAI CLIP's RGB statistics: the usual choice for contrastive image towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# power_to_db of silence (amin=1e-10): the value frames are padded with.
SILENCE_DB = -100.0


class Featurizer(Encoder):
    """An encoder whose preprocess output is the feature itself."""

    needs_model: ClassVar[bool] = False

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [*self.output_columns(), *(f"{m}_mask" for m in self.modalities)]
        return {name: inputs[name] for name in names}


class ImagePixelsParams(EncoderParams):
    size: int = Field(224, gt=0)  # output is size x size
    crop: bool = True  # shortest side to `size` then centre crop; False stretches
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


class ImagePixels(Featurizer):
    """Normalised CHW float32 RGB pixels, ready for a vision tower."""

    modality = "image"
    Params = ImagePixelsParams
    params: ImagePixelsParams

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        s = self.params.size
        return {"image_pixels": (list_of(pa.float32()), (3, s, s))}

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        images = [media.decode_rgb(v) for v in media.column(batch, "image")]
        s = self.params.size
        out = np.zeros((len(images), 3, s, s), dtype=np.float32)
        mean = np.asarray(self.params.mean, np.float32)
        std = np.asarray(self.params.std, np.float32)
        for i, img in enumerate(images):
            if img is not None:
                rgb = self._resize(img).astype(np.float32) / 255.0
                out[i] = ((rgb - mean) / std).transpose(2, 0, 1)
        return {"image_pixels": out, "image_mask": np.array([i is not None for i in images])}

    def _resize(self, img: np.ndarray) -> np.ndarray:
        import cv2

        s, (h, w) = self.params.size, img.shape[:2]
        if not self.params.crop:
            return cv2.resize(img, (s, s), interpolation=_interpolation(h * w, s * s))
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        img = cv2.resize(img, (nw, nh), interpolation=_interpolation(h * w, nh * nw))
        top, left = (nh - s) // 2, (nw - s) // 2
        return img[top : top + s, left : left + s]


def _interpolation(src_pixels: int, dst_pixels: int) -> int:
    import cv2

    # INTER_AREA avoids aliasing when shrinking; bicubic when enlarging, as CLIP does.
    return cv2.INTER_AREA if dst_pixels < src_pixels else cv2.INTER_CUBIC


class AudioLogMelParams(EncoderParams):
    sample_rate: int = Field(16000, gt=0)  # audio is resampled to this rate, mono
    n_mels: int = Field(64, gt=0)
    frames: int = Field(100, gt=0)  # fixed length: cropped from the start or padded with silence
    n_fft: int = Field(400, gt=0)  # 25 ms at 16 kHz
    hop_length: int = Field(160, gt=0)  # 10 ms at 16 kHz: 100 frames = 1 s
    fmin: float = Field(0.0, ge=0)
    fmax: float | None = None  # None: sample_rate / 2


class AudioLogMel(Featurizer):
    """Log-mel spectrogram (dB, absolute reference) of fixed size (n_mels, frames)."""

    modality = "audio"
    Params = AudioLogMelParams
    params: AudioLogMelParams

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        return {"audio_logmel": (list_of(pa.float32()), (self.params.n_mels, self.params.frames))}

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        p = self.params
        waves = [media.decode_mono(v, p.sample_rate) for v in media.column(batch, "audio")]
        out = np.full((len(waves), p.n_mels, p.frames), SILENCE_DB, dtype=np.float32)
        for i, wave in enumerate(waves):
            if wave is not None:
                mel = self._logmel(wave[: p.frames * p.hop_length])
                out[i, :, : mel.shape[1]] = mel[:, : p.frames]
        return {"audio_logmel": out, "audio_mask": np.array([w is not None for w in waves])}

    def _logmel(self, wave: np.ndarray) -> np.ndarray:
        import librosa

        p = self.params
        power = librosa.feature.melspectrogram(
            y=wave, sr=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length,
            n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax,
        )  # fmt: skip
        return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None)


class TextIdsParams(EncoderParams):
    max_length: int = Field(32, gt=0)  # padded / truncated to this many tokens
    lowercase: bool = False  # byte-level only: fold case before encoding


BYTE_PAD = 0  # byte-level ids: 0 pads, byte b is id b + 1
BYTE_VOCAB = 257


class TextIds(Featurizer):
    """Token ids, fixed length, int32: from the tokenizer in ``model`` (a local
    directory), or without ``model`` byte-level (UTF-8 byte + 1, 0 pads; 257 ids), which
    needs no vocabulary at all. The vocabulary size and pad id are recorded in the feature
    set's metadata, where the trainer reads them."""

    modality = "text"
    Params = TextIdsParams
    params: TextIdsParams
    added_params = frozenset({"lowercase"})

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        return {"text_ids": (list_of(pa.int32()), (self.params.max_length,))}

    def describe(self) -> tuple[EncoderMeta, dict[str, ColumnMeta]]:
        """Adds the pad id and the vocabulary size: a model reading ``text_ids`` masks
        tokens equal to the pad id and needs an embedding row for every id."""
        encoder, columns = super().describe()
        if self.config.model is None:
            pad_id, vocab = BYTE_PAD, BYTE_VOCAB
        else:
            tokenizer = self._tokenizer()
            pad_id, vocab = tokenizer.pad_token_id, len(tokenizer)
        update = {"pad_id": pad_id, "vocab_size": vocab}
        return encoder, {**columns, "text_ids": columns["text_ids"].model_copy(update=update)}

    def _tokenizer(self) -> Any:
        from pipelines.encoders.hub import load_tokenizer

        return self.cached("tokenizer", lambda: load_tokenizer(self.config.model))

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        values, mask = media.texts(media.column(batch, "text"))
        if self.config.model is None:
            return {"text_ids": self._bytes(values), "text_mask": mask}
        ids = self._tokenizer()(
            values or [""], padding="max_length", truncation=True,
            max_length=self.params.max_length, return_tensors="np",
        )["input_ids"]  # fmt: skip
        return {"text_ids": ids[: len(values)].astype(np.int32), "text_mask": mask}

    def _bytes(self, values: list[str]) -> np.ndarray:
        out = np.full((len(values), self.params.max_length), BYTE_PAD, dtype=np.int32)
        for i, text in enumerate(values):
            text = text.lower() if self.params.lowercase else text
            raw = np.frombuffer(text.encode("utf-8")[: self.params.max_length], np.uint8)
            out[i, : len(raw)] = raw.astype(np.int32) + 1
        return out
