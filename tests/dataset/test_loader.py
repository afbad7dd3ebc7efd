from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from diskcache_ocr.dataset import CachedOCRDataset, collate
from diskcache_ocr.keys import content_hash
from diskcache_ocr.loader import BatchLoader
from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.transform import (
    VALIDATION,
    TransformConfig,
    finish,
    finish_numpy,
    finish_torch,
)
from diskcache_ocr.synth import split_paths

N = 7
COMPACT = TransformConfig(output="compact")
FLOAT32 = TransformConfig(output="float32")
TENSORS = ("image", *MAP_NAMES, "inverse_matrix")


@pytest.fixture(scope="module")
def data(synth_data):
    return split_paths(synth_data(N, 5, min_words=3, max_words=12, size=(300, 400)))


def stock_batches(data, sampler, transform=None, batch_size=3):
    uncached = CachedOCRDataset(*data, None, preset={"load_maps": True}, transform=transform)
    return list(DataLoader(uncached, batch_size=batch_size, sampler=sampler, collate_fn=collate))


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for name in TENSORS:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        assert a["meta"] == b["meta"]
        for pa, pb in zip(a["polygons"], b["polygons"]):
            assert all(np.array_equal(x, y) for x, y in zip(pa, pb))


def clone(batch):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@pytest.mark.parametrize("transform", [FLOAT32, COMPACT], ids=["float32", "compact"])
@pytest.mark.parametrize("epochs", [1, pytest.param(2, marks=pytest.mark.full)])
def test_batches_equal_a_stock_dataloader_over_the_uncached_dataset(data, tmp_path, transform,
                                                                    epochs):
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="validation_optimized",
                          transform=transform, preload=epochs == 2)
    order = list(RandomSampler(range(N), generator=torch.Generator().manual_seed(3)))
    want = stock_batches(data, order, FLOAT32)  # float32 pipeline: compact must equal it too
    with BatchLoader(ds, batch_size=3, sampler=order, threads=2) as loader:
        for _ in range(epochs):  # epoch 1 reads through (misses), epoch 2 from the cache
            assert_batches_equal([clone(b) for b in loader], want)


def test_device_side_finishing_equals_the_uncached_output(data, tmp_path):
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="validation_optimized",
                          transform=COMPACT)
    with BatchLoader(ds, batch_size=4, threads=2, device="cpu") as loader:
        got = [clone(b) for b in loader]
        assert loader._slots[0].buffers.image_t.dtype == torch.uint8  # finished on "device"
    assert_batches_equal(got, stock_batches(data, None, batch_size=4))


@pytest.mark.parametrize("epochs", [1, pytest.param(2, marks=pytest.mark.full)])
def test_device_batches_are_owned_and_binary_maps_travel_as_uint8(data, tmp_path, epochs):
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="validation_optimized",
                          transform=COMPACT, preload=epochs == 2)
    with BatchLoader(ds, batch_size=2, threads=2, device="cpu") as loader:
        for _ in range(epochs):
            held = list(loader)  # kept without cloning: a device batch is the caller's own
        maps = loader._slots[0].buffers.maps_t
        assert [maps[n].dtype for n in MAP_NAMES] == [torch.uint8, torch.uint8,
                                                      torch.float32, torch.uint8]
    assert_batches_equal(held, stock_batches(data, None, batch_size=2))


def test_finishing_on_cpu_and_with_torch_agree_for_every_pixel_value():
    config = TransformConfig(mean=(0.1, 0.5602, 0.9), std=(0.2, 0.2539, 0.31))
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    with_numpy = finish_numpy(pixels, config, np.empty(pixels.shape, np.float32))
    as_tensor = torch.from_numpy(pixels)
    with_torch = finish_torch(as_tensor, config, torch.empty(pixels.shape)).numpy()
    assert with_torch.tobytes() == finish(as_tensor, config).numpy().tobytes()
    assert with_numpy.tobytes() == with_torch.tobytes()


def test_finishing_a_batch_larger_than_one_block_agrees_with_torch():
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (2, 3, 401, 397), dtype=np.uint8)  # planes span blocks
    with_numpy = finish_numpy(pixels, VALIDATION, np.empty(pixels.shape, np.float32))
    with_torch = finish_torch(torch.from_numpy(pixels), VALIDATION, torch.empty(pixels.shape))
    assert with_numpy.tobytes() == with_torch.numpy().tobytes()


def test_early_break_leaves_no_open_transaction(data, tmp_path):
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="validation_optimized",
                          store_options={"map_size": 1 << 16})
    before = threading.active_count()
    loader = BatchLoader(ds, batch_size=2, threads=2)
    for _batch in loader:
        break
    assert threading.active_count() <= before + 2  # the producer is gone (pool threads stay)
    sh = ds.store._sh
    assert sh is None or not any(slot.borrowed for slot in sh.slots.values())
    alive = {t.ident for t in threading.enumerate()}
    assert sh is None or set(sh.slots) <= alive  # the producer dropped its read transaction
    # A writer can still grow the (tiny) map in this process: no read view blocks it.
    size = ds.store.info()["map_size"]
    ds.store.put("images", content_hash(b"big"), {"x": np.ones(4 << 20, np.uint8)})
    assert ds.store.info()["map_size"] > size
    loader.close()
    assert loader._pool is None and loader._slots == []
    # Reusable after close.
    assert sum(len(b["meta"]) for b in loader) == N
    loader.close()


def test_distributed_sampler_covers_the_dataset_once(data, tmp_path):
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="balanced")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1,
                                     drop_last=False)
        sampler.set_epoch(4)
        with BatchLoader(ds, batch_size=2, sampler=sampler) as loader:
            seen += [m["index"] for b in loader for m in b["meta"]]
    # DistributedSampler pads to an even count: every index at least once, one repeat at most.
    assert set(seen) == set(range(N)) and len(seen) == N + (N % 2)


def test_errors_in_the_producer_reach_the_caller(data, tmp_path, monkeypatch):
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="balanced")

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the producer")

    monkeypatch.setattr(ds.engine, "process", broken)
    with pytest.raises(RuntimeError, match="boom"), BatchLoader(ds, batch_size=2) as loader:
        list(loader)


def test_memory_of_batches_the_consumer_dropped_is_reused(data, tmp_path):
    """Batches are the caller's to keep (issue 16 item 4, tested in the reliability suite);
    one it dropped lends its memory to a later batch, so an epoch does not allocate N."""
    ds = CachedOCRDataset(*data, tmp_path / "c", preset="validation_optimized")
    with BatchLoader(ds, batch_size=1, buffers=2) as loader:
        ptrs = [b["image"].data_ptr() for b in loader]
    assert len(ptrs) == N and len(set(ptrs)) <= 2 + 2  # in flight: the caller's, 2 ahead
    assert len(BatchLoader(ds, batch_size=2, drop_last=True)) == N // 2
