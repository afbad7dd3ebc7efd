"""Renamed things keep their earlier names as aliases: the same object, the same behaviour."""

from __future__ import annotations

import numpy as np

from diskcache_ocr.store import CacheStore


def test_emptying_a_store_under_its_earlier_name(tmp_path):
    assert CacheStore.wipe is CacheStore.empty
    with CacheStore(tmp_path / "c") as store:
        store.put("images", b"k" * 32, {"i": np.zeros(3, np.uint8)})
        store.wipe()
        assert store.get("images", b"k" * 32) is None
        assert store.kind_stats("images")["entries"] == 0
        assert store.header()["format"]  # (the header stays)


def test_copy_takes_the_earlier_keyword(tmp_path):
    with CacheStore(tmp_path / "c") as store:
        for i in range(20):
            store.put("images", bytes([i]) * 32, {"i": np.full(50_000, i, np.uint8)})
        for i in range(15):
            store.delete("images", bytes([i]) * 32)
        whole = store.copy_to(tmp_path / "whole", compact=False)
        live = store.copy_to(tmp_path / "live")
    assert (live / "data.mdb").stat().st_size < (whole / "data.mdb").stat().st_size
    with CacheStore(whole, readonly=True) as a, CacheStore(live, readonly=True) as b:
        assert a.keys("images") == b.keys("images") and len(a.keys("images")) == 5


def test_removing_a_cache_under_its_earlier_name(tmp_path):
    from diskcache_ocr.store import remove, wipe

    assert wipe.wipe is remove.remove_cache and wipe.has_cache is remove.has_cache
    with CacheStore(tmp_path / "c") as store:
        store.put("images", b"k" * 32, {"i": np.zeros(3, np.uint8)})
    assert wipe.wipe(tmp_path / "c")["removed"]["images"] == 1
    assert not (tmp_path / "c").exists()


def test_hashing_under_its_earlier_module_name():
    from diskcache_ocr import hashing, keys

    for name in hashing.__all__:
        assert getattr(keys, name) is getattr(hashing, name)


def test_the_prefix_cut_under_its_earlier_names():
    from diskcache_ocr.ocr import albu_cut

    assert albu_cut.split_deterministic_prefix is albu_cut.cut_deterministic_prefix
    assert albu_cut.split_normalize_tail is albu_cut.cut_normalize_tail
    assert albu_cut.SplitTransform is albu_cut.PrefixCut
