"""Resource exhaustion: a map that fills up grows; a disk that fills up is a clear
CacheFullError that leaves the store intact and readable, and the next run completes once
space is freed; more readers than slots is a clear CacheError, not a hang."""

from __future__ import annotations

import json
import logging
import os

import pytest
from relhelp import (
    Child,
    diff_snapshots,
    fill_disk,
    run_epoch,
    sample_digest,
    small_tmpfs,
    snapshot,
)

SMALL = 320  # transform size that lets a whole build fit the 40 MiB disk


def test_a_tiny_map_grows_in_two_workers_at_once(tiny, clean_build, tmp_path):
    from diskcache_ocr.store import CacheStore

    cache = tmp_path / "cache"
    child = Child(run_epoch, str(tiny.images), str(tiny.annotations), str(cache), 2,
                  str(tmp_path / "epoch.json"), {"map_size": 1 << 16}, log=tmp_path / "log")
    assert child.join(180) == 0, child.log_text()
    assert json.loads((tmp_path / "epoch.json").read_text()) == {
        "samples": len(tiny.names), "errors": []}
    with CacheStore(cache, map_size=1 << 16) as store:
        assert store.info()["map_size"] > 1 << 16
    assert not diff_snapshots(snapshot(cache), clean_build)


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", 40) as mnt:
        yield mnt


def test_disk_full_is_a_clear_error_and_the_store_stays_intact(tiny, small_disk, tmp_path,
                                                               caplog):
    import numpy as np

    from diskcache_ocr import ops
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.errors import CacheFullError
    from diskcache_ocr.ocr.transform import TransformConfig
    from diskcache_ocr.prebuild import prebuild
    from diskcache_ocr.store import CacheStore

    transform = TransformConfig(size=SMALL)
    fresh = CachedOCRDataset(tiny.images, tiny.annotations, None, transform=transform,
                             preset={"load_maps": True})
    refs = [sample_digest(fresh[i]) for i in range(len(fresh))]
    clean = tmp_path / "clean"
    prebuild(tiny.images, tiny.annotations, clean, transform=transform, progress=False)
    want = snapshot(clean)

    cache = small_disk / "cache"
    ds = CachedOCRDataset(tiny.images, tiny.annotations, cache, transform=transform,
                          preset="validation_optimized", preload=False)
    assert [sample_digest(ds[i]) for i in range(3)] == refs[:3]
    before = snapshot(cache)
    filler = fill_disk(small_disk)

    store = CacheStore(cache)
    with pytest.raises(CacheFullError, match="disk is full") as info:
        store.put("images", b"x" * 32, {"image": np.zeros((512, 512, 3), np.uint8)})
    assert str(cache) in str(info.value)
    # Reads go on: every sample is served (computed), the writes are skipped with a warning.
    with caplog.at_level(logging.WARNING, logger="diskcache_ocr.dataset"):
        assert [sample_digest(ds[i]) for i in range(len(ds))] == refs
    assert "not cached" in caplog.text and "disk is full" in caplog.text
    with pytest.raises(CacheFullError):
        prebuild(tiny.images, tiny.annotations, cache, transform=transform, progress=False)
    during = snapshot(cache)
    for part in before:  # what was stored before is all still there, unchanged
        assert before[part].items() <= during[part].items(), part
    assert ops.verify(cache)["corrupt"] == []
    assert "corrupt" not in {p["code"] for p in ops.health(cache)["problems"]}

    filler.unlink()
    summary = prebuild(tiny.images, tiny.annotations, cache, transform=transform, progress=False)
    assert not summary.failed
    assert not diff_snapshots(snapshot(cache), want)
    assert [sample_digest(ds[i]) for i in range(len(ds))] == refs
    ds.close()
    store.close()


def test_more_readers_than_slots_is_a_clear_error(tiny, tmp_path):
    """Four DataLoader workers, two reader slots: the extra workers fail with a CacheError
    that names the problem, and the epoch ends (no hang)."""
    child = Child(run_epoch, str(tiny.images), str(tiny.annotations), str(tmp_path / "cache"),
                  4, str(tmp_path / "epoch.json"), {"max_readers": 2}, log=tmp_path / "log")
    rc = child.join(180)
    log = child.log_text()
    assert rc == 1, log
    assert "CacheError" in log and "reader slots are taken" in log, log
    assert not os.path.exists(tmp_path / "epoch.json")
