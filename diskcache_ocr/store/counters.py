"""The read counters of a store: this process's unsaved hits, misses and bytes, and their
encoding in the ``stats`` sub-database.

Counting never makes a read into a write transaction: a process adds to its own
:class:`Counters`, which are saved with the next write (``merge_counters`` inside it), every
few seconds, or at exit.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import lmdb
import msgpack

# How often counting alone (no other write) saves the counters.
STATS_FLUSH_EVERY_S = 5.0


class Counters:
    """This process's unsaved counters of one store (``images.hits`` and the like)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pending: Counter[str] = Counter()
        self.last_flush = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, kind: str, *, hits: int = 0, misses: int = 0, bytes_read: int = 0) -> None:
        with self.lock:
            if hits:
                self.pending[f"{kind}.hits"] += hits
            if misses:
                self.pending[f"{kind}.misses"] += misses
            if bytes_read:
                self.pending[f"{kind}.bytes_read"] += bytes_read

    def due(self) -> bool:
        """Whether it is time to save them (see ``STATS_FLUSH_EVERY_S``)."""
        return time.monotonic() - self.last_flush > STATS_FLUSH_EVERY_S

    def take(self) -> Counter[str]:
        """Everything unsaved, handed to a write (which gives it back if it fails)."""
        with self.lock:
            pending, self.pending = self.pending, Counter()
            self.last_flush = time.monotonic()
            return pending

    def give_back(self, pending: Counter[str]) -> None:
        with self.lock:
            self.pending.update(pending)

    def clear(self) -> None:
        with self.lock:
            self.pending.clear()

    def added_to(self, saved: dict[str, int]) -> dict[str, int]:
        """``saved`` (the persisted counters) plus the unsaved ones."""
        with self.lock:
            for name, value in self.pending.items():
                saved[name] = saved.get(name, 0) + value
        return saved


def merge_counters(txn: lmdb.Transaction, db: Any, pending: Mapping[str, int]) -> None:
    """Add ``pending`` to the persisted counters, inside the write transaction ``txn``."""
    for name, delta in pending.items():
        key = name.encode()
        raw = txn.get(key, db=db)
        value = read_counter(raw) if raw is not None else 0
        txn.put(key, msgpack.packb(value + delta), db=db)


def read_counter(raw: bytes | memoryview) -> int:
    """A persisted counter; a damaged one counts as 0 (counters only feed reports)."""
    try:
        value = msgpack.unpackb(bytes(raw))
    except Exception:  # msgpack raises several unrelated types on bad input
        return 0
    return value if type(value) is int and 0 <= value < 1 << 63 else 0


__all__ = ["STATS_FLUSH_EVERY_S", "Counters", "merge_counters", "read_counter"]
