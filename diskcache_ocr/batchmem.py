"""Memory for batches, reused as soon as nobody can read it any more.

A cached sample is a few copies of bytes (the map → a batch buffer), so the cost of *fresh*
memory dominates it: the first write to each new page traps into the kernel, which zeroes
the page (and, for shared memory, allocates it in tmpfs): allocating a batch as fresh shared
memory costs more than filling it (benchmarks/README.md has the figures). So batch memory is
kept and reused, with one rule: a block is handed out again only when no tensor,
array or view of its last use is alive anywhere, in any process.

- **In one process** (``ds[i]``, a ``DataLoader`` without workers): a small pool of blocks
  owned by numpy. Every tensor carved from a block holds a reference to it, so
  ``sys.getrefcount`` says exactly whether anything still reads it.
- **In a DataLoader worker**: slabs of POSIX shared memory (``/dev/shm``). The worker sends
  a small reference instead of the bytes (:class:`SlabTensor` pickles as one); the main
  process maps the slab and builds plain tensors on it, tied to a lease whose end marks the
  slab free in its header. The worker reuses a slab only when the main process has released
  it and its own references are gone. When every slab is busy (the consumer holds many
  batches), or the system has no ``/dev/shm``, a block is fresh shared memory as before.
  The main process maps each slab once and reads every later batch of it through the same
  mapping (a fresh mapping per batch faults on each page read again); the mapping of a slab
  whose worker has exited is let go when the next new slab arrives or before a fork, and is
  unmapped once no tensor of its last batch is alive.
- **Shared memory is never kept beyond need when it runs short**: a worker keeps at most
  four slabs and puts a smaller batch into a free larger one; when ``/dev/shm`` has no room,
  every worker of the loader gives back its idle slabs and stops reusing (a warning), so it
  needs no more than a DataLoader without reuse.
- **No slab outlives its worker**: unlinked at the worker's exit, when it is terminated
  (SIGTERM), and swept by name (owner pid) once its owner is dead: when the main process
  first sees a new worker's slab, when a worker starts, and at the main process's exit.

Nothing here is ever read from the cache: slabs carry no pickled data, only arrays.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import errno
import functools
import logging
import mmap
import os
import secrets
import signal
import struct
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

log = logging.getLogger("diskcache_ocr.batchmem")

ALIGN = 64
SHM_DIR = "/dev/shm"
SLAB_PREFIX = "docr-slab-"
LOCAL_KEEP = 3  # free blocks kept per size in one process: a loader's two + one a caller holds
SLABS_PER_WORKER = 4  # DataLoader: prefetch (2) + one pinned + one the user holds

# Slab header: magic, state, generation. The state word is written by the worker (BUSY)
# and by the main process (FREE); the generation ties a release to one use.
_HEADER = struct.Struct("<4sIQ")
_HEADER_SIZE = 64
_MAGIC = b"DOSL"
_FREE, _BUSY = 0, 1
_NO_SPACE = (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT)


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


def _carve(buffer: Any, specs: Sequence[Spec], offsets: Sequence[int]) -> list[np.ndarray]:
    return [np.frombuffer(buffer, spec.dtype, int(np.prod(spec.shape, dtype=np.int64)), off)
            .reshape(spec.shape) for spec, off in zip(specs, offsets, strict=True)]


# -- one process ----------------------------------------------------------------------------
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
            arrays = _carve(buf, specs, offsets)
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


# -- DataLoader workers: shared-memory slabs -------------------------------------------------
class SlabTensor(torch.Tensor):
    """A batch tensor living in a worker's slab. Sent to another process (multiprocessing's
    pickler, which DataLoader queues use) it travels as a reference to the slab, and the
    main process rebuilds a plain tensor on the same memory: no copy, no new pages. Any
    other pickling (``torch.save``, ``pickle``) stores its values, as for a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    _slab_ref: tuple[Any, ...]
    _slab: _Slab

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _reduce_slab_tensor(t: SlabTensor) -> tuple[Any, ...]:
    t._slab.sent = True
    return (_rebuild, t._slab_ref)


ForkingPickler.register(SlabTensor, _reduce_slab_tensor)


class _Slab:
    """One shared-memory file of a worker, mapped once, reused across batches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"{_owner_prefix(os.getpid())}{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _HEADER_SIZE + size)
            # Reserve the pages now: a full /dev/shm then fails here, cleanly, instead of
            # killing the process with SIGBUS at the first write to a page it cannot get.
            os.posix_fallocate(fd, 0, _HEADER_SIZE + size)
            self.mm = mmap.mmap(fd, _HEADER_SIZE + size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.generation = 0
        self.sent = False
        self.worker_lease: weakref.ref[Any] | None = None
        _HEADER.pack_into(self.mm, 0, _MAGIC, _FREE, 0)
        populate(self.mm, _HEADER_SIZE, size)

    def available(self) -> bool:
        if self.worker_lease is not None and self.worker_lease() is not None:
            return False  # this process still holds views of the last use
        if not self.sent:
            return True  # the last use never left this process
        _, state, generation = _HEADER.unpack_from(self.mm, 0)
        return state == _FREE and generation == self.generation

    def acquire(self) -> Any:
        self.generation += 1
        self.sent = False
        _HEADER.pack_into(self.mm, 0, _MAGIC, _BUSY, self.generation)
        lease = _lease_type(self.size).from_buffer(self.mm, _HEADER_SIZE)
        self.worker_lease = weakref.ref(lease)
        return lease

    def unlink(self) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def retire(self) -> None:
        """Give an idle slab's memory back now. Its pages are freed in the file itself
        (MADV_REMOVE punches them out of tmpfs), so the main process's mapping of it, let go
        only when it next sees a new slab, holds nothing meanwhile."""
        try:
            self.mm.madvise(mmap.MADV_REMOVE)
        except (AttributeError, OSError, ValueError):
            pass  # (no MADV_REMOVE here: the memory goes once every mapping is gone)
        self.unlink()
        try:
            self.mm.close()
        except BufferError:  # (a view of it is still alive somewhere: it closes with it)
            pass


class _SlabPool:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.slabs: list[_Slab] = []
        self.lock = threading.Lock()
        self.growing = True  # False once shared memory ran out: no new slabs in this process
        self.broken = not os.path.isdir(SHM_DIR)
        if not self.broken:
            _sweep_orphans()
            import multiprocessing.util

            multiprocessing.util.Finalize(self, _unlink_all, args=(self.slabs,),
                                          exitpriority=10)
            _unlink_on_sigterm(self.slabs)

    def block(self, specs: Sequence[Spec]) -> Block | None:
        if self.broken:
            return None
        offsets, size = layout(specs)
        with self.lock:
            slab = self._take(size)
            if slab is None:
                return None
            lease = slab.acquire()
            arrays = _carve(lease, specs, offsets)
        tensors = []
        for spec, off, arr in zip(specs, offsets, arrays, strict=True):
            # (not as_subclass: that makes a view, and a slice's _base would be the plain base)
            t = torch.Tensor._make_subclass(SlabTensor, torch.from_numpy(arr))
            t._slab = slab
            t._slab_ref = (slab.name, slab.generation, slab.size, off, spec.shape,
                           spec.dtype.str)
            tensors.append(t)
        return Block(specs, arrays, tensors)

    def _take(self, size: int) -> _Slab | None:
        if self.growing and _under_pressure():
            self.out_of_space(OSError(errno.ENOSPC, "another worker found no room"))
        if not self.growing:
            # No reuse any more: every slab goes as soon as it is idle (a DataLoader without
            # reuse holds no batch memory beyond the batches alive).
            for slab in [slab for slab in self.slabs if slab.available()]:
                self._retire(slab)
            return None
        # The smallest free slab that holds the batch: an epoch's last, smaller batch goes
        # into a full batch's slab instead of a slab of its own kept beside it.
        free = [slab for slab in self.slabs if slab.size >= size and slab.available()]
        if free:
            return min(free, key=lambda slab: slab.size)
        if len(self.slabs) >= SLABS_PER_WORKER:
            smaller = [slab for slab in self.slabs if slab.available()]
            if not smaller:
                return None  # every slab busy: fresh memory, as a DataLoader without reuse
            self._retire(min(smaller, key=lambda slab: slab.size))  # (room for a larger one)
        try:
            slab = _Slab(size)
        except OSError as exc:  # /dev/shm full or missing: fresh memory, as before
            if exc.errno in _NO_SPACE:
                self.out_of_space(exc)
            else:
                log.debug("no shared-memory slab (%s); using fresh shared memory", exc)
            return None
        self.slabs.append(slab)
        return slab

    def _retire(self, slab: _Slab) -> None:
        self.slabs.remove(slab)
        slab.retire()

    def out_of_space(self, exc: BaseException) -> int:
        """Shared memory ran out: keep no batch memory for reuse in this process any more
        (a DataLoader without reuse needs no more than the batches alive), give back every
        idle slab now (busy ones once idle), and tell the loader's other workers to do the
        same. Returns the bytes given back."""
        with_warning = self.growing
        self.growing = False
        _raise_pressure()
        idle = [slab for slab in self.slabs if slab.available()]
        for slab in idle:
            self._retire(slab)
        freed = sum(slab.size for slab in idle)
        if with_warning:
            log.warning("%s is full (%s): this DataLoader worker stops keeping batch memory "
                        "for reuse (%d MiB of idle batch memory given back); give the "
                        "system more shared memory (e.g. docker --shm-size) or use fewer "
                        "workers or smaller batches", SHM_DIR, exc, freed >> 20)
        return freed


def _pressure_flag(owner: int) -> str:
    """The file whose existence tells every worker of the process ``owner`` (the main
    process) that shared memory ran out (named like a slab: swept with its owner)."""
    return os.path.join(SHM_DIR, f"{_owner_prefix(owner)}pressure")


def _raise_pressure() -> None:
    try:
        os.close(os.open(_pressure_flag(os.getppid()), os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass


def _under_pressure() -> bool:
    return os.path.exists(_pressure_flag(os.getppid()))


def wait_for_shared_memory(nbytes: int, timeout_s: float) -> bool:
    """Wait until ``nbytes`` of shared memory are free (the consumer lets go of batches),
    up to ``timeout_s``; whether they are."""
    import time

    end = time.monotonic() + timeout_s
    while True:
        try:
            st = os.statvfs(SHM_DIR)
        except OSError:
            return False
        if st.f_bavail * st.f_frsize >= nbytes:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


def _unlink_all(slabs: list[_Slab]) -> None:
    """Unlink this process's slabs: those of its pool, and by name any other (a handler
    may run between a slab's creation and its entry in the pool)."""
    for slab in slabs:
        slab.unlink()
    for name in _slab_names(_owner_prefix(os.getpid())):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


def _unlink_on_sigterm(slabs: list[_Slab]) -> None:
    """In a DataLoader worker: unlink the slabs when the worker is terminated (SIGTERM),
    which skips every exit handler. A DataLoader terminates workers that do not stop in
    time, and at interpreter exit (an exception in the training loop) multiprocessing
    terminates every daemonic worker before their slabs could be let go otherwise."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the user's own handler: left alone (the sweep takes the slabs later)

    def on_sigterm(signum: int, frame: Any) -> None:
        _unlink_all(slabs)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # die of it, as without this handler

    signal.signal(signal.SIGTERM, on_sigterm)


def out_of_shared_memory(exc: BaseException) -> int:
    """Shared memory ran out for fresh batch memory: this process's idle slabs go and the
    loader's other workers are told (see ``_SlabPool.out_of_space``); returns the bytes
    given back."""
    pool = _slab_pool
    if pool is None or pool.pid != os.getpid() or pool.broken:
        _raise_pressure()
        return 0
    with pool.lock:
        return pool.out_of_space(exc)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _owner_prefix(pid: int) -> str:
    """Slab names carry the creator's pid and pid namespace (containers may share /dev/shm,
    and a pid means nothing outside its namespace)."""
    return f"{SLAB_PREFIX}{_pid_namespace()}-{pid}-"


def _slab_names(prefix: str) -> list[str]:
    """The names in the shared-memory directory that start with ``prefix`` (none when it
    cannot be listed)."""
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return []


def _sweep_orphans() -> None:
    """Remove slabs left by workers of this pid namespace that were killed."""
    mine = f"{SLAB_PREFIX}{_pid_namespace()}-"
    for name in _slab_names(mine):
        try:
            pid = int(name[len(mine):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        except (ValueError, OSError):
            continue


_slab_pool: _SlabPool | None = None
_slab_pool_lock = threading.Lock()


def shared_block(specs: Sequence[Spec]) -> Block | None:
    """Batch memory in a reusable shared-memory slab of this (worker) process, or None when
    every slab is busy or the system has none (the caller then uses fresh shared memory)."""
    global _slab_pool
    pool = _slab_pool
    if pool is None or pool.pid != os.getpid():
        with _slab_pool_lock:
            if _slab_pool is None or _slab_pool.pid != os.getpid():
                _slab_pool = _SlabPool()
            pool = _slab_pool
    return pool.block(specs)


# -- main process: the other end of a slab ---------------------------------------------------
_leases: weakref.WeakValueDictionary[tuple[str, int], Any] = weakref.WeakValueDictionary()
_leases_lock = threading.Lock()


def _rebuild(name: str, generation: int, size: int, offset: int, shape: tuple[int, ...],
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

    if os.sep in name or not name.startswith(SLAB_PREFIX):
        raise CacheError(f"not a batch slab name: {name!r}")
    path = os.path.join(SHM_DIR, name)
    mm = _mappings.get(name)
    if mm is None or len(mm) != _HEADER_SIZE + size:
        _forget_removed()
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise CacheError(f"{path}: the DataLoader worker's batch memory is gone (the "
                             "worker exited before its batch was received)") from None
        try:
            mm = mmap.mmap(fd, _HEADER_SIZE + size)
        finally:
            os.close(fd)
        _mappings[name] = mm
        while len(_mappings) > _MAPPINGS_KEEP:
            _mappings.popitem(last=False)
    else:
        _mappings.move_to_end(name)
    magic, state, gen = _HEADER.unpack_from(mm, 0)
    if magic != _MAGIC or state != _BUSY or gen != generation:
        raise CacheError(f"{path}: batch slab in an unexpected state "
                         f"({magic!r}, state {state}, use {gen}, expected use {generation})")
    lease = _lease_type(size, main=True).from_buffer(mm, _HEADER_SIZE)
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
        if not os.path.exists(os.path.join(SHM_DIR, name)):
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
                                 if not os.path.exists(os.path.join(SHM_DIR, n))])
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
    _sweep_orphans()


def _sweep_at_exit() -> None:
    _sweep_orphans()
    try:
        os.unlink(_pressure_flag(os.getpid()))
    except OSError:
        pass


def _unlink_seen(pid: int) -> None:
    if os.getpid() != pid:  # a forked child exiting: the slabs are its parent's
        return
    for name in _seen:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


@functools.lru_cache(maxsize=64)
def _lease_type(size: int, main: bool = False) -> Any:
    """A bytes-array type over a slab's payload. In the main process its end (no array or
    tensor of the batch left) marks the slab free for the worker."""
    base = ctypes.c_ubyte * size
    if not main:
        return type("SlabLease", (base,), {})

    def __del__(self: Any) -> None:
        mm, generation = self._release
        try:
            _, state, gen = _HEADER.unpack_from(mm, 0)
            if gen == generation:
                _HEADER.pack_into(mm, 0, _MAGIC, _FREE, generation)
        except Exception:  # noqa: BLE001 - a closed map or a module torn down at shutdown
            pass

    return type("SlabLeaseMain", (base,), {"__del__": __del__})


# -- writers: keep freed heap memory --------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
WRITER_MMAP_THRESHOLD = 32 << 20  # glibc's largest: a 3.6 MB record page run comes from the heap
WRITER_TRIM_THRESHOLD = 256 << 20  # free heap kept instead of handed back after each commit
_writer_tuned_pid = 0


def keep_freed_memory() -> bool:
    """Tune this (worker) process's allocator for writing batches: keep up to 256 MB of freed
    heap memory instead of giving it back to the system at every commit.

    A write transaction allocates its pages (~60 MB for a batch of 8 images) and frees them
    at commit; by default glibc maps and unmaps each multi-megabyte block, so every batch
    touches fresh pages again (and on a VM that hands free memory back to its host, each is
    a host fault). Called only in processes that exist to load or build data (DataLoader
    workers that write, prebuild's pool, the ``prebuild`` command), never in a process of
    the user's that merely calls the library. Returns whether the allocator was tuned
    (glibc only; once per process).
    """
    global _writer_tuned_pid
    if _writer_tuned_pid == os.getpid():
        return True
    if sys.platform != "linux" or not hasattr(_libc(), "mallopt"):
        return False
    try:
        import platform

        if platform.libc_ver()[0] != "glibc":
            return False
    except (OSError, ValueError):
        return False
    ok = (_libc().mallopt(_M_MMAP_THRESHOLD, WRITER_MMAP_THRESHOLD) == 1
          and _libc().mallopt(_M_TRIM_THRESHOLD, WRITER_TRIM_THRESHOLD) == 1)
    if ok:
        _writer_tuned_pid = os.getpid()
    return ok


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_populate_ok = sys.platform == "linux"


def populate(buffer: Any, offset: int, length: int) -> None:
    """Fault a fresh buffer's pages in with one call rather than one trap per page (a
    no-op where the system does not offer it)."""
    if not _populate_ok or length <= 0:
        return
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer, offset))
    address_populate(start, length)


def address_populate(start: int, length: int) -> None:
    global _populate_ok
    if not _populate_ok:
        return
    page = mmap.PAGESIZE
    first = start & ~(page - 1)
    if _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(start + length - first),
                       _MADV_POPULATE_WRITE) != 0:
        _populate_ok = False  # an older kernel: don't ask again


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _after_fork_in_child() -> None:
    global _slab_pool, _local
    _slab_pool = None  # the parent's slabs are not this process's to hand out
    _local = _LocalPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["Block", "SlabTensor", "Spec", "keep_freed_memory", "layout", "local_block",
           "out_of_shared_memory", "populate", "release_local", "shared_block",
           "wait_for_shared_memory"]
