"""Errors of the pipeline library.

Two families under ``features.errors.MmfpError``: ``SpecError`` (the user's
spec or command is wrong: the CLI prints one line and exits 2) and
``InputError`` (one input is bad: ``pipelines.quarantine`` turns it into a
quarantine row naming the class, the stage and the message; the job goes on).
"""

from __future__ import annotations

from features.errors import MmfpError as MmfpError  # the base of every family below


class SpecError(MmfpError):
    """The pipeline spec or a command-line argument is invalid."""


class InputError(MmfpError):
    """One input failed a check; ``stage`` says which stage refused it."""

    stage = "collect"


class MissingFile(InputError):
    """A path named by a manifest or listing does not exist."""


class EmptyFile(InputError):
    """A zero-byte file."""


class UnsafePath(InputError):
    """A path that is absolute, has a scheme, or escapes its source root."""


class UnsupportedFile(InputError):
    """A file whose extension maps to no modality."""


class AmbiguousSample(InputError):
    """Two files of the same modality for one sample key."""


class BadManifestRow(InputError):
    """A manifest row with no modality, or a value of the wrong type."""


class NotARegularFile(InputError):
    """A directory, FIFO, socket or device where a file was expected."""


class FileTooLarge(InputError):
    """A file or tar member larger than ``decode.max_file_bytes``: refused before reading."""


class UnreadableInput(InputError):
    """An input that failed in a way no decoder anticipated (the exception's type and message)."""


class NonFiniteMedia(InputError):
    """Audio samples or float pixels that are NaN or infinite."""


class CorruptShard(InputError):
    """A tar shard that cannot be read to its end."""


class ImageDecodeError(InputError):
    """Bytes that no image decoder accepts."""


class TruncatedImage(ImageDecodeError):
    """An image whose data ends before its declared end."""


class ImageTooLarge(InputError):
    """An image whose header declares more pixels than the configured limit."""


class AudioDecodeError(InputError):
    """Bytes that neither soundfile nor librosa can decode."""


class AudioTooLong(InputError):
    """Audio longer than the configured maximum duration."""


class EmptyAudio(InputError):
    """Audio with no frames."""


class TextDecodeError(InputError):
    """Text that is not valid UTF-8."""


class TextTooLong(InputError):
    """Text longer than the configured maximum length."""


class EmptyText(InputError):
    """Text that is empty after whitespace normalisation."""


class EncodeFailed(InputError):
    """An encoder failed on this row; the rest of its batch is encoded."""

    stage = "encode"


class DuplicateSample(InputError):
    """Identical content to a sample that another input of this run produced."""

    stage = "dedup"


class UnknownLabel(InputError):
    """A label outside the spec's closed vocabulary."""

    stage = "label"


class AugmentError(InputError):
    """One modality of one view could not be augmented; the view becomes an error row."""

    stage = "augment"
