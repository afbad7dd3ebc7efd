"""Read-ahead on LMDB's memory map, chosen by what a process reads.

A key lookup touches a few B-tree pages. With the kernel's read-around on (LMDB's default
without ``MDB_NORDAHEAD``), each page fault also reads the file around the page (up to the
device's ``read_ahead_kb``, often megabytes), and in a cache the pages around a leaf page are
records: checking that 600 keys exist read nearly the whole of a 1.5 GB cache. Read-around
is what a large record wants, though (a cold multi-megabyte record read page by page is many
times slower). So a store opened with read-ahead starts with its map advised for random
access (``MADV_RANDOM``: a fault reads its own page only), which is all that opening,
checking completeness, ``status`` and ``health`` need, and gets read-around back at its first
record read (:func:`record_read`). :func:`lookups` scopes random access around a scan of keys
in a process that already reads records.

The advice belongs to this process's mapping of ``data.mdb`` (a forked child inherits it;
an environment opened again maps the file afresh and starts over). Where ``madvise`` cannot
be reached, nothing changes: reads are as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("diskcache_ocr.store")

# Cache directories (real paths) whose map this process advised for random access until
# their first record read. Read on every record read, so kept as a plain set: empty is the
# common case once a reader has started.
pending: set[str] = set()
_lock = threading.Lock()

_MADV_RANDOM = getattr(mmap, "MADV_RANDOM", None)
_MADV_NORMAL = getattr(mmap, "MADV_NORMAL", None)


def _libc_madvise() -> object | None:
    if _MADV_RANDOM is None or not os.path.exists("/proc/self/maps"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def _mappings(data_file: Path) -> list[tuple[int, int]]:
    """(start, end) of every mapping of ``data_file`` in this process."""
    try:
        inode = os.stat(data_file).st_ino
    except OSError:
        return []
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if (len(fields) == 6 and fields[4] == str(inode)
                    and fields[5].rstrip("\n").endswith("/data.mdb")):
                start, end = fields[0].split("-")
                found.append((int(start, 16), int(end, 16)))
    return found


def advise(cache_dir: Path, random: bool) -> bool:
    """Advise this process's map of ``cache_dir/data.mdb``: random access (a fault reads
    its page only) or normal (the kernel's read-around). False when it could not be done."""
    if _madvise is None:
        return False
    ranges = _mappings(Path(cache_dir) / "data.mdb")
    advice = _MADV_RANDOM if random else _MADV_NORMAL
    done = False
    for start, end in ranges:
        if _madvise(start, end - start, advice) == 0:  # type: ignore[operator]
            done = True
        else:
            log.debug("%s: madvise failed (%s)", cache_dir, os.strerror(ctypes.get_errno()))
    return done


@functools.lru_cache(maxsize=64)
def _key(cache_dir: Path | str) -> str:
    """The key of ``cache_dir`` in :data:`pending`: its resolved path, resolved once per
    path (a record read while another cache is pending asks again for every record)."""
    return os.path.realpath(cache_dir)


def opened(cache_dir: Path, readahead: bool) -> None:
    """An environment was opened on ``cache_dir`` in this process. With read-ahead, its map
    serves lookups only (random access) until the first record read."""
    key = _key(cache_dir)
    with _lock:
        if readahead and advise(Path(key), random=True):
            pending.add(key)
        else:  # (without read-ahead LMDB advised random access itself: leave it)
            pending.discard(key)


def closed(cache_dir: Path) -> None:
    with _lock:
        pending.discard(_key(cache_dir))


def record_read(cache_dir: Path) -> None:
    """A record (not only a key) is read from ``cache_dir``: give its map read-around back
    if it was advised for lookups. Call only when :data:`pending` is not empty."""
    key = _key(cache_dir)
    with _lock:
        if key in pending:
            pending.discard(key)
            advise(Path(key), random=False)


@contextmanager
def lookups(cache_dir: Path, readahead: bool) -> Iterator[None]:
    """Random access to ``cache_dir``'s map for a scan of keys (read-around back after it).

    A record read by another thread meanwhile reads without read-around: slower when cold,
    never wrong.
    """
    key = _key(cache_dir)
    if not readahead or key in pending:
        yield
        return
    advised = advise(Path(key), random=True)
    try:
        yield
    finally:
        if advised:
            advise(Path(key), random=False)
