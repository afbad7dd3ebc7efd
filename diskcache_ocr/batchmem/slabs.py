"""Shared-memory slabs of a DataLoader worker (the sending end).

A worker keeps a few slabs of POSIX shared memory (``/dev/shm``) and carves each batch from
a free one: :class:`SlabTensor` pickles as a small reference to its slab (the receiving end,
:mod:`.leases`, maps it). A slab is reused only when the main process has released it (its
header says so) and the worker's own references are gone; when every slab is busy, or the
system has no ``/dev/shm``, the caller uses fresh shared memory. When shared memory runs
short every worker of the loader gives back its idle slabs and stops reusing. Slab names carry
their owner's pid, so the slabs of a dead owner are swept by name.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import secrets
import signal
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from diskcache_ocr.batchmem.blocks import Block, Spec, carve, layout
from diskcache_ocr.batchmem.pages import populate

log = logging.getLogger("diskcache_ocr.batchmem")

SHM_DIR = "/dev/shm"
SLAB_PREFIX = "docr-slab-"
SLABS_PER_WORKER = 4  # DataLoader: prefetch (2) + one pinned + one the user holds

# Slab header: magic, state, generation. The state word is written by the worker (BUSY)
# and by the main process (FREE); the generation ties a release to one use.
HEADER = struct.Struct("<4sIQ")
HEADER_SIZE = 64
MAGIC = b"DOSL"
FREE, BUSY = 0, 1
_NO_SPACE = (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT)


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



class _Slab:
    """One shared-memory file of a worker, mapped once, reused across batches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"{owner_prefix(os.getpid())}{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_SIZE + size)
            # Reserve the pages now: a full /dev/shm then fails here, cleanly, instead of
            # killing the process with SIGBUS at the first write to a page it cannot get.
            os.posix_fallocate(fd, 0, HEADER_SIZE + size)
            self.mm = mmap.mmap(fd, HEADER_SIZE + size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.generation = 0
        self.sent = False
        self.worker_lease: weakref.ref[Any] | None = None
        HEADER.pack_into(self.mm, 0, MAGIC, FREE, 0)
        populate(self.mm, HEADER_SIZE, size)

    def available(self) -> bool:
        if self.worker_lease is not None and self.worker_lease() is not None:
            return False  # this process still holds views of the last use
        if not self.sent:
            return True  # the last use never left this process
        _, state, generation = HEADER.unpack_from(self.mm, 0)
        return state == FREE and generation == self.generation

    def acquire(self) -> Any:
        self.generation += 1
        self.sent = False
        HEADER.pack_into(self.mm, 0, MAGIC, BUSY, self.generation)
        lease = lease_type(self.size).from_buffer(self.mm, HEADER_SIZE)
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
            sweep_orphans()
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
            arrays = carve(lease, specs, offsets)
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


def pressure_flag(owner: int) -> str:
    """The file whose existence tells every worker of the process ``owner`` (the main
    process) that shared memory ran out (named like a slab: swept with its owner)."""
    return os.path.join(SHM_DIR, f"{owner_prefix(owner)}pressure")


def _raise_pressure() -> None:
    try:
        os.close(os.open(pressure_flag(os.getppid()), os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass


def _under_pressure() -> bool:
    return os.path.exists(pressure_flag(os.getppid()))


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
    for name in slab_names(owner_prefix(os.getpid())):
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


def owner_prefix(pid: int) -> str:
    """Slab names carry the creator's pid and pid namespace (containers may share /dev/shm,
    and a pid means nothing outside its namespace)."""
    return f"{SLAB_PREFIX}{_pid_namespace()}-{pid}-"


def slab_names(prefix: str) -> list[str]:
    """The names in the shared-memory directory that start with ``prefix`` (none when it
    cannot be listed)."""
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return []


def sweep_orphans() -> None:
    """Remove slabs left by workers of this pid namespace that were killed."""
    mine = f"{SLAB_PREFIX}{_pid_namespace()}-"
    for name in slab_names(mine):
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



@functools.lru_cache(maxsize=64)
def lease_type(size: int, main: bool = False) -> Any:
    """A bytes-array type over a slab's payload. In the main process its end (no array or
    tensor of the batch left) marks the slab free for the worker."""
    base = ctypes.c_ubyte * size
    if not main:
        return type("SlabLease", (base,), {})

    def __del__(self: Any) -> None:
        mm, generation = self._release
        try:
            _, state, gen = HEADER.unpack_from(mm, 0)
            if gen == generation:
                HEADER.pack_into(mm, 0, MAGIC, FREE, generation)
        except Exception:  # noqa: BLE001 - a closed map or a module torn down at shutdown
            pass

    return type("SlabLeaseMain", (base,), {"__del__": __del__})



def _after_fork_in_child() -> None:
    global _slab_pool
    _slab_pool = None  # the parent's slabs are not this process's to hand out


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
