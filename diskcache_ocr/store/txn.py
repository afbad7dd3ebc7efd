"""Transactions and records: a read block's zero-copy views, and writes collected into one
write transaction."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from diskcache_ocr.codec import (
    RecordPlan,
    decode_record,
    plan_record,
)
from diskcache_ocr.errors import (
    CacheClosedError,
    CacheError,
    CacheFormatError,
)
from diskcache_ocr.schema import KINDS, IndexEntry, index_key
from diskcache_ocr.store import mapadvice
from diskcache_ocr.store.scratch import encode_buffer  # (also importable from here)

if TYPE_CHECKING:
    from diskcache_ocr.store.env import SharedEnv

log = logging.getLogger("diskcache_ocr.store")

class Record(Mapping[str, np.ndarray]):
    """The arrays of one record as zero-copy, read-only views on LMDB's memory map.

    NOTE: the views point into the map and are only valid while the :class:`ReadTxn` that
    produced them is open; after that, touching them could read unmapped memory. So every
    access goes through ``record[name]``, which checks that the transaction is still open,
    and ``copy()`` gives owned arrays that live on.
    """

    __slots__ = ("_txn", "_arrays", "nbytes")

    def __init__(self, txn: ReadTxn, arrays: dict[str, np.ndarray], nbytes: int) -> None:
        self._txn = txn
        self._arrays = arrays
        self.nbytes = nbytes

    def __getitem__(self, name: str) -> np.ndarray:
        self._txn._check_open()
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def copy(self) -> dict[str, np.ndarray]:
        """Owned, writeable copies of every array."""
        self._txn._check_open()
        return {name: np.array(arr, copy=True) for name, arr in self._arrays.items()}


class ReadTxn:
    """A read transaction handed out by :meth:`CacheStore.reader`; closes with its block."""

    __slots__ = ("_path", "_txn", "_handles", "_open")

    def __init__(self, path: Path, txn: lmdb.Transaction, handles: dict[str, Any]) -> None:
        self._path = path
        self._txn = txn
        self._handles = handles  # (the sub-databases of the environment ``txn`` belongs to)
        self._open = True

    def _check_open(self) -> None:
        if not self._open:
            raise CacheClosedError(
                f"{self._path}: this view's read transaction has ended; copy the arrays "
                "inside the `with store.reader()` block, or use store.get() for owned copies"
            )

    def get(self, kind: str, key: bytes) -> Record | None:
        """The record under ``key`` as views, or None. Raises CacheFormatError if damaged."""
        if not self._open:
            self._check_open()
        path = self._path
        if mapadvice.pending:  # (a map that served lookups only gets read-around back; before
            mapadvice.record_read(path)  # the get, which touches every page of the value)
        value = self._txn.get(key, db=self._handles[kind])
        if value is None:
            return None
        arrays = decode_record(value, lambda: f"{path} {kind}/{key.hex()}")
        return Record(self, arrays, len(value))

    def get_raw(self, kind: str, key: bytes) -> memoryview | None:
        """The record's raw bytes as a view on the map (valid inside the block)."""
        self._check_open()
        if mapadvice.pending:
            mapadvice.record_read(self._path)
        value = self._txn.get(key, db=self._handles[kind])
        return None if value is None else memoryview(value)

    def contains(self, kind: str, key: bytes) -> bool:
        self._check_open()
        with self._txn.cursor(db=self._handles[kind]) as cur:
            return cur.set_key(key)

    def get_index(self, source: str) -> IndexEntry | None:
        self._check_open()
        raw = self._txn.get(index_key(source), db=self._handles["index"])
        return None if raw is None else IndexEntry.unpack(bytes(raw), source)

    def lookup(self, name: str, key: bytes) -> memoryview | None:
        """The bytes under ``key`` in a sub-database of no records (``meta``, ``index``,
        ``stats``) as a view (valid inside the block); unlike a record read, it leaves the
        map's read-ahead as it is (see ``mapadvice``)."""
        self._check_open()
        value = self._txn.get(key, db=self._handles[name])
        return None if value is None else memoryview(value)

    def tree_stat(self, name: str) -> dict[str, int]:
        """LMDB's counts of the sub-database ``name`` (entries, pages): no record is read."""
        self._check_open()
        return self._txn.stat(self._handles[name])

    def cursor(self, name: str) -> lmdb.Cursor:
        """A cursor over the sub-database ``name`` (a kind, or ``meta``, ``index``,
        ``stats``); its keys and values are views valid inside the block."""
        self._check_open()
        return self._txn.cursor(self._handles[name])


class Reader:
    """``with store.reader() as r``: lends this thread's read transaction for one block.

    ``shared`` gives the store's environment in this process (opening it on first use).
    (A small class rather than a generator-based context manager: this runs once per
    sample read, and the generator machinery costs more than the rest of it.)
    """

    __slots__ = ("_path", "_shared", "_sh", "_slot", "_handle")

    def __init__(self, path: Path, shared: Callable[[], SharedEnv]) -> None:
        self._path = path
        self._shared = shared

    def __enter__(self) -> ReadTxn:
        sh = self._shared()
        slot = sh.acquire_slot()
        self._sh, self._slot = sh, slot
        self._handle = ReadTxn(self._path, slot.txn, sh.handles)
        return self._handle

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        self._handle._open = False
        sh = self._sh
        sh.end_block(self._slot)
        if not isinstance(exc, lmdb.Error):
            return
        # NOTE: LMDB has no page checksums; a damaged B-tree shows up here (and leaves the
        # transaction unusable, so this thread's slot is dropped).
        sh.drop_slot(threading.get_ident())
        path = self._path
        if isinstance(exc, lmdb.BadValsizeError):
            raise CacheError(f"{path}: key too long for the cache ({exc})") from None
        raise CacheFormatError(
            f"{path}: read failed, the cache file is damaged ({exc}); clear it with "
            "`diskcache-ocr clear --all`"
        ) from None




Value = bytes | bytearray | memoryview | RecordPlan


class WriteBatch:
    """Writes collected in memory and committed in one LMDB write transaction.

    ``put`` validates and lays out a record at once (a bad array raises there) but writes
    its bytes only at commit, straight into a reused buffer: the arrays must not change
    until the batch is committed.
    """

    def __init__(self) -> None:
        self.ops: list[tuple[str, str, bytes, Value | None]] = []

    def put(self, kind: str, key: bytes,
            arrays: Mapping[str, np.ndarray] | bytes | bytearray) -> None:
        check_kind(kind)
        value = (arrays if isinstance(arrays, (bytes, bytearray, memoryview))
                 else plan_record(arrays))
        self.ops.append(("put", kind, key, value))

    def delete(self, kind: str, key: bytes) -> None:
        check_kind(kind)
        self.ops.append(("delete", kind, key, None))

    def put_index(self, source: str, entry: IndexEntry) -> None:
        self.ops.append(("put", "index", index_key(source), entry.pack()))

    def delete_index(self, source: str) -> None:
        self.ops.append(("delete", "index", index_key(source), None))

    def drop(self, kind: str) -> None:
        check_kind(kind)
        self.ops.append(("drop", kind, b"", None))

    def __len__(self) -> int:
        return len(self.ops)

    def apply(self, txn: lmdb.Transaction, handles: Mapping[str, Any]) -> None:
        """Make the batch's writes inside the write transaction ``txn``."""
        for op, name, key, value in self.ops:
            db = handles[name]
            if op == "put":
                assert value is not None
                if isinstance(value, RecordPlan):
                    # NOTE: LMDB copies the value into the map, so the buffer is free again
                    # as soon as put returns.
                    value = value.write_into(encode_buffer.get(value.nbytes))
                txn.put(key, value, db=db)
            elif op == "delete":
                txn.delete(key, db=db)
            else:
                txn.drop(db, delete=False)


def check_kind(kind: str) -> None:
    """Refuse a name that is not one of the kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


__all__ = ["ReadTxn", "Reader", "Record", "WriteBatch", "check_kind",
           "encode_buffer"]
