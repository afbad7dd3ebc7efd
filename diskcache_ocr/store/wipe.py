"""The earlier name of :mod:`diskcache_ocr.store.remove` (``wipe`` is now
:func:`~diskcache_ocr.store.remove.remove_cache`); kept so existing imports work."""

from diskcache_ocr.store.remove import (
    CACHE_FILES,
    DERIVED_DIRS,
    WRITER_WAIT_S,
    has_cache,
    remove_cache,
)

wipe = remove_cache

__all__ = ["CACHE_FILES", "DERIVED_DIRS", "WRITER_WAIT_S", "has_cache", "remove_cache", "wipe"]
