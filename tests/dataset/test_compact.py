"""Compact output: stored forms through any loader, made float32 by ``finish_batch``, bit for
bit what the default output returns."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import pin_memory as pin_module

from diskcache_ocr import CachedOCRDataset, collate, finish_batch, load_preset
from diskcache_ocr.errors import PresetError
from diskcache_ocr.presets import Preset, cache_plan
from diskcache_ocr.synth import split_paths

N = 5
TENSORS = ("image", "prob_map", "prob_mask", "thresh_map", "thresh_mask", "inverse_matrix")


@pytest.fixture(scope="module")
def data(synth_data):
    return synth_data(N, 31, min_words=2, max_words=7, size=(180, 240))


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    """The default (float32) batches of the whole set, uncached, by index."""
    ds = CachedOCRDataset(*split_paths(data), preset="none")
    ds_maps = CachedOCRDataset(*split_paths(data), tmp_path_factory.mktemp("p") / "c",
                               preset="validation_optimized")
    return collate(ds.__getitems__(range(N))), collate(ds_maps.__getitems__(range(N)))


def assert_batch_equals(finished, reference, rows):
    """Every tensor field equal bit for bit (dtype included), the lists equal."""
    assert "finish" not in finished
    assert set(finished) == set(reference)
    for name in TENSORS:
        if name not in reference:
            continue
        got, want = finished[name], reference[name][rows]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got.cpu(), want), name
    for i, row in enumerate(rows):
        assert finished["meta"][i] == reference["meta"][row]
        assert np.array_equal(finished["ignore"][i], reference["ignore"][row])
        for a, b in zip(finished["polygons"][i], reference["polygons"][row]):
            assert np.array_equal(a, b)


def assert_compact_epoch(loader, reference):
    """One epoch of compact batches: each finished equals ``reference``'s rows, every index
    seen once."""
    seen = []
    for batch in loader:
        assert batch["image"].dtype == torch.uint8 and "finish" in batch
        rows = [m["index"] for m in batch["meta"]]
        seen += rows
        assert_batch_equals(finish_batch(batch), reference, rows)
    assert sorted(seen) == list(range(N))


def test_compact_samples_hold_the_stored_forms(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    for _ in range(2):  # computed, then cached
        sample = ds[0]
        assert sample["image"].dtype == torch.uint8
        for name in ("prob_map", "prob_mask", "thresh_mask"):
            assert sample[name].dtype == torch.uint8
            assert set(sample[name].unique().tolist()) <= {0, 1}
        assert sample["thresh_map"].dtype == torch.float32
        spec = sample["finish"]
        assert spec["mean"] == list(ds.pipeline.transform.mean)
        assert spec["std"] == list(ds.pipeline.transform.std)
        # Plain data: it crosses process boundaries without the library's classes.
        assert pickle.loads(pickle.dumps(spec)) == spec


@pytest.mark.parametrize("preset", ["none", "minimal", "validation_optimized"])
def test_compact_then_finish_equals_float32_per_preset(data, plain, tmp_path, preset):
    reference = plain[1] if load_preset(preset).load_maps else plain[0]
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset=preset, output="compact")
    for _epoch in range(2):
        batch = collate(ds.__getitems__([3, 1, 4]))
        assert batch["image"].dtype == torch.uint8
        assert_batch_equals(finish_batch(batch), reference, [3, 1, 4])


@pytest.mark.parametrize("workers, method", [
    (0, None), pytest.param(2, "fork", marks=pytest.mark.full),
    pytest.param(2, "spawn", marks=pytest.mark.full)])
def test_compact_through_a_dataloader_equals_float32(data, plain, tmp_path, workers, method):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers, collate_fn=collate,
                        multiprocessing_context=method, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(1))
    for _epoch in range(2):  # read-through, then cached (reused batch slabs)
        assert_compact_epoch(loader, plain[1])


def test_finish_batch_is_idempotent_and_leaves_float32_batches_alone(data, plain, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    once = finish_batch(collate(ds.__getitems__([0, 2])))
    twice = finish_batch(once)
    assert_batch_equals(twice, plain[1], [0, 2])
    assert all(twice[k] is once[k] for k in TENSORS)  # nothing recomputed
    float32 = collate(CachedOCRDataset(*split_paths(data), preset="none").__getitems__([1]))
    assert_batch_equals(finish_batch(float32), plain[0], [1])


def test_finished_memory_is_reused_only_once_the_last_batch_is_gone(data, plain, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    first = finish_batch(collate(ds.__getitems__([0, 1])))
    kept = first["image"].clone()
    second = finish_batch(collate(ds.__getitems__([2, 3])))
    assert first["image"].data_ptr() != second["image"].data_ptr()  # first is still alive
    assert torch.equal(first["image"], kept)
    assert_batch_equals(first, plain[1], [0, 1])
    address = second["image"].data_ptr()
    del second
    third = finish_batch(collate(ds.__getitems__([4, 0])))
    assert third["image"].data_ptr() == address  # reused, and still exact
    assert_batch_equals(third, plain[1], [4, 0])


def test_finish_batch_moves_to_a_device_first(data, plain, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    batch = collate(ds.__getitems__([4, 0]))
    out = finish_batch(batch, device="cpu")
    assert all(out[k].device.type == "cpu" for k in TENSORS)
    assert_batch_equals(out, plain[1], [4, 0])
    assert batch["image"].dtype == torch.uint8  # the input batch is not changed


def test_finish_batch_with_the_device_code_path_equals_the_cpu_one(data, plain, monkeypatch):
    """On a GPU ``finish`` runs torch operations; run those on the CPU and compare."""
    from diskcache_ocr.ocr.transform import finish_torch

    calls = []

    def finish_via_torch(image, config, out=None):
        calls.append(image.dtype)
        out = torch.empty(image.shape, dtype=torch.float32) if out is None else out
        return finish_torch(image, config, out)

    monkeypatch.setattr("diskcache_ocr.samples.finish", finish_via_torch)
    ds = CachedOCRDataset(*split_paths(data), preset="none", output="compact")
    out = finish_batch(collate(ds.__getitems__([2, 3])))
    assert calls == [torch.uint8]
    assert_batch_equals(out, plain[0], [2, 3])


def test_pin_memory_keeps_a_compact_batch_finishable(data, plain, tmp_path, monkeypatch):
    """``pin_memory=True`` on a machine with an accelerator pins every tensor; here (CPU
    only) torch skips pinning, so the pinning pass is run on the batch directly with a
    stand-in for the page-locking itself: the structure, the spec and the bytes survive."""
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate, pin_memory=True)
    for batch in loader:
        rows = [m["index"] for m in batch["meta"]]
        assert_batch_equals(finish_batch(batch), plain[1], rows)
    batch = collate(ds.__getitems__([1, 2]))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    pinned = pin_module.pin_memory(batch)
    assert pinned["finish"] == batch["finish"]
    assert pinned["image"].dtype == torch.uint8
    assert_batch_equals(finish_batch(pinned), plain[1], [1, 2])


def test_output_from_a_preset_file_and_its_errors(data, plain, tmp_path):
    path = tmp_path / "compact_val.yaml"
    path.write_text("load_maps: true\noutput: compact\n"
                    "cache_config: {cache_images: true, cache_transformed_tensors: true, "
                    "cache_maps: true}\n")
    preset = load_preset(path)
    assert preset.output == "compact" and cache_plan(preset).output == "compact"
    assert Preset.from_dict(preset.to_dict(), name=preset.name) == preset
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset=path)
    batch = collate(ds.__getitems__([0]))
    assert batch["image"].dtype == torch.uint8
    assert_batch_equals(finish_batch(batch), plain[1], [0])
    # The argument wins over the preset.
    ds32 = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset=path, output="float32")
    assert_batch_equals(collate(ds32.__getitems__([0])), plain[1], [0])
    path.write_text("output: fp16\n")
    with pytest.raises(PresetError, match="compact_val.*output must be one of"):
        load_preset(path)
    with pytest.raises(ValueError, match="output must be"):
        CachedOCRDataset(*split_paths(data), preset="none", output="half")


@pytest.mark.full
def test_batch_loader_yields_compact_batches_of_a_compact_dataset(data, plain, tmp_path):
    from diskcache_ocr import BatchLoader

    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized",
                          output="compact")
    with BatchLoader(ds, batch_size=2, threads=2) as loader:
        assert_compact_epoch(loader, plain[1])
    with BatchLoader(ds, batch_size=3, threads=2, device="cpu") as loader:
        for batch in loader:  # with a device: finished there
            rows = [m["index"] for m in batch["meta"]]
            assert_batch_equals(batch, plain[1], rows)


@pytest.mark.parametrize("images_too", [True, False])
def test_read_through_images_setting_decides_whether_a_miss_writes_the_image(
        data, plain, tmp_path, images_too):
    from diskcache_ocr.schema import source_id
    from diskcache_ocr.store import CacheStore

    preset = {**load_preset("validation_optimized").to_dict(),
              "read_through_images": images_too}
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset=preset, preload=False)
    assert_batch_equals(collate(ds.__getitems__([0, 1])), plain[1], [0, 1])
    ds.close()
    with CacheStore(tmp_path / "c", readonly=True) as store:
        assert len(list(store.keys("images"))) == (2 if images_too else 0)
        assert len(list(store.keys("tensors"))) == len(list(store.keys("maps"))) == 2
        entry = store.get_index(source_id(ds.images_dir, ds.source(0)))
        assert {kind for kind, _ in entry.records()} == (
            {"images", "tensors", "maps"} if images_too else {"tensors", "maps"})
    # A build stores every cached kind it computes: images of the items not served yet (an
    # item whose tensors are cached is not decoded again just for its image).
    assert ds.missing(range(N))[0] == ([2, 3, 4] if images_too else list(range(N)))
    ds.preload()
    with CacheStore(tmp_path / "c", readonly=True) as store:
        assert len(list(store.keys("images"))) == (N if images_too else N - 2)
    assert_batch_equals(collate(ds.__getitems__([0, 1])), plain[1], [0, 1])
