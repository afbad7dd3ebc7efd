"""The earlier name of :mod:`diskcache_ocr.hashing`, kept so existing imports work."""

from diskcache_ocr.hashing import KEY_BYTES, content_hash, derive_key, file_hash, fingerprint

__all__ = ["KEY_BYTES", "content_hash", "derive_key", "file_hash", "fingerprint"]
