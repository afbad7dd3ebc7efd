"""status and health read a cache's header, index and tree counts, never its records, and
judge hit rates only where readers look: a fresh prebuild is healthy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from testkit import drop_page_cache, private_copy

from diskcache_ocr.ops import health, read_kinds
from diskcache_ocr.store import CacheStore, warming
from diskcache_ocr.synth import split_paths


@pytest.fixture
def case(built, tmp_path):
    data, cache = private_copy(*built, tmp_path)
    return (*split_paths(data), cache)


def test_a_fresh_prebuild_is_healthy_though_its_own_lookups_missed(case):
    images, _, cache = case
    with CacheStore(cache, readonly=True) as store:
        stats = store.stats()
    assert stats["images.misses"] > 0 and stats.get("images.hits", 0) == 0  # the build's
    assert health(cache, images_dir=images, min_reads=1) == {"ok": True, "problems": []}


def test_misses_beyond_the_first_fills_are_judged(case):
    images, _, cache = case
    with CacheStore(cache) as store:
        entries = store.kind_stats("tensors")["entries"]
        store.count("tensors", hits=2, misses=30)  # recomputed again and again
    found = {p["code"]: p["detail"] for p in health(cache, images_dir=images)["problems"]}
    assert set(found) == {"low_hit_rate"}
    assert found["low_hit_rate"].startswith(f"tensors: 2/{32 + entries - entries}")
    assert f"not counting the {entries} that first wrote" in found["low_hit_rate"]


def test_images_of_a_cache_with_tensors_are_not_judged(case):
    images, _, cache = case  # (validation_optimized: images are read only to build tensors)
    with CacheStore(cache) as store:
        store.count("images", misses=500)
    assert health(cache, images_dir=images)["ok"] is True


@pytest.mark.parametrize("presets, kinds", [
    (["validation_optimized"], {"tensors", "maps"}),
    (["balanced"], {"images"}),
    (["balanced", "validation_optimized"], {"images", "tensors", "maps"}),
    (["none"], set()),
    (["/no/such/custom.yaml"], {"images", "tensors", "maps"}),
    ([None], {"images", "tensors", "maps"}),
])
def test_read_kinds_follow_each_pipelines_preset(presets, kinds):
    header = {"pipelines": {f"role{i}": {"described": {"preset": p}}
                            for i, p in enumerate(presets)}}
    assert read_kinds(header) == kinds
    assert read_kinds({"preset": "balanced"}) == {"images"}  # (a header without pipelines)


def test_health_reads_no_record_unless_asked(case, monkeypatch):
    images, _, cache = case

    def refused(self, kind):
        raise AssertionError("health read a record")

    monkeypatch.setattr(CacheStore, "iter_raw", refused)
    assert health(cache, images_dir=images)["ok"] is True
    with pytest.raises(AssertionError, match="read a record"):
        health(cache, images_dir=images, records=True)


def test_status_and_health_read_only_index_pages_and_load_no_torch(case):
    _, _, cache = case
    data = cache / "data.mdb"
    drop_page_cache(data)
    before = warming.resident_bytes(data)
    if before is None or before > data.stat().st_size // 20:
        pytest.skip(f"the page cache kept {before} bytes of the file: nothing to measure")
    code = ("import json, sys\nfrom diskcache_ocr import cli\n"
            "codes = [cli.main([c, '--cache', sys.argv[1], '--json']) for c in "
            "('status', 'health')]\n"
            "print(json.dumps([codes, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    codes, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert codes == [0, 0] and torch_loaded is False
    read = warming.resident_bytes(data) - before
    # (the records are most of the file; the index, trees and header a few pages)
    assert read < data.stat().st_size // 20, (read, data.stat().st_size)
