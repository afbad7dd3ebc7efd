"""Every command on every cache, whichever pipeline wrote it: the built-in pipeline, the
origin convention's images-only cache (the drop-in with ``balanced``), an albumentations Compose
with tensors but no maps, a versioned callable with everything cached, and a random Compose
whose deterministic prefix is cached. Each command exits 0 (``health`` reports, ``verify``
checks) and ``status`` says what the cache holds and which pipeline wrote it."""

from __future__ import annotations

import json

import pytest
from testkit import run_cli

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.store import KINDS, CacheStore
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")

from test_user_pipeline import SIDE, my_transform, train_transform, val_transform  # noqa: E402

N = 3
IMAGES_TENSORS = {"cache_config": {"cache_images": True, "cache_transformed_tensors": True}}
EVERYTHING = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}

# name -> (dataset options, pipeline name in status, kinds that hold records)
CASES = {
    "builtin-balanced": ({"preset": "balanced"}, "built-in", {"images"}),
    "origin-balanced": ({"preset": "balanced", "convention": "origin"}, "user", {"images"}),
    "albu-tensors": ({"preset": IMAGES_TENSORS, "convention": "origin",
                      "transform": val_transform()}, "user", {"images", "tensors"}),
    "callable-all": ({"preset": EVERYTHING, "transform": my_transform,
                      "transform_version": {"side": SIDE, "v": 1}}, "user", set(KINDS)),
    "albu-random-prefix": ({"preset": IMAGES_TENSORS, "convention": "origin",
                            "transform": train_transform(), "split": "train"}, "user",
                           {"tensors"}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("any-cache-data")
    synthesize(root, N, seed=8, min_words=3, max_words=6, size=(150, 190))
    return root


@pytest.fixture(scope="module", params=sorted(CASES))
def cache(request, data, tmp_path_factory):
    """(case name, cache directory) written by reading every sample through the case's
    dataset."""
    options, _, _ = CASES[request.param]
    cache = tmp_path_factory.mktemp(request.param) / "cache"
    ds = CachedOCRDataset(*split_paths(data), cache, **options)
    for i in range(len(ds)):
        ds[i]
    ds.close()
    return request.param, cache


def _entries(cache):
    with CacheStore(cache, readonly=True) as store:
        return {k: store.kind_stats(k)["entries"] for k in KINDS}


def test_status_reports_what_any_pipeline_wrote(cache, capsys):
    name, path = cache
    _, pipeline, holds = CASES[name]
    rc, out, err = run_cli(capsys, "status", "--cache", path, "--json")
    assert rc == 0, err
    data = json.loads(out)
    entries = _entries(path)
    assert {k for k, n in entries.items() if n} == holds
    for kind in KINDS:
        assert data["kinds"][kind]["entries"] == entries[kind]
        assert (data["kinds"][kind]["bytes"] > 0) == (kind in holds)
    assert data["pipeline"]["name"] == pipeline
    if pipeline == "user":
        # each cached kind names the fingerprint it was written under
        assert all(data["kinds"][k]["stored_version"].startswith(("stage/", "1/"))
                   for k in holds)
        assert data["kinds"]["images"]["up_to_date"] is True
    rc, out, err = run_cli(capsys, "status", "--cache", path)
    assert rc == 0 and "Traceback" not in err
    assert ("pipeline: yours (" if pipeline == "user" else "pipeline: built-in") in out
    if name == "albu-tensors":
        assert "albumentations Compose (LongestMaxSize, PadIfNeeded, Normalize)" in out
    if name == "callable-all":
        assert "callable" in out and "my_transform" in out


def test_export_writes_the_report_of_any_cache(cache, capsys, tmp_path):
    name, path = cache
    rc, _, err = run_cli(capsys, "export", "--cache", path, "--output", tmp_path / "s.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["status"]["kinds"]["images"]["entries"] == _entries(path)["images"]
    assert report["status"]["pipeline"]["name"] == CASES[name][1]
    assert set(report["statistics"]["per_kind"]) == set(KINDS)


def test_health_verify_clear_and_copy_work_on_any_cache(cache, capsys, tmp_path):
    name, path = cache
    rc, out, err = run_cli(capsys, "health", "--cache", path, "--json")
    assert rc == 0 and json.loads(out)["ok"], out + err
    rc, out, err = run_cli(capsys, "verify", "--cache", path, "--json")
    assert rc == 0, err
    assert json.loads(out)["checked"] == sum(_entries(path).values())
    rc, out, err = run_cli(capsys, "clear", "--cache", path, "--stale", "--dry-run", "--json")
    assert rc == 0, err
    assert json.loads(out)["removed"] == {"index": 0, "images": 0, "tensors": 0, "maps": 0}
    rc, _, err = run_cli(capsys, "copy", "--cache", path, tmp_path / "copy")
    assert rc == 0, err
    assert _entries(tmp_path / "copy") == _entries(path)
    rc, _, err = run_cli(capsys, "clear", "--cache", tmp_path / "copy", "--kind", "tensors")
    assert rc == 0, err
    assert _entries(tmp_path / "copy")["tensors"] == 0
