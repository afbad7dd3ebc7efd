"""The receiving end of a worker's slab (the main process).

Unpickled, a :class:`~.slabs.SlabTensor` becomes a plain tensor on the worker's slab, mapped
here once per slab and read through the same mapping for every later batch of it (a fresh
mapping per batch faults on each page read again); every tensor of one batch shares one
lease, whose end marks the slab free in its header. The mapping of a slab whose worker has
exited is let go when the next new slab arrives or before a fork, and unmapped once no tensor
of its last batch is alive. Slabs seen here are unlinked at this process's exit, and those of
dead workers swept, should their workers not have done it.
"""

from __future__ import annotations

import atexit
import collections
import mmap
import os
import threading
import weakref
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

from diskcache_ocr.batchmem import slabs
from diskcache_ocr.batchmem.slabs import (
    BUSY,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    SlabTensor,
    lease_type,
    pressure_flag,
    sweep_orphans,
)


def _reduce_slab_tensor(t: SlabTensor) -> tuple[Any, ...]:
    t._slab.sent = True
    return (rebuild, t._slab_ref)


ForkingPickler.register(SlabTensor, _reduce_slab_tensor)


_leases: weakref.WeakValueDictionary[tuple[str, int], Any] = weakref.WeakValueDictionary()
_leases_lock = threading.Lock()


def rebuild(name: str, generation: int, size: int, offset: int, shape: tuple[int, ...],
             dtype: str) -> torch.Tensor:
    """Unpickling a :class:`SlabTensor`: a plain tensor on the worker's slab. Every tensor
    of one batch shares one lease; when the last of them dies, the slab is marked free."""
    key = (name, generation)
    with _leases_lock:
        lease = _leases.get(key)
        if lease is None:
            lease = _open_lease(name, generation, size)
            _leases[key] = lease
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    arr = np.frombuffer(lease, dt, count, offset).reshape(shape)
    return torch.from_numpy(arr)


def _open_lease(name: str, generation: int, size: int) -> Any:
    from diskcache_ocr.errors import CacheError

    if os.sep in name or not name.startswith(slabs.SLAB_PREFIX):
        raise CacheError(f"not a batch slab name: {name!r}")
    path = os.path.join(slabs.SHM_DIR, name)
    mm = _mappings.get(name)
    if mm is None or len(mm) != HEADER_SIZE + size:
        _forget_removed()
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise CacheError(f"{path}: the DataLoader worker's batch memory is gone (the "
                             "worker exited before its batch was received)") from None
        try:
            mm = mmap.mmap(fd, HEADER_SIZE + size)
        finally:
            os.close(fd)
        _mappings[name] = mm
        while len(_mappings) > _MAPPINGS_KEEP:
            _mappings.popitem(last=False)
    else:
        _mappings.move_to_end(name)
    magic, state, gen = HEADER.unpack_from(mm, 0)
    if magic != MAGIC or state != BUSY or gen != generation:
        raise CacheError(f"{path}: batch slab in an unexpected state "
                         f"({magic!r}, state {state}, use {gen}, expected use {generation})")
    lease = lease_type(size, main=True).from_buffer(mm, HEADER_SIZE)
    lease._release = (mm, generation)
    _remember(name)
    return lease


# One mapping per slab, kept across its uses: a new mapping for every batch would take a
# page fault on each page the consumer (or the pin-memory thread) reads. Forgotten once the
# slab's file is gone (its worker exited), checked whenever a new slab appears and before
# a fork; a forgotten mapping is unmapped when its last batch dies.
_MAPPINGS_KEEP = 64
_mappings: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()


def _forget_removed() -> None:
    for name in list(_mappings):
        if not os.path.exists(os.path.join(slabs.SHM_DIR, name)):
            del _mappings[name]


def _mappings_before_fork() -> None:
    _leases_lock.acquire()  # (no thread is halfway through the mappings while we fork)
    try:
        _forget_removed()
    except OSError:
        pass


def _mappings_after_fork_in_parent() -> None:
    _leases_lock.release()


def _mappings_after_fork_in_child() -> None:
    _mappings.clear()
    _leases_lock.release()


if hasattr(os, "register_at_fork"):
    # New workers are forked without the mappings of slabs whose workers are gone, and a
    # child never reads through its parent's mappings.
    os.register_at_fork(before=_mappings_before_fork,
                        after_in_parent=_mappings_after_fork_in_parent,
                        after_in_child=_mappings_after_fork_in_child)


_seen: set[str] = set()
_seen_pid = 0


def _remember(name: str) -> None:
    """Note a worker's slab, to unlink it at exit if the worker could not (DataLoader
    workers are terminated, not asked, when the main process exits first)."""
    if name in _seen:
        return
    if len(_seen) >= 1024:  # workers come and go (non-persistent): forget removed slabs
        _seen.difference_update([n for n in _seen
                                 if not os.path.exists(os.path.join(slabs.SHM_DIR, n))])
    global _seen_pid
    if _seen_pid != os.getpid():
        _seen.clear()
        _seen_pid = os.getpid()
        atexit.register(_unlink_seen, _seen_pid)
        import multiprocessing.util

        # After multiprocessing has terminated and joined the daemonic workers at exit
        # (its finalizers of negative priority run last): whatever a dead worker left.
        multiprocessing.util.Finalize(None, _sweep_at_exit, exitpriority=-100)
    _seen.add(name)
    # A slab not seen before: a new worker (often a new loader). Slabs of workers that died
    # without unlinking theirs (SIGKILL, out of memory) are swept now, not at the next run.
    sweep_orphans()


def _sweep_at_exit() -> None:
    sweep_orphans()
    try:
        os.unlink(pressure_flag(os.getpid()))
    except OSError:
        pass


def _unlink_seen(pid: int) -> None:
    if os.getpid() != pid:  # a forked child exiting: the slabs are its parent's
        return
    for name in _seen:
        try:
            os.unlink(os.path.join(slabs.SHM_DIR, name))
        except OSError:
            pass

