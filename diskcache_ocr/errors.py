"""The library's exceptions: one root, each subclass also a matching builtin."""

from __future__ import annotations


class CacheError(Exception):
    """Root of every error diskcache-ocr raises on purpose."""


class CacheFormatError(CacheError, ValueError):
    """A stored record or header is malformed, foreign or damaged."""


class CacheNewerFormatError(CacheFormatError):
    """The cache was written by a newer version of the library, in a format this one cannot
    read: intact, not damaged (upgrade the library; never clear it to read it)."""


class CacheVersionError(CacheError, RuntimeError):
    """A kind's stored version or fingerprint differs from the expected one."""


class CacheFullError(CacheError, OSError):
    """The disk (not the map) has no room left for a write."""


class CacheClosedError(CacheError, RuntimeError):
    """A view or store was used after its transaction or environment ended."""


class SourceError(CacheError, ValueError):
    """A source file (image or annotation) cannot be used; names the file."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class AnnotationError(SourceError):
    """An annotation file or one of its words is malformed."""


class ImageDecodeError(SourceError):
    """An image cannot be decoded (corrupt, truncated, not an image, too large)."""


class BatchError(CacheError, ValueError):
    """Samples that cannot form one batch, or a batch that cannot be finished correctly."""


class PresetError(CacheError, ValueError):
    """A preset file is missing, malformed, or names an unknown key."""


class TrainingSafetyError(CacheError, ValueError):
    """Tensor caching was requested for a transform that is not deterministic."""
