"""A joint image+text "model" with a known answer: colours embed as RGB directions.

Zero-shot labelling with it must call a red square "red": the test knows the
answer without real weights.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from features.schema import list_of
from pipelines.encoders.base import Encoder

COLOURS = ("red", "green", "blue")


class ColourJoint(Encoder):
    modality = ("image", "text")

    def output_columns(self):
        return {
            "image_emb": (list_of(pa.float32()), (3,)),
            "text_emb": (list_of(pa.float32()), (3,)),
        }

    def preprocess(self, batch):
        import cv2

        n = batch.num_rows
        names = batch.column_names
        images = batch.column("image").to_pylist() if "image" in names else [None] * n
        texts = batch.column("text").to_pylist() if "text" in names else [None] * n
        rgb = np.zeros((n, 3), np.float32)
        for i, data in enumerate(images):
            if data is not None:
                bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                rgb[i] = bgr.reshape(-1, 3).mean(axis=0)[::-1]
        words = np.zeros((n, 3), np.float32)
        for i, text in enumerate(texts):
            for j, colour in enumerate(COLOURS):
                if text and colour in text:
                    words[i, j] = 1.0
        return {
            "image_rgb": rgb,
            "text_words": words,
            "image_mask": np.array([d is not None for d in images]),
            "text_mask": np.array([t is not None for t in texts]),
        }

    def encode(self, inputs):
        def unit(x):
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)

        return {
            "image_emb": unit(inputs["image_rgb"]),
            "text_emb": unit(inputs["text_words"]),
            "image_mask": inputs["image_mask"],
            "text_mask": inputs["text_mask"],
        }
