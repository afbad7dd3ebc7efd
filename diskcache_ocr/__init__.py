"""diskcache-ocr: a persistent, crash-safe LMDB disk cache for OCR text-detection datasets."""

from diskcache_ocr._version import __version__
from diskcache_ocr.dataset import CachedOCRDataset, collate  # noqa: E402
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
from diskcache_ocr.loader import BatchLoader  # noqa: E402
from diskcache_ocr.prebuild import prebuild  # noqa: E402
from diskcache_ocr.presets import Preset, load_preset  # noqa: E402
from diskcache_ocr.samples import finish_batch
from diskcache_ocr.schema import IndexEntry, KindVersion
from diskcache_ocr.store import CacheStore

__all__ = [
    "BatchLoader",
    "CachedOCRDataset",
    "Preset",
    "collate",
    "finish_batch",
    "load_preset",
    "prebuild",
    "AnnotationError",
    "CacheClosedError",
    "CacheError",
    "CacheFormatError",
    "CacheFullError",
    "CacheStore",
    "CacheVersionError",
    "ImageDecodeError",
    "IndexEntry",
    "KindVersion",
    "PresetError",
    "SourceError",
    "TrainingSafetyError",
    "__version__",
]
