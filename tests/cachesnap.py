"""Shared by the tests: a cache's whole content, comparable between two caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diskcache_ocr.store import KINDS, CacheStore


def snapshot(cache: Path) -> dict:
    """Every record (kind -> key -> digest of the raw value) and every index entry without
    its timestamp."""
    out: dict = {}
    with CacheStore(cache, readonly=True) as store:
        for kind in KINDS:
            records = {}
            for key in store.keys(kind):
                with store.reader() as r:
                    records[key] = hashlib.sha256(bytes(r.get_raw(kind, key))).hexdigest()
            out[kind] = records
        out["index"] = {
            source: (e.size, e.mtime_ns, e.content_hash, e.status, dict(e.keys))
            for source, e in store.iter_index()
        }
    return out
