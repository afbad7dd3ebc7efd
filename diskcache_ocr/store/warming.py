"""Warming the page cache with a cache file, as far as it fits comfortably in memory.

Warming asks the kernel to read the file ahead (``POSIX_FADV_WILLNEED``), so that every
process on the machine later maps pages that are already there. A file larger than the
memory left would only push other files (and then its own first pages) out again, so only
what fits in half of what the kernel reports available is warmed, and the log says so.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("diskcache_ocr.store")

# NOTE: one WILLNEED reads at most the device's read-ahead window (or its largest request),
# however long the range asked for; 128 KiB is the smallest such window in common use.
_CHUNK = 128 << 10
_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class WarmReport:
    """What :func:`warm` did: bytes of the file, already in memory, asked to be read, and
    the memory budget (``None``: unknown here, the whole file was asked for)."""

    size: int
    resident: int
    warmed: int
    budget: int | None

    @property
    def fits(self) -> bool:
        return self.budget is None or self.size - self.resident <= self.budget


def mem_available(meminfo: Path = _MEMINFO) -> int | None:
    """Bytes the kernel reports available for new pages (MemAvailable), or None."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _libc_mincore() -> object | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_mincore = _libc_mincore()


def resident_bytes(path: str | os.PathLike[str]) -> int | None:
    """How much of ``path`` is in the page cache now (None where it cannot be told)."""
    if _mincore is None:
        return None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(m, np.uint8)
            pages = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
            ok = _mincore(view.ctypes.data, size, pages.ctypes.data) == 0  # type: ignore[operator]
            del view
        finally:
            m.close()
    if not ok:
        return None
    return min(size, int(np.count_nonzero(pages & 1)) * mmap.PAGESIZE)


def _human(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def warm(path: str | os.PathLike[str], *, available: int | None = None) -> WarmReport:
    """Ask the kernel to read ``path`` into the page cache, as far as half of the available
    memory (``available``: MemAvailable by default) holds what is not there yet."""
    path = Path(path)
    available = mem_available() if available is None else available
    budget = None if available is None else available // 2
    resident = resident_bytes(path) or 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        missing = size - resident
        length = (0 if missing <= 0 else size if budget is None or missing <= budget
                  else budget)
        for offset in range(0, length, _CHUNK):
            os.posix_fadvise(fd, offset, min(_CHUNK, length - offset), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    report = WarmReport(size=size, resident=resident, warmed=length, budget=budget)
    if not length:
        log.info("%s: the whole cache (%s) is in the page cache already", path.parent,
                 _human(size))
    elif report.fits:
        log.info("%s: warming the page cache with the whole cache (%s, %s of it already "
                 "there)", path.parent, _human(size), _human(resident))
    else:
        log.warning("%s: the cache (%s, %s not in memory) does not fit comfortably in "
                    "memory (%s available): warmed its first %s only; the rest is read "
                    "from disk as it is used", path.parent, _human(size), _human(missing),
                    _human(available or 0), _human(length))
    return report
