"""``clear --all`` while other processes open the cache: nobody is left writing one cache's
data file under another's lock table (the way a record got torn, or ``verify`` misread one)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from relhelp import Child, paused_wipe, record_arrays, record_key, wait_for, write_records

from diskcache_ocr import ops
from diskcache_ocr.store import CacheStore

N = 30


def test_an_open_during_the_clear_never_mixes_the_old_and_new_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with CacheStore(cache) as store:
        for i in range(7):  # (several commits: the lock table's transaction id is not 1)
            store.put("images", record_key("old", i), record_arrays("old", i))
    paused, go = tmp_path / "paused", tmp_path / "go"
    wiper = Child(paused_wipe, str(cache), str(paused), str(go), log=tmp_path / "wipe.log")
    wait_for(paused.exists, 120, "the clear to pause between its two files")
    # A process opening the cache now (a DataLoader worker of the next epoch) ...
    a = Child(write_records, str(cache), "a", N, 0.02, str(tmp_path / "a.json"),
              log=tmp_path / "a.log")
    time.sleep(1.0)
    go.write_text("go")
    assert wiper.join(120) == 0, wiper.log_text()
    # ... and one opening it after the clear, both writing at the same time.
    b = Child(write_records, str(cache), "b", N, 0.02, str(tmp_path / "b.json"),
              log=tmp_path / "b.log")
    for child in (a, b):
        assert child.join(120) == 0, child.log_text()
    results = {tag: json.loads((tmp_path / f"{tag}.json").read_text()) for tag in "ab"}
    assert results == {"a": {"bad": []}, "b": {"bad": []}}, results
    report = ops.verify(cache)
    assert report["corrupt"] == [], report["corrupt"]
    with CacheStore(cache, readonly=True) as store:
        keys = set(store.keys("images"))
        for tag in "ab":
            for i in range(N):
                got = store.get("images", record_key(tag, i))
                assert got is not None, f"{tag}/{i} lost"
                assert np.array_equal(got["image"], record_arrays(tag, i)["image"]), (tag, i)
    assert not any(record_key("old", i) in keys for i in range(7))
