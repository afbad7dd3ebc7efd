"""The read-through engine's public surface, on its own (the faces are tested elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.schema import source_id
from diskcache_ocr.synth import split_paths


@pytest.fixture(scope="module")
def prebuilt(synth_data, tmp_path_factory):
    images, annotations = split_paths(synth_data(3, 13, min_words=3, max_words=8,
                                                 size=(200, 260)))
    cache = tmp_path_factory.mktemp("rt") / "cache"
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized")
    return images, annotations, cache, ds


def test_keys_name_the_records_the_index_points_to(prebuilt):
    _, _, _, ds = prebuilt
    for i in range(len(ds)):
        entry = ds.store.get_index(source_id(ds.images_dir, ds.source(i)))
        assert ds.engine.keys(i, entry.content_hash) == dict(entry.keys)


def test_recompute_equals_the_cached_records_bit_for_bit(prebuilt):
    images, _, _, ds = prebuilt
    for i in range(len(ds)):
        data = (images / ds.source(i)).read_bytes()
        fresh = ds.engine.recompute(i, data)
        assert set(fresh) == {"images", "tensors", "maps"}
        for kind, (key, arrays) in fresh.items():
            cached = ds.store.get(kind, key)
            assert cached is not None, (kind, i)
            assert set(cached) == set(arrays)
            for name, arr in arrays.items():
                assert cached[name].dtype == arr.dtype and np.array_equal(cached[name], arr)


def test_nothing_is_missing_after_a_build_and_a_rebuilt_kind_is(prebuilt):
    _, _, _, ds = prebuilt
    assert ds.engine.missing(range(len(ds))) == ([], [])
    ds.store.drop("maps")
    assert ds.engine.missing(range(len(ds))) == (list(range(len(ds))), [])
    results = ds.engine.build(range(len(ds)))
    assert [(r.error, r.computed) for r in results] == [(None, True)] * len(ds)
    assert ds.engine.missing(range(len(ds))) == ([], [])


def test_finish_widens_a_compact_batch_to_what_the_plain_path_returns(prebuilt):
    _, _, _, ds = prebuilt
    plain = ds.engine.batch([0, 1], ds.engine.buffers(2))
    compact = ds.engine.batch([0, 1], ds.engine.buffers(2, compact=True))
    assert compact["image"].dtype.itemsize == 1 and compact["prob_map"].dtype.itemsize == 1
    finished = ds.engine.finish(compact)
    for name in ("image", "prob_map", "prob_mask", "thresh_mask", "thresh_map"):
        assert finished[name].dtype == plain[name].dtype, name
        assert np.array_equal(finished[name].numpy(), plain[name].numpy()), name


def test_a_stage_pipeline_reading_a_file_replaced_under_its_stat_uses_the_new_bytes(tmp_path):
    """A stage pipeline reads the file for its ``tensors`` record even when the decoded image
    is cached (the record carries the raw size and orientation). When that file was replaced
    and the index entry still trusted (``check_source=False``), the cached image is of the
    old content: every part of the sample comes from the bytes read, as if nothing were
    cached."""
    import os

    import torch
    from PIL import Image

    images = tmp_path / "img"
    images.mkdir()
    path = images / "a.bmp"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(path)
    before = path.stat()
    cache = tmp_path / "cache"
    args = {"preset": "balanced", "convention": "origin", "item_keys": "db"}
    CachedOCRDataset(images, None, cache, **args)[0]  # the old image cached and indexed
    Image.new("RGB", (64, 48), (255, 0, 0)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    got = CachedOCRDataset(images, None, cache, check_source=False, **args)[0]
    want = CachedOCRDataset(images, None, None, **{**args, "preset": "none"})[0]
    assert got["meta"]["error"] is None
    assert torch.equal(got["image"], want["image"])
