"""diskcache-ocr: a persistent, crash-safe LMDB disk cache for OCR text-detection datasets.

The names below load on first use (PEP 562), so ``import diskcache_ocr.errors`` or the command
line's ``status`` does not import torch; ``from diskcache_ocr import CachedOCRDataset`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diskcache_ocr._version import __version__

# name -> the module that defines it
_LAZY = {
    "CachedOCRDataset": "dataset", "collate": "dataset",
    "BatchLoader": "loader", "prebuild": "prebuild",
    "Preset": "presets", "load_preset": "presets",
    "finish_batch": "samples",
    "IndexEntry": "schema", "KindVersion": "schema",
    "CacheStore": "store",
    **{name: "errors" for name in (
        "AnnotationError", "CacheClosedError", "CacheError", "CacheFormatError",
        "CacheFullError", "CacheVersionError", "ImageDecodeError", "PresetError",
        "SourceError", "TrainingSafetyError")},
}

__all__ = [
    "AnnotationError", "BatchLoader", "CacheClosedError", "CacheError", "CacheFormatError",
    "CacheFullError", "CacheStore", "CacheVersionError", "CachedOCRDataset", "ImageDecodeError",
    "IndexEntry", "KindVersion", "Preset", "PresetError", "SourceError", "TrainingSafetyError",
    "__version__", "collate", "finish_batch", "load_preset", "prebuild",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diskcache_ocr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"diskcache_ocr.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from diskcache_ocr.dataset import CachedOCRDataset, collate
    from diskcache_ocr.errors import (
        AnnotationError,
        CacheClosedError,
        CacheError,
        CacheFormatError,
        CacheFullError,
        CacheVersionError,
        ImageDecodeError,
        PresetError,
        SourceError,
        TrainingSafetyError,
    )
    from diskcache_ocr.loader import BatchLoader
    from diskcache_ocr.prebuild import prebuild
    from diskcache_ocr.presets import Preset, load_preset
    from diskcache_ocr.samples import finish_batch
    from diskcache_ocr.schema import IndexEntry, KindVersion
    from diskcache_ocr.store import CacheStore
