from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from diskcache_ocr.dataset import CachedOCRDataset, collate
from diskcache_ocr.errors import CacheVersionError, TrainingSafetyError
from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.presets import PRESET_NAMES
from diskcache_ocr.schema import source_id
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths

N = 6


@pytest.fixture(scope="session")
def data(synth_data):
    return synth_data(N, 3, min_words=4, max_words=14, size=(360, 480), exif_fraction=0.35)


@pytest.fixture(scope="session")
def reference(data):
    """Every sample computed with no cache at all (maps included)."""
    ds = CachedOCRDataset(*split_paths(data), None, preset={"load_maps": True})
    return [ds[i] for i in range(len(ds))]


def assert_same(sample, ref, with_maps):
    assert torch.equal(sample["image"], ref["image"])
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 640, 640)
    assert torch.equal(sample["inverse_matrix"], ref["inverse_matrix"])
    assert len(sample["polygons"]) == len(ref["polygons"])
    for a, b in zip(sample["polygons"], ref["polygons"]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(sample["ignore"], ref["ignore"])
    assert sample["meta"] == ref["meta"]
    for name in MAP_NAMES:
        if with_maps:
            assert sample[name].dtype == torch.float32
            assert torch.equal(sample[name], ref[name]), name
        else:
            assert name not in sample


def unbatch(batch):
    n = len(batch["meta"])
    for i in range(n):
        yield {k: (v[i] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


# spawn (a fresh interpreter per worker: the dataset travels pickled) costs seconds per
# worker, and what travels does not depend on the preset: one preset, the one that caches
# every kind, runs under it. Worker processes are in the whole suite only.
@pytest.mark.parametrize("preset, workers, method", [
    pytest.param(preset, workers, method, marks=pytest.mark.full if workers else ())
    for workers, method in ((0, None), (2, "fork"), (2, "spawn")) for preset in PRESET_NAMES
    if method != "spawn" or preset == "validation_optimized"])
def test_every_preset_equals_uncached_bit_for_bit(data, reference, tmp_path, preset, workers,
                                                  method):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset=preset)
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers, collate_fn=collate,
                        multiprocessing_context=method, persistent_workers=workers > 0,
                        pin_memory=False, generator=torch.Generator().manual_seed(0))
    for _epoch in range(2):
        seen = []
        for batch in loader:
            for sample in unbatch(batch):
                i = sample["meta"]["index"]
                seen.append(i)
                assert_same(sample, reference[i], with_maps=ds.preset.load_maps)
        assert sorted(seen) == list(range(N))
    del loader
    stats = ds.stats()
    if ds.preset.cache_tensors:
        assert stats["tensors.hits"] >= N  # the second epoch at least came from the cache
    if ds.preset.cache_images and not ds.preset.cache_tensors:
        assert stats["images.hits"] >= N
    if not ds.preset.caches_anything:
        assert ds.store is None and not (tmp_path / "cache").exists()


def test_pin_memory_loader(data, reference, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized")
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate, pin_memory=True)
    for batch in loader:
        for sample in unbatch(batch):
            assert_same(sample, reference[sample["meta"]["index"]], with_maps=True)


def test_getitems_reads_a_batch_in_one_transaction(data, reference, tmp_path, monkeypatch):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized")
    calls = []
    original = CacheStore.reader

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(CacheStore, "reader", counting)
    sampler = BatchSampler(SequentialSampler(ds), batch_size=3, drop_last=False)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=collate)
    batches = list(loader)
    assert len(calls) == len(batches) == 2
    for batch in batches:
        for sample in unbatch(batch):
            assert_same(sample, reference[sample["meta"]["index"]], with_maps=True)


def test_a_first_epoch_preload_is_built_by_the_reads_not_the_constructor(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          preload="first-epoch")
    assert ds.plan.preload and not ds.store.is_open
    with CacheStore(tmp_path / "c", readonly=True) as s:
        assert s.kind_stats("tensors")["entries"] == 0  # nothing built before the first read
    for _ in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate):
        pass
    with CacheStore(tmp_path / "c", readonly=True) as s:
        for kind in ("images", "tensors", "maps"):
            assert s.kind_stats(kind)["entries"] == N


def test_preload_builds_everything_and_leaves_nothing_open(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          preload=True)
    assert not ds.store.is_open
    with CacheStore(tmp_path / "c", readonly=True) as s:
        for kind in ("images", "tensors", "maps"):
            assert s.kind_stats(kind)["entries"] == N
        assert len(dict(s.iter_index())) == N
        header = s.header()
        assert set(header["kinds"]) == {"images", "tensors", "maps"}
        assert header["preset"] == "validation_optimized"


def test_tensor_cache_refused_for_a_random_transform(data, tmp_path):
    with pytest.raises(TrainingSafetyError, match="not deterministic"):
        CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                         split="train")
    # The check probes the transform, not the split's name.
    with pytest.raises(TrainingSafetyError):
        CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                         split="val", transform=TransformConfig(hflip_prob=0.3))
    CachedOCRDataset(*split_paths(data), tmp_path / "d", preset="validation_optimized",
                     split="train", transform=TransformConfig())
    # Image caching is fine for training.
    CachedOCRDataset(*split_paths(data), tmp_path / "e", preset="balanced", split="train")
    with pytest.warns(UserWarning, match="not deterministic"):
        CachedOCRDataset(*split_paths(data), tmp_path / "f", preset="validation_optimized",
                         split="train", allow_random_tensor_cache=True)


@pytest.mark.full
def test_training_flip_changes_image_and_polygons_together(data):
    ds = CachedOCRDataset(*split_paths(data), None, preset={"load_maps": True}, split="train")
    plain = CachedOCRDataset(*split_paths(data), None, preset={"load_maps": True}, split="val")
    torch.manual_seed(0)
    flips = 0
    for _ in range(12):
        s, p = ds[1], plain[1]
        if not torch.equal(s["image"], p["image"]):
            flips += 1
            w = int(round(p["meta"]["orig_size"][1] * 640 / max(p["meta"]["orig_size"])))
            assert torch.equal(s["image"][:, :, :w], p["image"][:, :, :w].flip(-1))
            for a, b in zip(s["polygons"], p["polygons"]):
                assert np.allclose(a[:, 0], w - b[:, 0], atol=1e-4)
            # The maps follow the flipped words. Not bit-equal to the mirrored plain maps
            # (a polygon is rasterized on pixel centres, which a mirror shifts by up to a
            # pixel), but nearly all of their text pixels coincide.
            got, mirrored = s["prob_map"][..., :w] > 0, p["prob_map"][..., :w].flip(-1) > 0
            union = (got | mirrored).sum().item()
            assert union > 0 and (got & mirrored).sum().item() / union > 0.8
            assert not torch.equal(s["prob_map"], p["prob_map"])
    assert 0 < flips < 12


def test_cached_sample_survives_in_place_ops(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized")
    s = ds[0]
    before = ds[0]["image"].clone()
    for name in ("image", *MAP_NAMES, "inverse_matrix"):
        s[name].add_(1)  # on a view of the memory map this would kill the process
    for poly in s["polygons"]:
        poly += 1
    assert torch.equal(ds[0]["image"], before)


def test_changed_source_is_recomputed_not_served_stale(data, reference, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    ds = CachedOCRDataset(*split_paths(root), tmp_path / "c", preset="validation_optimized")
    assert_same(ds[0], reference[0], with_maps=True)
    # Replace image 0's bytes by image 1's (new size and mtime).
    src = split_paths(root)[0]
    names = sorted(os.listdir(src))
    (src / names[0]).write_bytes((src / names[1]).read_bytes())
    fresh = CachedOCRDataset(*split_paths(root), None, preset={"load_maps": True})[0]
    assert_same(ds[0], fresh, with_maps=True)
    assert not torch.equal(fresh["image"], reference[0]["image"])


def test_version_bump_rebuilds_exactly_that_kind(data, tmp_path):
    CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                     preload=True)
    new = TransformConfig(mean=(0.5, 0.5, 0.5))
    with pytest.raises(CacheVersionError, match="tensors"):
        CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                         transform=new)
    with CacheStore(tmp_path / "c") as s:
        images_before = sorted(s.keys("images"))
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          transform=new, on_mismatch="rebuild", preload=True)
    with CacheStore(tmp_path / "c") as s:
        assert sorted(s.keys("images")) == images_before  # decoded images kept
        assert s.kind_stats("tensors")["entries"] == N  # rebuilt by the preload
    fresh = CachedOCRDataset(*split_paths(data), None, preset={"load_maps": True}, transform=new)
    assert_same(ds[2], fresh[2], with_maps=True)


def test_bad_images_and_annotations_are_skipped_with_a_reason(data, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    images, ann = split_paths(root)
    names = sorted(os.listdir(images))
    (images / names[2]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    doc = json.loads(ann.read_text())
    words = doc["images"][names[3]]["words"]
    first = sorted(words)[0]
    words[first]["points"] = words[first]["points"][:3]
    doc["images"]["missing.jpg"] = {"words": {}}
    ann.write_text(json.dumps(doc))
    caplog.set_level(logging.WARNING)
    ds = CachedOCRDataset(images, ann, tmp_path / "c", preset="balanced")
    problems = [str(p) for p in ds.annotations.problems]
    assert any("missing.jpg" in p for p in problems)
    assert any(names[3] in p and first in p and "4 points" in p for p in problems)
    assert len(ds) == N
    loader = DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate)
    metas = [m for batch in loader for m in batch["meta"]]
    bad = [m for m in metas if m["error"]]
    assert [m["file"] for m in bad] == [names[2]]
    assert "cannot" in bad[0]["error"] or "decode" in bad[0]["error"]
    assert any(names[2] in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    entry = ds.store.get_index(source_id(images, names[2]))
    assert entry is not None and entry.status.startswith("failed:")
    assert len(ds[3]["polygons"]) == len(words) - 1


def test_split_without_annotations_loads_images_only(data):
    ds = CachedOCRDataset(split_paths(data)[0], None, None)
    assert len(ds) == N
    s = ds[0]
    assert s["polygons"] == [] and s["image"].shape == (3, 640, 640)


def test_index_is_held_in_numpy_arrays_and_pickles_small(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="balanced")
    held = {k: v for k, v in vars(ds.catalog).items() if k not in ("images_dir", "problems")}
    assert len(held) >= 5  # files, word starts, point starts, points, ignore flags (at least)
    for name, value in held.items():
        assert isinstance(value, np.ndarray), name
        assert value.dtype != object, name
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["image"], ds[1]["image"])


def test_an_omitted_cache_dir_is_the_command_lines_default(data, tmp_path, monkeypatch):
    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(tmp_path / "env"))
    ds = CachedOCRDataset(*split_paths(data), None, preset="balanced")
    assert ds.store is not None and ds.store.path == tmp_path / "env"
    _ = ds[0]
    assert (tmp_path / "env" / "data.mdb").exists()


def test_readonly_dataset_reads_without_writing(data, reference, tmp_path):
    CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized")
    ro = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          readonly=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(ro[4], reference[4], with_maps=True)


def test_polygons_pickle_as_one_array_and_come_back_as_views(data):
    ds = CachedOCRDataset(*split_paths(data), None)
    polygons = ds[0]["polygons"]
    assert len(polygons) > 2 and all(p.base is polygons[0].base for p in polygons)
    raw = pickle.dumps(polygons)
    back = pickle.loads(raw)
    assert isinstance(back, list) and len(back) == len(polygons)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(back, polygons))
    assert all(p.base is back[0].base for p in back)  # views of one array again
    # Two arrays go into the pickle (the points, where they split), not one per polygon.
    assert arrays_pickled(polygons) == 2
    assert arrays_pickled(list(polygons)) == len(polygons)


def arrays_pickled(obj):
    seen = []

    class Counting(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, np.ndarray):
                seen.append(o)
            return None

    Counting(io.BytesIO()).dump(obj)
    return len(seen)


def test_changed_polygon_lists_pickle_as_they_are(data):
    ds = CachedOCRDataset(*split_paths(data), None)
    extra = np.ones((3, 2), np.float32)
    grown = ds[0]["polygons"]
    grown.append(extra)
    replaced = ds[0]["polygons"]
    replaced[0] = extra
    shrunk = ds[0]["polygons"]
    del shrunk[0]
    for polygons in (grown, replaced, shrunk):
        back = pickle.loads(pickle.dumps(polygons))
        assert len(back) == len(polygons)
        assert all(np.array_equal(a, b) for a, b in zip(back, polygons))
    in_place = ds[0]["polygons"]
    in_place[1][0, 0] = -7.0  # a view: the one array it pickles from has the change
    assert pickle.loads(pickle.dumps(in_place))[1][0, 0] == -7.0
