"""Batch memory is reused, and never while anything of its last use can still be read."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import test_dataset
import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reducers)
from test_dataset import assert_same, unbatch
from torch.utils.data import DataLoader

from diskcache_ocr import batchmem
from diskcache_ocr.batchmem import SlabTensor, Spec, leases, slabs
from diskcache_ocr.dataset import CachedOCRDataset, collate
from diskcache_ocr.errors import CacheError
from diskcache_ocr.synth import split_paths

SPECS = [Spec("image", (2, 3, 8, 8), np.dtype(np.float32)),
         Spec("inverse_matrix", (2, 3, 3), np.dtype(np.float64)),
         Spec("odd", (5,), np.dtype(np.uint8))]

data = test_dataset.data  # the same session fixtures
reference = test_dataset.reference

needs_shm = pytest.mark.skipif(not os.path.isdir(batchmem.SHM_DIR), reason="no /dev/shm")


def fill(block, value):
    for arr in block.arrays.values():
        arr[...] = value


def test_layout_aligns_every_array():
    offsets, size = batchmem.layout(SPECS)
    assert offsets[0] == 0 and all(o % batchmem.ALIGN == 0 for o in offsets)
    assert size == offsets[-1] + 5
    block = batchmem.local_block(SPECS)
    for spec in SPECS:
        assert block.arrays[spec.name].shape == spec.shape
        assert block.tensors[spec.name].data_ptr() == block.arrays[spec.name].ctypes.data


@pytest.mark.parametrize("holder", ["tensor slice", "numpy slice", "tensor.numpy()", "view op"])
def test_local_block_is_not_reused_while_anything_of_it_lives(holder):
    first = batchmem.local_block(SPECS)
    fill(first, 1)
    ptr = first.arrays["image"].ctypes.data
    held = {
        "tensor slice": lambda b: b.tensors["image"][1],
        "numpy slice": lambda b: b.arrays["inverse_matrix"][0, 1:],
        "tensor.numpy()": lambda b: b.tensors["image"][0].numpy(),
        "view op": lambda b: b.tensors["image"].permute(0, 2, 3, 1)[..., :1],
    }[holder](first)
    del first
    others = [batchmem.local_block(SPECS) for _ in range(3)]
    for other in others:
        assert other.arrays["image"].ctypes.data != ptr
        fill(other, 2)
    assert (np.asarray(held) == 1).all()  # untouched by later blocks
    del held, others
    again = batchmem.local_block(SPECS)
    assert again.arrays["image"].ctypes.data == ptr  # free again: reused, no fresh pages


def test_held_samples_keep_their_values_across_later_reads(data, reference, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized")
    first = ds[0]
    batch = ds.__getitems__([1, 2])
    for _ in range(3):
        for i in range(len(ds)):
            ds[i]
        ds.__getitems__([3, 4, 5])
    assert_same(first, reference[0], with_maps=True)
    for s in batch:
        assert_same(s, reference[s["meta"]["index"]], with_maps=True)


@needs_shm
def test_slab_tensor_travels_as_a_reference_and_is_released_by_its_last_user():
    block = batchmem.shared_block(SPECS)
    assert block is not None
    image = block.tensors["image"]
    assert isinstance(image, SlabTensor)
    assert type(image + 1) is torch.Tensor  # ops give plain tensors
    fill(block, 7)
    payload = ForkingPickler.dumps({"image": image, "inv": block.tensors["inverse_matrix"]})
    assert len(payload) < 1000  # a reference, not 1.5 KB of arrays
    slab = image._slab
    received = ForkingPickler.loads(payload)  # what the main process does
    assert type(received["image"]) is torch.Tensor
    assert received["image"].data_ptr() != image.data_ptr()  # its own mapping ...
    assert (received["image"] == 7).all() and (received["inv"] == 7).all()
    del block, image
    assert not slab.available()  # ... of the same memory, still read by the receiver
    image_view = received["image"][1]
    del received
    assert not slab.available()  # one tensor of the batch is enough to hold it
    received_again = batchmem.shared_block(SPECS)
    assert received_again is not None and received_again.tensors["image"]._slab is not slab
    del image_view
    assert slab.available()
    del received_again


@needs_shm
def test_the_receiver_maps_a_slab_once_across_its_uses_and_forgets_it_once_gone():
    """Every batch of one slab is read through one mapping (no page faults anew for each
    batch), still exact use after use; once the slab's file is removed (its worker exited),
    the next new slab makes the receiver let go of the old mapping."""
    block = batchmem.shared_block(SPECS)
    slab = block.tensors["image"]._slab
    seen = []
    for value in (5, 9):
        fill(block, value)
        received = ForkingPickler.loads(ForkingPickler.dumps(dict(block.tensors)))
        assert (received["image"] == value).all() and (received["inverse_matrix"] == value).all()
        seen.append(leases._mappings[slab.name])
        del block, received
        assert slab.available()  # released by the receiver
        block = batchmem.shared_block(SPECS)
        assert block.tensors["image"]._slab is slab  # the same slab, its next use
    assert seen[0] is seen[1]  # one mapping for both uses
    del block
    slab.unlink()  # as at its worker's exit (and out of this process's pool with it)
    slabs._slab_pool.slabs.remove(slab)
    larger = max(s.size for s in [slab, *slabs._slab_pool.slabs]) + 1  # (a new slab)
    other = batchmem.shared_block([Spec("z", (larger,), np.dtype(np.uint8))])
    ForkingPickler.loads(ForkingPickler.dumps(other.tensors["z"]))
    assert slab.name not in leases._mappings
    assert other.tensors["z"]._slab.name in leases._mappings


@needs_shm
def test_slab_tensor_pickled_elsewhere_carries_its_values(tmp_path):
    import pickle

    block = batchmem.shared_block(SPECS)
    fill(block, 3)
    image = block.tensors["image"]
    for loaded in (pickle.loads(pickle.dumps(image)),
                   torch.load(_saved(image, tmp_path / "t.pt"), weights_only=True)):
        assert type(loaded) is torch.Tensor and (loaded == 3).all()
        assert loaded.data_ptr() != image.data_ptr()
    assert not image._slab.sent  # only multiprocessing's pickler sends a reference


def _saved(t, path):
    torch.save(t, path)
    return path


@needs_shm
def test_slab_not_sent_is_reused_once_the_worker_drops_it():
    block = batchmem.shared_block(SPECS)
    slab = block.tensors["image"]._slab
    assert not slab.available()
    del block
    assert slab.available()
    assert batchmem.shared_block(SPECS).tensors["image"]._slab is slab


@needs_shm
def test_every_slab_busy_means_fresh_memory_not_waiting():
    spec = [Spec("x", (3, 5), np.dtype(np.float32))]
    held = [batchmem.shared_block(spec) for _ in range(batchmem.SLABS_PER_WORKER)]
    assert all(b is not None for b in held)
    assert batchmem.shared_block(spec) is None


@needs_shm
def test_full_shared_memory_falls_back_cleanly(monkeypatch, caplog):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    kept = batchmem.shared_block(SPECS)  # a slab in use: kept
    idle = batchmem.shared_block(SPECS).tensors["image"]._slab  # one let go: given back
    pool = slabs._slab_pool
    larger = max(s.size for s in pool.slabs) + 1  # (no slab holds it: a new one is needed)
    before = set(os.listdir(batchmem.SHM_DIR))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with caplog.at_level(logging.WARNING, "diskcache_ocr.batchmem"):
        assert batchmem.shared_block([Spec("y", (larger,), np.dtype(np.uint8))]) is None
    flag = slabs.pressure_flag(os.getppid())
    # nothing left behind but the flag telling the loader's other workers
    assert set(os.listdir(batchmem.SHM_DIR)) - before == {os.path.basename(flag)}
    assert idle.name not in os.listdir(batchmem.SHM_DIR) and idle not in pool.slabs
    assert kept.tensors["image"]._slab in pool.slabs
    assert "is full" in caplog.text and "stops keeping batch memory" in caplog.text
    monkeypatch.undo()
    try:  # no reuse any more in this process: each slab goes once idle; the others are told
        assert not pool.growing and os.path.exists(flag)
        slab = kept.tensors["image"]._slab
        del kept
        assert batchmem.shared_block(SPECS) is None
        assert slab not in pool.slabs and slab.name not in os.listdir(batchmem.SHM_DIR)
    finally:
        pool.growing = True
        os.unlink(flag)


@needs_shm
def test_a_worker_told_that_shared_memory_ran_out_gives_back_its_idle_slabs(monkeypatch):
    monkeypatch.setattr(slabs, "pressure_flag", lambda owner: str(flag))
    flag = Path(batchmem.SHM_DIR) / f"docr-test-pressure-{os.getpid()}"
    idle = batchmem.shared_block(SPECS).tensors["image"]._slab
    pool = slabs._slab_pool
    assert idle in pool.slabs and pool.growing
    flag.touch()
    try:
        assert batchmem.shared_block(SPECS) is None
        assert idle not in pool.slabs and not pool.growing
    finally:
        pool.growing = True
        flag.unlink()


@needs_shm
def test_a_smaller_batch_takes_a_free_larger_slab():
    """An epoch's last, smaller batch reuses a full batch's slab instead of keeping a slab of
    its own beside it (more shared memory than a DataLoader without reuse needs)."""
    block = batchmem.shared_block(SPECS)
    slab = block.tensors["image"]._slab
    del block
    small = [Spec(s.name, (1, *s.shape[1:]), s.dtype) for s in SPECS]
    again = batchmem.shared_block(small)
    assert again.tensors["image"]._slab is slab
    fill(again, 3)
    received = ForkingPickler.loads(ForkingPickler.dumps(dict(again.tensors)))
    assert received["image"].shape == small[0].shape and (received["image"] == 3).all()


def test_rebuild_refuses_foreign_and_vanished_slabs():
    with pytest.raises(CacheError, match="not a batch slab"):
        batchmem.rebuild("../etc/passwd", 1, 10, 0, (10,), "|u1")
    with pytest.raises(CacheError, match="gone"):
        batchmem.rebuild(f"{batchmem.SLAB_PREFIX}1-nothing", 1, 10, 0, (10,), "|u1")


@needs_shm
def test_orphans_of_dead_workers_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = os.path.join(batchmem.SHM_DIR, f"{slabs.owner_prefix(dead.pid)}0000")
    mine = os.path.join(batchmem.SHM_DIR, f"{slabs.owner_prefix(os.getpid())}0000")
    # a dead pid of another pid namespace (another container sharing /dev/shm): not ours
    foreign = os.path.join(batchmem.SHM_DIR, f"{batchmem.SLAB_PREFIX}1-{dead.pid}-0000")
    for path in (orphan, mine, foreign):
        open(path, "wb").close()
    try:
        slabs.sweep_orphans()
        assert not os.path.exists(orphan)
        assert os.path.exists(mine) and os.path.exists(foreign)
    finally:
        for path in (orphan, mine, foreign):
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.full
@needs_shm
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_batches_stay_intact_while_the_consumer_holds_them(data, reference, tmp_path,
                                                                    method):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="validation_optimized")
    indices = [i % len(ds) for i in range(24)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate,
                        sampler=indices, multiprocessing_context=method)
    seen_before = set(leases._seen)
    window: list[dict] = []
    for batch in loader:
        assert type(batch["image"]) is torch.Tensor
        window.append(batch)
        if len(window) > 3:  # a batch held while its worker produced three more
            for sample in unbatch(window.pop(0)):
                assert_same(sample, reference[sample["meta"]["index"]], with_maps=True)
        for sample in unbatch(batch):
            assert_same(sample, reference[sample["meta"]["index"]], with_maps=True)
    names = set(leases._seen) - seen_before
    assert names  # the batches did come through slabs
    held_all = list(loader)  # every batch held at once: slabs run out, fresh memory takes over
    for batch in held_all:
        for sample in unbatch(batch):
            assert_same(sample, reference[sample["meta"]["index"]], with_maps=True)
    del loader, window, held_all, batch
    # the workers have exited: their slabs are unlinked (the memory goes with the last user)
    assert not [n for n in names if os.path.exists(os.path.join(batchmem.SHM_DIR, n))]


def test_memory_efficient_gives_batch_memory_back(data, reference, monkeypatch):
    calls = []
    monkeypatch.setattr(batchmem, "local_block", lambda specs: calls.append(specs))
    lean = CachedOCRDataset(*split_paths(data), None, preset="memory_efficient")
    assert not lean.preset.reuse_batch_memory
    assert_same(lean[2], reference[2], with_maps=False)
    assert calls == []
    CachedOCRDataset(*split_paths(data), None, preset="minimal")[2]
    assert len(calls) == 1  # (the stub returns None: minimal then falls back, still correct)


@pytest.mark.full
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_writers_keep_freed_memory_once_per_process():
    import platform

    code = ("from diskcache_ocr.batchmem import keep_freed_memory as k\n"
            "import diskcache_ocr.batchmem.pages as b, os\n"
            "first = k(); print(first, k(), b._writer_tuned_pid == os.getpid())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    if platform.libc_ver()[0] == "glibc":
        assert out == ["True", "True", "True"]
    else:
        assert out == ["False", "False", "False"]
