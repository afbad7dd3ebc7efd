"""Read-ahead advice on the map: lookups page in only what they touch, records get read-around.

The kernel shows the advice of a mapping in /proc/self/smaps (``rr`` among its VmFlags:
random read, no read-around), so these tests read the state itself rather than timing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from diskcache_ocr.keys import content_hash
from diskcache_ocr.store import CacheStore

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"),
                                reason="needs /proc/self/smaps (Linux)")


def _random_read(cache: Path) -> bool | None:
    """Whether this process's mapping of cache/data.mdb is advised random (None: not mapped)."""
    inode = str(os.stat(cache / "data.mdb").st_ino)
    mapped, flags = False, []
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                inside = fields[4] == inode and line.rstrip().endswith("/data.mdb")
                mapped = mapped or inside
            elif inside and fields[0] == "VmFlags:":
                flags.append("rr" in fields[1:])
    return all(flags) if mapped else None


def _filled(path: Path, **options) -> tuple[CacheStore, bytes]:
    store = CacheStore(path, **options)
    key = content_hash(b"one")
    store.put("tensors", key, {"x": np.arange(1 << 16, dtype=np.float32)})
    store.close()
    return CacheStore(path, **options), key


def test_lookups_are_random_until_the_first_record_read(tmp_path):
    store, key = _filled(tmp_path / "c")
    assert store.contains("tensors", key) and store.kind_stats("tensors")["entries"] == 1
    assert _random_read(tmp_path / "c") is True  # opened, keys looked up: no read-around
    assert store.get("tensors", key)["x"][-1] == (1 << 16) - 1
    assert _random_read(tmp_path / "c") is False  # a record read: read-around back
    store.close()


def test_raw_record_reads_restore_read_around_too(tmp_path):
    store, key = _filled(tmp_path / "c")
    with store.reader() as r:
        assert r.get_raw("tensors", key) is not None
    assert _random_read(tmp_path / "c") is False
    store.close()


def test_a_scan_of_keys_is_random_then_read_around_again(tmp_path):
    store, key = _filled(tmp_path / "c")
    store.get("tensors", key)
    assert _random_read(tmp_path / "c") is False
    with store.lookups():
        assert _random_read(tmp_path / "c") is True
        assert store.contains("tensors", key)
    assert _random_read(tmp_path / "c") is False
    store.close()


def test_without_readahead_the_map_stays_random(tmp_path):
    store, key = _filled(tmp_path / "c", readahead=False)
    store.get("tensors", key)
    assert _random_read(tmp_path / "c") is True  # (LMDB's own MDB_NORDAHEAD)
    with store.lookups():
        pass
    assert _random_read(tmp_path / "c") is True
    store.close()


def test_reopened_after_close_starts_with_lookups_again(tmp_path):
    store, key = _filled(tmp_path / "c")
    store.get("tensors", key)
    store.close()
    store = CacheStore(tmp_path / "c")
    assert store.contains("tensors", key)
    assert _random_read(tmp_path / "c") is True
    store.close()
