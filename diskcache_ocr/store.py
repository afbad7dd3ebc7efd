"""The storage layer: one LMDB environment per cache directory.

``CacheStore`` speaks kinds, keys and records (named numpy arrays); it knows nothing about
OCR. Sub-databases: ``meta`` (the header), ``index`` (one entry per source file),
``images``, ``tensors``, ``maps`` (records), ``stats`` (persisted counters).

NOTE on process safety: LMDB refuses to open the same files twice in one process, and a
forked child inherits the parent's "already open" record. So the environment opens lazily
in the process that uses it (pid checked), and every open store is closed just before this
process forks (``os.register_at_fork``), so DataLoader workers always start clean. Pickling
carries only the path and options.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgpack
import numpy as np

from diskcache_ocr._version import __version__
from diskcache_ocr.codec import (
    RecordPlan,
    decode_record,
    parse_header,
    plan_record,
    verify_checksum,
)
from diskcache_ocr.schema import KINDS, IndexEntry, KindVersion
from diskcache_ocr.errors import (
    CacheClosedError,
    CacheError,
    CacheFormatError,
    CacheFullError,
    CacheVersionError,
)

log = logging.getLogger("diskcache_ocr.store")

_DBS: tuple[str, ...] = ("meta", "index", *KINDS, "stats")
STORE_FORMAT = 1
HEADER_KEY = b"header"
Policy = Literal["error", "rebuild", "ignore"]
POLICIES: tuple[str, ...] = ("error", "rebuild", "ignore")

# A large sparse reservation makes growth (and its cross-process resize dance) rare.
DEFAULT_MAP_SIZE = 16 << 30
# A long-lived read transaction is renewed after this long so writers can reuse pages and
# readers see other processes' writes.
RENEW_AFTER_S = 1.0
STATS_FLUSH_EVERY_S = 5.0
_MAX_GROWS = 32
# Free space below which an I/O error from a write is taken for a full disk.
_NEARLY_FULL = 1 << 20
# Records are encoded into one reused buffer per thread right before LMDB copies them into
# the map: a fresh multi-megabyte buffer per record costs more in page faults than the copy.
# Larger records get a buffer of their own; an unused buffer is dropped after a while.
_SCRATCH_MAX = 64 << 20
_SCRATCH_IDLE_S = 10.0

_open_stores: weakref.WeakSet[CacheStore] = weakref.WeakSet()


def _close_before_fork() -> None:
    for store in list(_open_stores):
        store._close_env()
    for shared in list(_SharedEnv._registry.values()):
        if shared.pid == os.getpid():
            shared.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_before_fork)


@dataclass(frozen=True)
class StoreOptions:
    readonly: bool = False
    map_size: int = DEFAULT_MAP_SIZE
    readahead: bool = True
    max_readers: int = 1024
    sync: bool = True
    lock: bool = True
    dir_mode: int = 0o700

    def __post_init__(self) -> None:
        if self.map_size < 1 << 16:
            raise ValueError(f"map_size must be at least 64 KiB, got {self.map_size}")
        if self.max_readers < 1:
            raise ValueError(f"max_readers must be >= 1, got {self.max_readers}")


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

    __slots__ = ("_store", "_txn", "_handles", "_open")

    def __init__(
        self, store: CacheStore, txn: lmdb.Transaction, handles: dict[str, Any] | None = None
    ) -> None:
        self._store = store
        self._txn = txn
        # (the sub-database handles of the environment this transaction belongs to)
        self._handles = store._shared().handles if handles is None else handles
        self._open = True

    def _check_open(self) -> None:
        if not self._open:
            raise CacheClosedError(
                f"{self._store.path}: this view's read transaction has ended; copy the arrays "
                "inside the `with store.reader()` block, or use store.get() for owned copies"
            )

    def get(self, kind: str, key: bytes) -> Record | None:
        """The record under ``key`` as views, or None. Raises CacheFormatError if damaged."""
        if not self._open:
            self._check_open()
        value = self._txn.get(key, db=self._handles[kind])
        if value is None:
            return None
        store = self._store
        arrays = decode_record(value, lambda: f"{store.path} {kind}/{key.hex()}")
        return Record(self, arrays, len(value))

    def get_raw(self, kind: str, key: bytes) -> memoryview | None:
        """The record's raw bytes as a view on the map (valid inside the block)."""
        self._check_open()
        value = self._txn.get(key, db=self._handles[kind])
        return None if value is None else memoryview(value)

    def contains(self, kind: str, key: bytes) -> bool:
        self._check_open()
        with self._txn.cursor(db=self._store._db(kind)) as cur:
            return cur.set_key(key)

    def get_index(self, source: str) -> IndexEntry | None:
        self._check_open()
        raw = self._txn.get(source.encode(), db=self._store._db("index"))
        return None if raw is None else IndexEntry.unpack(bytes(raw), source)


class _Reader:
    """``with store.reader() as r``: lends this thread's read transaction for one block.

    (A small class rather than a generator-based context manager: this runs once per
    sample read, and the generator machinery costs more than the rest of it.)
    """

    __slots__ = ("_store", "_sh", "_slot", "_handle")

    def __init__(self, store: CacheStore) -> None:
        self._store = store

    def __enter__(self) -> ReadTxn:
        sh = self._store._shared()
        slot = sh.acquire_slot()
        self._sh, self._slot = sh, slot
        self._handle = ReadTxn(self._store, slot.txn, sh.handles)
        return self._handle

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        self._handle._open = False
        sh = self._sh
        with sh.lock:
            self._slot.borrowed -= 1
        if not isinstance(exc, lmdb.Error):
            return
        # NOTE: LMDB has no page checksums; a damaged B-tree shows up here (and leaves the
        # transaction unusable, so this thread's slot is dropped).
        sh.drop_slot(threading.get_ident())
        path = self._store.path
        if isinstance(exc, lmdb.BadValsizeError):
            raise CacheError(f"{path}: key too long for the cache ({exc})") from None
        raise CacheFormatError(
            f"{path}: read failed, the cache file is damaged ({exc}); clear it with "
            "`diskcache-ocr clear --all`"
        ) from None


class _Scratch(threading.local):
    """This thread's reusable encode buffer (see ``_SCRATCH_MAX``)."""

    buf: bytearray | None = None
    used = 0.0

    def get(self, size: int) -> bytearray:
        if size > _SCRATCH_MAX:
            return bytearray(size)
        if self.buf is None or len(self.buf) < size:
            self.buf = None  # (let the old one go before the new one is touched)
            self.buf = bytearray(-(-size // (1 << 20)) * (1 << 20))
        self.used = time.monotonic()
        return self.buf

    def drop_if_idle(self, now: float) -> None:
        if self.buf is not None and now - self.used > _SCRATCH_IDLE_S:
            self.buf = None


_scratch = _Scratch()

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
        _check_kind(kind)
        value = (arrays if isinstance(arrays, (bytes, bytearray, memoryview))
                 else plan_record(arrays))
        self.ops.append(("put", kind, key, value))

    def delete(self, kind: str, key: bytes) -> None:
        _check_kind(kind)
        self.ops.append(("delete", kind, key, None))

    def put_index(self, source: str, entry: IndexEntry) -> None:
        self.ops.append(("put", "index", source.encode(), entry.pack()))

    def delete_index(self, source: str) -> None:
        self.ops.append(("delete", "index", source.encode(), None))

    def drop(self, kind: str) -> None:
        _check_kind(kind)
        self.ops.append(("drop", kind, b"", None))

    def __len__(self) -> int:
        return len(self.ops)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


class _Slot:
    """A thread's long-lived read transaction and how many blocks borrow it."""

    __slots__ = ("txn", "started", "borrowed", "generation")

    def __init__(self, txn: lmdb.Transaction, generation: int) -> None:
        self.txn = txn
        self.started = time.monotonic()
        self.borrowed = 0
        self.generation = generation


class _SharedEnv:
    """One process's open environment for one cache directory, shared by every CacheStore
    on that directory (LMDB allows one open per process), with its threads' read slots."""

    _registry: dict[tuple[int, str], _SharedEnv] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: Path, env: lmdb.Environment, handles: dict[str, Any],
                 readonly: bool, max_readers: int) -> None:
        self.path = path
        self.env: lmdb.Environment | None = env
        self.handles = handles
        self.readonly = readonly
        self.max_readers = max_readers
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.slots: dict[int, _Slot] = {}
        self.write_generation = 0
        self.users = 0
        self.unsynced = False  # this process committed without fsync: sync at close

    @classmethod
    def acquire(cls, store: CacheStore) -> _SharedEnv:
        key = (os.getpid(), os.path.realpath(store.path))
        with cls._registry_lock:
            sh = cls._registry.get(key)
            if sh is None or sh.env is None:
                env, handles = store._open_env()
                sh = cls(store.path, env, handles, store.options.readonly,
                         store.options.max_readers)
                cls._registry[key] = sh
            elif sh.readonly and not store.options.readonly:
                raise CacheError(
                    f"{store.path}: already open read-only in this process; open the read-write "
                    "store first or close the read-only one"
                )
            sh.users += 1
            return sh

    def release(self) -> None:
        with self._registry_lock:
            self.users -= 1
            if self.users <= 0:
                self.close()

    def close(self) -> None:
        with self.lock:
            if self.env is None:
                return
            for slot in self.slots.values():
                slot.txn.abort()
            self.slots = {}
            if self.unsynced:
                self.env.sync(True)
            self.env.close()
            self.env = None
        self._registry.pop((self.pid, os.path.realpath(self.path)), None)

    def acquire_slot(self) -> _Slot:
        tid = threading.get_ident()
        with self.lock:
            if self.env is None:
                raise CacheClosedError(f"{self.path}: the environment was closed")
            slot = self.slots.get(tid)
            if slot is not None and slot.borrowed == 0 and (
                slot.generation != self.write_generation
                or time.monotonic() - slot.started > RENEW_AFTER_S
            ):
                slot.txn.abort()
                del self.slots[tid]
                slot = None
                _scratch.drop_if_idle(time.monotonic())  # (a reader that no longer writes)
            if slot is None:
                slot = _Slot(self._begin_read(), self.write_generation)
                self.slots[tid] = slot
            slot.borrowed += 1
            return slot

    def drop_slot(self, tid: int) -> None:
        with self.lock:
            slot = self.slots.get(tid)
            if slot is not None and slot.borrowed == 0:
                slot.txn.abort()
                del self.slots[tid]

    def _begin_read(self) -> lmdb.Transaction:
        assert self.env is not None
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.adopt_map_size()
            return self.env.begin(buffers=True)
        except lmdb.ReadersFullError:
            raise CacheError(
                f"{self.path}: all {self.max_readers} reader slots are taken; run "
                "`diskcache-ocr health` to free slots of dead processes, or raise max_readers"
            ) from None

    def _release_idle_slots(self) -> None:
        # NOTE: resizing the map unmaps it: no view of this process may be in use then.
        if any(s.borrowed for s in self.slots.values()):
            raise CacheError(
                f"{self.path}: the map must be resized while a read block is open in this "
                "process; leave `with store.reader()` blocks before writing"
            )
        for slot in self.slots.values():
            slot.txn.abort()
        self.slots = {}

    def adopt_map_size(self) -> None:
        """Another process grew the map: adopt its size."""
        assert self.env is not None
        with self.lock:
            self._release_idle_slots()
            self.env.set_mapsize(0)

    def grow(self) -> None:
        assert self.env is not None
        with self.lock:
            self._release_idle_slots()
            current = self.env.info()["map_size"]
            log.info("%s: growing the map from %d to %d bytes", self.path, current, current * 2)
            self.env.set_mapsize(current * 2)


class CacheStore:
    """An LMDB-backed store of records per kind, with an index, a header and counters.

    >>> store = CacheStore(tmp_path / "cache")                  # doctest: +SKIP
    >>> store.put("images", key, {"image": pixels})             # doctest: +SKIP
    >>> with store.reader() as r:                               # doctest: +SKIP
    ...     np.copyto(batch[0], r.get("images", key)["image"])
    """

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, **options: Any):
        self.path = Path(path)
        self.options = StoreOptions(readonly=readonly, **options)
        self._init_runtime()

    # -- process-local state ------------------------------------------------------------
    def _init_runtime(self) -> None:
        self._sh: _SharedEnv | None = None
        self._lock = threading.RLock()  # guards this store's counters
        self._pending: Counter[str] = Counter()
        self._last_flush = time.monotonic()
        self._finalizer_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "options": asdict(self.options)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.options = StoreOptions(**state["options"])
        self._init_runtime()

    def __repr__(self) -> str:
        mode = "readonly" if self.options.readonly else "read-write"
        return f"CacheStore({str(self.path)!r}, {mode})"

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def readonly(self) -> bool:
        return self.options.readonly

    @property
    def is_open(self) -> bool:
        """Whether this process holds the environment open for this store right now."""
        sh = self._sh
        return sh is not None and sh.env is not None and sh.pid == os.getpid()

    def _shared(self) -> _SharedEnv:
        sh = self._sh
        if sh is not None and sh.env is not None and sh.pid == os.getpid():
            return sh
        # (A handle inherited from another process is never used or closed here.)
        self._sh = _SharedEnv.acquire(self)
        _open_stores.add(self)
        self._ensure_finalizer(os.getpid())
        return self._sh

    def _environment(self) -> lmdb.Environment:
        env = self._shared().env
        assert env is not None
        return env

    def _ensure_finalizer(self, pid: int) -> None:
        if self._finalizer_pid != pid:
            # Runs when a multiprocessing child (a DataLoader worker) exits normally, which
            # skips atexit: the worker's last counters are saved.
            multiprocessing.util.Finalize(
                self, _flush_if_alive, args=(weakref.ref(self),), exitpriority=10
            )
            self._finalizer_pid = pid

    def _db(self, name: str) -> Any:
        return self._shared().handles[name]

    def _close_env(self) -> None:
        sh = self._sh
        if sh is None or sh.pid != os.getpid() or sh.env is None:
            self._sh = None
            return
        try:
            self.flush_stats()
        except CacheError as exc:
            log.warning("%s: counters not saved: %s", self.path, exc)
        self._sh = None
        sh.release()

    def close(self) -> None:
        """Save counters and let go of the environment; a later use reopens it."""
        self.flush_stats()
        self._close_env()

    # -- reads -----------------------------------------------------------------------
    def reader(self) -> _Reader:
        """A read transaction whose records are zero-copy views, valid inside the block."""
        return _Reader(self)

    def refresh(self) -> None:
        """Make this thread's next read see every write committed so far, here or elsewhere."""
        if self._sh is not None and self._sh.pid == os.getpid():
            self._sh.drop_slot(threading.get_ident())

    def _open_env(self) -> tuple[lmdb.Environment, dict[str, Any]]:
        opts = self.options
        if not opts.readonly:
            self.path.mkdir(mode=opts.dir_mode, parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").exists():
            raise CacheError(f"{self.path}: no cache here (no data.mdb) to open read-only")
        lock = opts.lock
        if opts.readonly and lock and not _lock_writable(self.path):
            # LMDB cannot register a reader in a lock file it may not write (a cache shared
            # read-only by another user): read without one, as read-only LMDB datasets do.
            log.warning("%s: lock.mdb is not writable by this user; reading without a lock, "
                        "which is safe only while no process writes this cache", self.path)
            lock = False
        try:
            env = lmdb.open(
                str(self.path), map_size=opts.map_size, readonly=opts.readonly,
                readahead=opts.readahead, max_readers=opts.max_readers, max_dbs=len(_DBS) + 2,
                max_spare_txns=0, lock=lock, sync=opts.sync, metasync=opts.sync,
                mode=0o600 if opts.dir_mode == 0o700 else 0o644,
            )
        except lmdb.ReadersFullError:
            raise _readers_full(self.path, opts.max_readers) from None
        except lmdb.InvalidError as exc:
            raise CacheFormatError(f"{self.path}/data.mdb is not an LMDB file ({exc})") from None
        except lmdb.VersionMismatchError as exc:
            raise CacheFormatError(f"{self.path}: written by another LMDB engine ({exc})") from None
        except lmdb.Error as exc:
            raise CacheError(f"{self.path}: cannot open the cache ({exc})") from None
        try:
            for attempt in range(_MAX_GROWS):
                try:
                    _check_complete(env, self.path)
                    handles = self._open_dbs(env)
                    self._check_header(env, handles)
                    break
                except lmdb.MapResizedError:
                    # Another process grew the map while this one was opening: adopt its
                    # size (no transaction is open here) and try again.
                    if attempt == _MAX_GROWS - 1:
                        raise
                    env.set_mapsize(0)
        except BaseException as exc:
            env.close()
            if isinstance(exc, lmdb.ReadersFullError):
                raise _readers_full(self.path, opts.max_readers) from None
            if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError)):
                raise CacheFormatError(f"{self.path}: the cache file is damaged ({exc})") from None
            if isinstance(exc, lmdb.Error):
                raise CacheError(f"{self.path}: cannot open the cache ({exc})") from None
            raise
        return env, handles

    def _open_dbs(self, env: lmdb.Environment) -> dict[str, Any]:
        with env.begin() as txn:
            named = {bytes(k) for k, _ in txn.cursor()}
        del txn  # a finished read transaction keeps its reader slot until it is freed
        if named and b"meta" not in named:
            raise CacheFormatError(
                f"{self.path}: an LMDB environment, but not a diskcache-ocr cache (no 'meta')"
            )
        if self.options.readonly:
            missing = [n for n in _DBS if n.encode() not in named]
            if missing:
                raise CacheFormatError(
                    f"{self.path}: incomplete cache, missing sub-databases {missing}"
                )
            # NOTE: a handle opened inside an explicit read-only transaction is not usable
            # afterwards; let the binding open each one on its own.
            return {n: env.open_db(n.encode(), create=False) for n in _DBS}
        with env.begin(write=True) as txn:
            return {n: env.open_db(n.encode(), txn=txn) for n in _DBS}

    def _check_header(self, env: lmdb.Environment, handles: dict[str, Any]) -> None:
        with env.begin() as txn:
            raw = txn.get(HEADER_KEY, db=handles["meta"])
        if raw is None:
            if self.options.readonly:
                raise CacheFormatError(f"{self.path}: the cache has no header")
            header = {
                "format": STORE_FORMAT, "library": __version__,
                "engine": ".".join(map(str, env.lib_version())),
                "created_at": time.time(), "kinds": {}, "build": {},
            }
            with env.begin(write=True) as txn:
                txn.put(HEADER_KEY, _pack(header), db=handles["meta"])
            return
        header = _unpack_header(raw, self.path)
        if header.get("format") != STORE_FORMAT:
            raise CacheFormatError(
                f"{self.path}: cache format {header.get('format')!r}, this library reads "
                f"format {STORE_FORMAT}; clear it with `diskcache-ocr clear --all`"
            )

    def get(self, kind: str, key: bytes) -> dict[str, np.ndarray] | None:
        """Owned, writeable copies of a record's arrays, or None."""
        _check_kind(kind)
        with self.reader() as r:
            rec = r.get(kind, key)
            return None if rec is None else rec.copy()

    def contains(self, kind: str, key: bytes) -> bool:
        _check_kind(kind)
        with self.reader() as r:
            return r.contains(kind, key)

    def get_index(self, source: str) -> IndexEntry | None:
        with self.reader() as r:
            return r.get_index(source)

    def iter_index(self) -> Iterator[tuple[str, IndexEntry]]:
        """Every index entry (read in one transaction, returned after it closes)."""
        with self.reader() as r:
            rows = [(bytes(k).decode(), bytes(v)) for k, v in r._txn.cursor(self._db("index"))]
        for source, raw in rows:
            yield source, IndexEntry.unpack(raw, source)

    def keys(self, kind: str) -> list[bytes]:
        _check_kind(kind)
        with self.reader() as r:
            return [bytes(k) for k in r._txn.cursor(self._db(kind)).iternext(values=False)]

    def iter_raw(self, kind: str) -> Iterator[tuple[bytes, memoryview]]:
        """Every record of ``kind`` as (key, encoded value), in one read transaction.

        NOTE: a value is a view on the map, valid only until the next step of the iteration;
        copy what must outlive it.
        """
        _check_kind(kind)
        with self.reader() as r:
            for key, value in r._txn.cursor(self._db(kind)):
                yield bytes(key), value

    def kind_stats(self, kind: str) -> dict[str, int]:
        """Entries and value bytes of one kind (reads no payload: sizes live in the nodes)."""
        _check_kind(kind)
        entries = total = 0
        with self.reader() as r:
            for _, value in r._txn.cursor(self._db(kind)):
                entries += 1
                total += len(value)
        return {"entries": entries, "bytes": total}

    def verify(self, kind: str) -> Iterator[tuple[bytes, CacheFormatError | None]]:
        """Every record of ``kind``, checked (header and payload checksum)."""
        _check_kind(kind)
        for key in self.keys(kind):
            with self.reader() as r:
                value = r.get_raw(kind, key)
                if value is None:  # deleted since the listing
                    continue
                try:
                    verify_checksum(value, f"{self.path} {kind}/{key.hex()}")
                    decode_record(value)
                except CacheFormatError as exc:
                    yield key, exc
                    continue
            yield key, None

    # -- writes ----------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[WriteBatch]:
        """Collect writes; they commit together, in one transaction, when the block ends."""
        batch = WriteBatch()
        yield batch
        self.commit(batch)

    def put(self, kind: str, key: bytes, arrays: Mapping[str, np.ndarray]) -> None:
        with self.writer() as w:
            w.put(kind, key, arrays)

    def delete(self, kind: str, key: bytes) -> None:
        with self.writer() as w:
            w.delete(kind, key)

    def drop(self, kind: str) -> None:
        """Delete every record of one kind; the others are kept."""
        with self.writer() as w:
            w.drop(kind)

    def wipe(self) -> None:
        """Delete every record, index entry and counter in one transaction (the header
        stays)."""
        def body(txn: lmdb.Transaction) -> None:
            for name in (*KINDS, "index", "stats"):
                txn.drop(self._db(name), delete=False)

        self._write(body)

    def commit(self, batch: WriteBatch) -> None:
        if batch.ops or self._pending:
            self._write(lambda txn: self._apply(txn, batch))

    def _apply(self, txn: lmdb.Transaction, batch: WriteBatch) -> None:
        for op, name, key, value in batch.ops:
            db = self._db(name)
            if op == "put":
                assert value is not None
                if isinstance(value, RecordPlan):
                    # NOTE: LMDB copies the value into the map, so the buffer is free again
                    # as soon as put returns.
                    value = value.write_into(_scratch.get(value.nbytes))
                txn.put(key, value, db=db)
            elif op == "delete":
                txn.delete(key, db=db)
            else:
                txn.drop(db, delete=False)

    def _write(self, body: Callable[[lmdb.Transaction], None]) -> None:
        if self.options.readonly:
            raise CacheError(f"{self.path}: the store is open read-only")
        sh = self._shared()
        env = self._environment()
        for _ in range(_MAX_GROWS):
            with sh.lock, self._lock:
                pending = self._take_pending()
                try:
                    marking = not self.options.sync and not sh.unsynced
                    with env.begin(write=True) as txn:
                        body(txn)
                        if pending:
                            _merge_counters(txn, sh.handles["stats"], pending)
                        if marking:
                            _mark_unsynced(txn, sh.handles["meta"], self.path)
                    sh.unsynced = sh.unsynced or marking
                    sh.write_generation += 1
                    return
                except lmdb.MapFullError:
                    self._pending.update(pending)
                    sh.grow()
                except lmdb.MapResizedError:
                    self._pending.update(pending)
                    sh.adopt_map_size()
                except BaseException as exc:
                    self._pending.update(pending)
                    if not isinstance(exc, lmdb.Error):
                        raise
                    if _is_disk_full(exc, self.path):
                        raise CacheFullError(
                            f"{self.path}: the disk is full; nothing of this write was kept, "
                            f"the cache is intact ({exc})"
                        ) from None
                    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError,
                                        lmdb.BadTxnError)):
                        # A damaged tree (BadTxn follows a first such error): a refusal that
                        # `clear --all` recognises, and a fresh read snapshot next time.
                        sh.drop_slot(threading.get_ident())
                        raise CacheFormatError(
                            f"{self.path}: write failed, the cache file is damaged ({exc}); "
                            "clear it with `diskcache-ocr clear --all`"
                        ) from None
                    raise CacheError(f"{self.path}: write failed ({exc})") from None
        raise CacheFullError(f"{self.path}: the map could not grow enough for this write")

    # -- header and versions ---------------------------------------------------------
    def header(self) -> dict[str, Any]:
        with self.reader() as r:
            raw = r._txn.get(HEADER_KEY, db=self._db("meta"))
            return _unpack_header(bytes(raw), self.path) if raw is not None else {}

    def unsynced_reboot(self) -> bool:
        """Whether writes made without fsync predate the machine's last reboot (an OS crash
        may then have lost or damaged them: ``verify``, or rebuild)."""
        marked = self.header().get("unsynced_boot")
        return bool(marked) and marked != boot_id()

    def update_header(self, **changes: Any) -> dict[str, Any]:
        """Merge top-level fields into the header, atomically."""
        result: dict[str, Any] = {}

        def body(txn: lmdb.Transaction) -> None:
            raw = txn.get(HEADER_KEY, db=self._db("meta"))
            header = _unpack_header(raw, self.path) if raw is not None else {}
            header.update(changes)
            txn.put(HEADER_KEY, _pack(header), db=self._db("meta"))
            result.update(header)

        self._write(body)
        return result

    def check_kinds(
        self, expected: Mapping[str, KindVersion], policy: Policy = "error"
    ) -> list[str]:
        """Compare each kind's stored version with ``expected`` and apply ``policy``.

        Returns the kinds that were (re)built empty. A kind seen for the first time is
        stamped. ``error`` raises :class:`CacheVersionError`; ``rebuild`` drops that kind
        only; ``ignore`` logs and serves what is stored.
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        stored = self.header().get("kinds", {})
        mismatched = {}
        for kind, want in expected.items():
            _check_kind(kind)
            have = stored.get(kind)
            if have is not None and KindVersion.from_dict(have) != want:
                mismatched[kind] = (KindVersion.from_dict(have), want)
        fresh = [k for k in expected if k not in stored]
        if mismatched and policy == "error":
            kind, (have, want) = next(iter(mismatched.items()))
            raise CacheVersionError(
                f"{self.path}: kind {kind!r} was built by {have}, this code expects {want}; "
                "open with on_mismatch='rebuild' or run prebuild to rebuild it"
            )
        if mismatched and policy == "ignore":
            for kind, (have, want) in mismatched.items():
                log.warning("%s: serving %s built by %s (expected %s): policy 'ignore'",
                            self.path, kind, have, want)
            mismatched = {}
        if self.readonly:
            return []
        if mismatched or fresh:
            rebuilt = list(mismatched)

            def body(txn: lmdb.Transaction) -> None:
                meta = self._db("meta")
                raw = txn.get(HEADER_KEY, db=meta)
                header = _unpack_header(raw, self.path) if raw is not None else {}
                kinds = dict(header.get("kinds", {}))
                for kind in rebuilt:
                    txn.drop(self._db(kind), delete=False)
                for kind in rebuilt + fresh:
                    kinds[kind] = expected[kind].to_dict()
                header["kinds"] = kinds
                txn.put(HEADER_KEY, _pack(header), db=meta)

            self._write(body)
            for kind in rebuilt:
                log.warning("%s: kind %s rebuilt for version %s", self.path, kind, expected[kind])
            return rebuilt
        return []

    # -- counters --------------------------------------------------------------------
    def count(self, kind: str, *, hits: int = 0, misses: int = 0, bytes_read: int = 0) -> None:
        """Add to this process's counters; they are saved with the next write, or every few
        seconds, or at exit, so counting never makes a read into a write transaction."""
        self._ensure_finalizer(os.getpid())
        with self._lock:
            if hits:
                self._pending[f"{kind}.hits"] += hits
            if misses:
                self._pending[f"{kind}.misses"] += misses
            if bytes_read:
                self._pending[f"{kind}.bytes_read"] += bytes_read
        if not self.readonly and time.monotonic() - self._last_flush > STATS_FLUSH_EVERY_S:
            self.flush_stats()

    def _take_pending(self) -> Counter[str]:
        pending, self._pending = self._pending, Counter()
        self._last_flush = time.monotonic()
        return pending

    def flush_stats(self) -> None:
        """Save this process's counters now (a no-op when there is nothing to save)."""
        if self.readonly or not self._pending:
            return
        self._write(lambda txn: None)

    def stats(self) -> dict[str, int]:
        """Persisted counters plus this process's unsaved ones."""
        with self.reader() as r:
            saved = {bytes(k).decode("utf-8", "replace"): _counter(v)
                     for k, v in r._txn.cursor(self._db("stats"))}
        with self._lock:
            for name, value in self._pending.items():
                saved[name] = saved.get(name, 0) + value
        return saved

    def reset_stats(self) -> None:
        with self._lock:
            self._pending.clear()
        self._write(lambda txn: txn.drop(self._db("stats"), delete=False))

    # -- maintenance -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        env = self._environment()
        info, stat = env.info(), env.stat()
        return {
            "path": str(self.path), "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "readers": info["num_readers"], "max_readers": info["max_readers"],
            "engine": ".".join(map(str, env.lib_version())),
        }

    def warm(self) -> None:
        """Ask the kernel to read the data file into the page cache (shared by every
        process, unlike a copy in Python memory)."""
        self._environment()
        fd = os.open(self.path / "data.mdb", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def max_key_size(self) -> int:
        """The longest key (bytes) the engine stores: longer source names are not indexed."""
        return int(self._environment().max_key_size())

    def reader_check(self) -> int:
        """Free reader slots left by dead processes; returns how many were freed."""
        return int(self._environment().reader_check())

    def sync(self) -> None:
        self._environment().sync(True)

    def copy_to(self, dest: str | os.PathLike[str], *, compact: bool = True) -> Path:
        """A consistent hot copy (safe while readers and writers run)."""
        dest = Path(dest)
        dest.mkdir(mode=self.options.dir_mode, parents=True, exist_ok=True)
        if (dest / "data.mdb").exists():
            raise CacheError(f"{dest}: already holds a cache; choose an empty directory")
        self._environment().copy(str(dest), compact=compact)
        return dest


def _flush_if_alive(ref: weakref.ref[CacheStore]) -> None:
    store = ref()
    if store is not None:
        try:
            store.flush_stats()
        except CacheError as exc:
            log.warning("%s: counters not saved at exit: %s", store.path, exc)


def _merge_counters(txn: lmdb.Transaction, db: Any, pending: Mapping[str, int]) -> None:
    for name, delta in pending.items():
        key = name.encode()
        raw = txn.get(key, db=db)
        value = _counter(raw) if raw is not None else 0
        txn.put(key, msgpack.packb(value + delta), db=db)


def _counter(raw: bytes | memoryview) -> int:
    """A persisted counter; a damaged one counts as 0 (counters only feed reports)."""
    try:
        value = msgpack.unpackb(bytes(raw))
    except Exception:  # msgpack raises several unrelated types on bad input
        return 0
    return value if type(value) is int and 0 <= value < 1 << 63 else 0


def boot_id() -> str:
    """This boot of the machine ('' where the system does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _mark_unsynced(txn: lmdb.Transaction, db: Any, path: Path) -> None:
    """Note in the header that this boot wrote without fsync.

    NOTE: without fsync a killed process loses nothing (its pages are in the OS cache), but
    an OS crash or power loss can lose or damage recent pages. The boot id tells a later
    open whether such a crash can have happened since (see ``CacheStore.unsynced_reboot``).
    """
    raw = txn.get(HEADER_KEY, db=db)
    header = _unpack_header(raw, path) if raw is not None else {}
    if header.get("unsynced_boot") != boot_id():
        header["unsynced_boot"] = boot_id()
        txn.put(HEADER_KEY, _pack(header), db=db)


def _pack(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(header), use_bin_type=True)


def _unpack_header(raw: bytes | memoryview, path: Path) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(bytes(raw), raw=False, max_map_len=1024, max_array_len=1024)
    except Exception as exc:
        raise CacheFormatError(f"{path}: unreadable cache header ({exc})") from None
    if not isinstance(header, dict):
        raise CacheFormatError(f"{path}: cache header is not a map")
    return header


def _is_disk_full(exc: lmdb.Error, path: Path) -> bool:
    code = getattr(exc, "code", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(exc):
        return True
    # LMDB reports a short write (the disk filled up in the middle of a page run) as EIO.
    if code != errno.EIO and "Input/output error" not in str(exc):
        return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL


def _check_complete(env: lmdb.Environment, path: Path) -> None:
    """Refuse a data file shorter than the pages its last commit uses (truncated, e.g. by a
    failed copy): touching a missing page through the memory map kills the process (SIGBUS)."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = os.path.getsize(path / "data.mdb")
    if actual < needed:
        raise CacheFormatError(
            f"{path}/data.mdb is truncated: {actual} bytes, its last commit uses {needed}; "
            "clear it with `diskcache-ocr clear --all`"
        )


def _lock_writable(path: Path) -> bool:
    lockfile = path / "lock.mdb"
    return os.access(lockfile if os.path.exists(lockfile) else path, os.W_OK)


def _readers_full(path: Path, max_readers: int) -> CacheError:
    return CacheError(
        f"{path}: all {max_readers} reader slots are taken; run `diskcache-ocr health` to free "
        "slots of dead processes, or raise max_readers"
    )


__all__ = [
    "KINDS", "CacheStore", "IndexEntry", "KindVersion", "ReadTxn", "Record", "StoreOptions",
    "WriteBatch", "parse_header",
]
