"""Decoders on real files: limits are checked before decoding, each failure has its class."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import soundfile as sf

from jobs.demo import corpus as synthetic
from pipelines import errors
from pipelines.decode import decode_audio, decode_image, decode_text
from pipelines.spec import DecodeLimits

LIMITS = DecodeLimits()


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    return root, synthetic.write_broken_inputs(root)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("truncated.jpg", errors.TruncatedImage),
        ("huge.png", errors.ImageTooLarge),
        ("garbage.jpg", errors.ImageDecodeError),
        ("empty.png", errors.EmptyFile),
    ],
)
def test_bad_images_raise_their_error(broken, name, error):
    root, _ = broken
    with pytest.raises(error):
        decode_image((root / name).read_bytes(), max_pixels=LIMITS.max_image_pixels)


def test_pixel_limit_is_checked_from_the_header(broken):
    root, _ = broken
    data = (root / "good_001.jpg").read_bytes()
    image = decode_image(data, max_pixels=10**6)
    with pytest.raises(errors.ImageTooLarge, match="max_image_pixels"):
        decode_image(data, max_pixels=image.width * image.height - 1)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_images_keep_size_format_and_channels(channels):
    pixels = np.random.default_rng(channels).integers(0, 255, (12, 20, channels), np.uint8)
    ok, png = cv2.imencode(".png", pixels if channels > 1 else pixels[..., 0])
    assert ok
    image = decode_image(png.tobytes(), max_pixels=10**6)
    assert (image.format, image.width, image.height, image.channels) == ("png", 20, 12, channels)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("bad_header.wav", errors.AudioDecodeError),
        ("too_long.wav", errors.AudioTooLong),
        ("silent.wav", errors.EmptyAudio),
    ],
)
def test_bad_audio_raises_its_error(broken, name, error):
    root, _ = broken
    with pytest.raises(error):
        decode_audio((root / name).read_bytes(), max_seconds=LIMITS.max_audio_seconds, ext="wav")


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_audio_keeps_rate_channels_duration(fmt):
    stereo = np.zeros((8000, 2), np.float32)
    buf = io.BytesIO()
    sf.write(buf, stereo, 16000, format=fmt)
    audio = decode_audio(buf.getvalue(), max_seconds=10, ext=fmt.lower())
    assert (audio.sample_rate, audio.channels, audio.format) == (16000, 2, fmt.lower())
    assert audio.duration == pytest.approx(0.5)
    assert audio.samples.shape == (8000, 2)


def test_text_is_normalised_and_bounded():
    assert decode_text("  a\u0301  photo\n of\tX ".encode(), max_chars=100) == "\u00e1 photo of X"
    with pytest.raises(errors.TextDecodeError):
        decode_text(b"\xff\xfe caf\xe9", max_chars=100)
    with pytest.raises(errors.EmptyText):
        decode_text(b" \n\t ", max_chars=100)
    with pytest.raises(errors.TextTooLong, match="max_text_chars=5"):
        decode_text(b"abcdef", max_chars=5)
