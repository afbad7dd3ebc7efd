"""Batch blocks and the pool of one process.

A :class:`Block` is one batch's arrays and tensors carved from one buffer at the offsets
:func:`layout` gives. In one process (``ds[i]``, a ``DataLoader`` without workers) blocks come
from a small pool owned by numpy: every tensor carved from a block holds a reference to it, so
``sys.getrefcount`` says exactly whether anything still reads it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALIGN = 64
LOCAL_KEEP = 3  # free blocks kept per size in one process: a loader's two + one a caller holds


@dataclass(frozen=True)
class Spec:
    """One array of a block: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def layout(specs: Sequence[Spec]) -> tuple[list[int], int]:
    """Byte offsets of each array in a block (64-byte aligned) and the block's size."""
    offsets, end = [], 0
    for spec in specs:
        end = -(-end // ALIGN) * ALIGN
        offsets.append(end)
        end += spec.nbytes
    return offsets, max(end, 1)


class Block:
    """One batch's arrays (numpy views) and tensors, carved from one buffer."""

    def __init__(self, specs: Sequence[Spec], arrays: Sequence[np.ndarray],
                 tensors: Sequence[torch.Tensor]) -> None:
        self.arrays = {s.name: a for s, a in zip(specs, arrays, strict=True)}
        self.tensors = {s.name: t for s, t in zip(specs, tensors, strict=True)}


def carve(buffer: Any, specs: Sequence[Spec], offsets: Sequence[int]) -> list[np.ndarray]:
    return [np.frombuffer(buffer, spec.dtype, int(np.prod(spec.shape, dtype=np.int64)), off)
            .reshape(spec.shape) for spec, off in zip(specs, offsets, strict=True)]


class _LocalPool:
    def __init__(self, keep: int = LOCAL_KEEP) -> None:
        self.keep = keep
        self.free_refs = self._calibrate()
        self.blocks: dict[int, list[np.ndarray]] = {}
        self.lock = threading.Lock()

    def block(self, specs: Sequence[Spec]) -> Block:
        offsets, size = layout(specs)
        with self.lock:  # (the views below take the block before another thread looks)
            buf = self._take(size)
            arrays = carve(buf, specs, offsets)
        # Each tensor gets a storage of its own (holding its array, and so the block), so a
        # sample's slice of it has the batch tensor as its ``_base`` (collate relies on it).
        return Block(specs, arrays, [torch.from_numpy(a) for a in arrays])

    def _take(self, size: int) -> np.ndarray:
        pool = self.blocks.setdefault(size, [])
        for buf in pool:
            # Nothing but the pool's list, this loop's name and getrefcount's argument (as
            # counted by _calibrate, the same code shape): any view, array or tensor of the
            # last use adds one.
            if sys.getrefcount(buf) == self.free_refs:
                return buf
        buf = np.empty(size, np.uint8)
        if len(pool) < self.keep:
            pool.append(buf)
        return buf

    @staticmethod
    def _calibrate() -> int:
        """What getrefcount says of a block nobody uses, measured with the same code shape
        as ``_take`` (interpreters differ in which references they count). The reuse test in
        tests/dataset/test_batchmem.py fails if this ever stops matching."""
        pool = [np.empty(1, np.uint8)]
        for buf in pool:
            return sys.getrefcount(buf)
        raise AssertionError("unreachable")

    def clear(self) -> None:
        with self.lock:
            self.blocks.clear()


_local = _LocalPool()


def local_block(specs: Sequence[Spec]) -> Block:
    """Batch memory in this process, reused once nothing of its last use is alive."""
    return _local.block(specs)


def release_local() -> None:
    """Let go of the free blocks this process keeps (they are reallocated when needed)."""
    _local.clear()


def _after_fork_in_child() -> None:
    global _local
    _local = _LocalPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
