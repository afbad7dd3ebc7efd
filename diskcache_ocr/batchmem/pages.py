"""Page-level memory habits: keep freed heap memory in processes that write, and fault a
fresh buffer's pages in with one call."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from typing import Any

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

