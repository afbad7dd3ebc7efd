"""CacheStore: the front of the storage layer (kinds, keys, records, index, header, counters)."""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from diskcache_ocr.codec import decode_record, verify_checksum
from diskcache_ocr.errors import CacheError, CacheFormatError
from diskcache_ocr.schema import KINDS, IndexEntry, KindVersion
from diskcache_ocr.store import mapadvice, warming
from diskcache_ocr.store.counters import STATS_FLUSH_EVERY_S, Counters, read_counter
from diskcache_ocr.store.env import SharedEnv
from diskcache_ocr.store.header import (
    HEADER_KEY,
    Policy,
    merge_header,
    unpack_header,
    written_unsynced_before_reboot,
)
from diskcache_ocr.store.opening import StoreOptions
from diskcache_ocr.store.txn import Reader, WriteBatch, check_kind
from diskcache_ocr.store.versions import DEFAULT_ROLE, PipelineOpen, open_pipeline
from diskcache_ocr.store.warming import WarmReport

log = logging.getLogger("diskcache_ocr.store")


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
        self._sh: SharedEnv | None = None
        self._counters = Counters()
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

    def _shared(self) -> SharedEnv:
        sh = self._sh
        if sh is not None and sh.env is not None and sh.pid == os.getpid():
            return sh
        # (A handle inherited from another process is never used or closed here.)
        self._sh = SharedEnv.acquire(self.path, self.options)
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

    def _forget_after_fork(self) -> None:
        # (in a forked child: the parent's environment, locks and counters are not its own)
        self._sh = None
        self._counters = Counters()

    def __del__(self) -> None:
        # NOTE: a store dropped before the process exits (a dataset made inside a function,
        # such as a Hydra main) saves its counters here: the exit finalizer holds only a weak
        # reference, so it no longer reaches this store then.
        try:
            if self._counters and self.is_open:
                self._close_env()
        except Exception:  # noqa: BLE001 - nothing may escape a finalizer
            pass

    def close(self) -> None:
        """Save counters and let go of the environment; a later use reopens it."""
        self.flush_stats()
        self._close_env()

    # -- reads -----------------------------------------------------------------------
    def reader(self) -> Reader:
        """A read transaction whose records are zero-copy views, valid inside the block."""
        return Reader(self.path, self._shared)

    def refresh(self) -> None:
        """Make this thread's next read see every write committed so far, here or elsewhere."""
        if self._sh is not None and self._sh.pid == os.getpid():
            self._sh.drop_slot(threading.get_ident())

    def get(self, kind: str, key: bytes) -> dict[str, np.ndarray] | None:
        """Owned, writeable copies of a record's arrays, or None."""
        check_kind(kind)
        with self.reader() as r:
            rec = r.get(kind, key)
            return None if rec is None else rec.copy()

    def lookups(self) -> AbstractContextManager[None]:
        """``with store.lookups():`` around a scan of keys: page faults read the pages the
        scan touches, without the read-around that suits records (see ``mapadvice``)."""
        return mapadvice.lookups(self.path, self.options.readahead)

    def contains(self, kind: str, key: bytes) -> bool:
        check_kind(kind)
        with self.reader() as r:
            return r.contains(kind, key)

    def get_index(self, source: str) -> IndexEntry | None:
        with self.reader() as r:
            return r.get_index(source)

    def iter_index(self) -> Iterator[tuple[str, IndexEntry]]:
        """Every index entry (read in one transaction, returned after it closes)."""
        with self.reader() as r:
            rows = [(os.fsdecode(bytes(k)), bytes(v))
                    for k, v in r.cursor("index")]
        for source, raw in rows:
            yield source, IndexEntry.unpack(raw, source)

    def keys(self, kind: str) -> list[bytes]:
        check_kind(kind)
        with self.reader() as r:
            return [bytes(k) for k in r.cursor(kind).iternext(values=False)]

    def iter_raw(self, kind: str) -> Iterator[tuple[bytes, bytes | memoryview]]:
        """Every record of ``kind`` as (key, encoded value), in one read transaction.

        NOTE: a value is a view on the map, valid only until the next step of the iteration;
        copy what must outlive it.
        """
        check_kind(kind)
        with self.reader() as r:
            if mapadvice.pending:
                mapadvice.record_read(self.path)
            for key, value in r.cursor(kind):
                yield bytes(key), value

    def kind_stats(self, kind: str) -> dict[str, int]:
        """Entries of one kind and the bytes of the pages it occupies (records, with each
        one's unused end of its last page, and its B-tree), from the tree's own counts.

        NOTE: not from the values: py-lmdb touches every page of a value it hands out, so
        summing their lengths read the whole cache.
        """
        check_kind(kind)
        with self.reader() as r:
            st = r.tree_stat(kind)
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return {"entries": int(st["entries"]), "bytes": int(pages * st["psize"])}

    def verify(self, kind: str, keys: Iterable[bytes] | None = None
               ) -> Iterator[tuple[bytes, CacheFormatError | None]]:
        """Every record of ``kind`` (or those of ``keys``), checked: header, payload
        checksum, arrays; a key no longer present is skipped."""
        check_kind(kind)
        for key in self.keys(kind) if keys is None else keys:
            where = f"{self.path} {kind}/{key.hex()}"
            with self.reader() as r:
                value = r.get_raw(kind, key)
                if value is None:  # deleted since the listing
                    continue
                try:
                    verify_checksum(value, where)
                    decode_record(value, where)
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

    def empty(self) -> None:
        """Delete every record, index entry and counter in one transaction (the header
        stays; :func:`~diskcache_ocr.store.remove.remove_cache` deletes the files)."""
        def body(txn: lmdb.Transaction, dbs: Mapping[str, Any]) -> None:
            for name in (*KINDS, "index", "stats"):
                txn.drop(dbs[name], delete=False)

        self.write_raw(body)

    wipe = empty  # (the earlier name)

    def commit(self, batch: WriteBatch) -> None:
        if batch.ops or self._counters:
            self.write_raw(batch.apply)

    def write_raw(self, body: Callable[[lmdb.Transaction, Mapping[str, Any]], None]) -> None:
        """Run ``body(txn, dbs)`` in one LMDB write transaction (``dbs``: the sub-database
        handles by name), this process's counters saved along; a full map grows and the
        write is retried. For the store's own modules (and tests planting bytes): above
        the store, write through :meth:`writer`."""
        if self.options.readonly:
            raise CacheError(f"{self.path}: the store is open read-only")
        sh = self._shared()
        sh.write(lambda txn: body(txn, sh.handles), self._counters, self.path,
                 sync=self.options.sync)

    # -- header and versions ---------------------------------------------------------
    def header(self) -> dict[str, Any]:
        with self.reader() as r:
            raw = r.lookup("meta", HEADER_KEY)
            return unpack_header(bytes(raw), self.path) if raw is not None else {}

    def unsynced_reboot(self) -> bool:
        """Whether writes made without fsync predate the machine's last reboot (an OS crash
        may then have lost or damaged them: ``verify``, or rebuild)."""
        return written_unsynced_before_reboot(self.header())

    def update_header(self, **changes: Any) -> dict[str, Any]:
        """Merge top-level fields into the header, atomically; returns the new header."""
        result: dict[str, Any] = {}
        self.write_raw(lambda txn, dbs: result.update(
            merge_header(txn, dbs["meta"], changes, self.path)))
        return result

    def check_kinds(
        self, expected: Mapping[str, KindVersion], policy: Policy = "error"
    ) -> list[str]:
        """:meth:`open_pipeline` for a cache of one pipeline (role ``"default"``): returns
        the kinds that were rebuilt."""
        return self.open_pipeline(DEFAULT_ROLE, expected, policy).rebuilt

    def open_pipeline(
        self, role: str, expected: Mapping[str, KindVersion], policy: Policy = "error", *,
        plain: Mapping[str, KindVersion] | None = None,
        described: Mapping[str, Any] | None = None,
    ) -> PipelineOpen:
        """Register the pipeline of ``role`` and apply ``policy`` to the kinds whose version
        differs: see :func:`diskcache_ocr.store.versions.open_pipeline`."""
        return open_pipeline(self, role, expected, policy, plain=plain, described=described)

    # -- counters --------------------------------------------------------------------
    def count(self, kind: str, *, hits: int = 0, misses: int = 0, bytes_read: int = 0) -> None:
        """Add to this process's counters; they are saved with the next write, or every few
        seconds, or at exit, so counting never makes a read into a write transaction."""
        self._ensure_finalizer(os.getpid())
        self._counters.add(kind, hits=hits, misses=misses, bytes_read=bytes_read)
        if not self.readonly and self._counters.due():
            try:
                self.flush_stats()
            except CacheError as exc:  # (counters are kept for the next write; reads go on)
                log.debug("%s: counters not saved yet: %s", self.path, exc)

    def flush_stats(self) -> None:
        """Save this process's counters now (a no-op when there is nothing to save)."""
        if self.readonly or not self._counters:
            return
        self.write_raw(lambda txn, dbs: None)

    def stats(self) -> dict[str, int]:
        """Persisted counters plus this process's unsaved ones."""
        with self.reader() as r:
            saved = {bytes(k).decode("utf-8", "replace"): read_counter(v)
                     for k, v in r.cursor("stats")}
        return self._counters.added_to(saved)

    def reset_stats(self) -> None:
        self._counters.clear()
        self.write_raw(lambda txn, dbs: txn.drop(dbs["stats"], delete=False))

    # -- maintenance -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), **self._shared().facts()}

    def warm(self) -> WarmReport:
        """Ask the kernel to read the data file into the page cache (shared by every
        process, unlike a copy in Python memory), as far as it fits comfortably in the
        memory available; the log says when it does not (see :func:`warming.warm`)."""
        self._environment()
        return warming.warm(self.path / "data.mdb")

    def max_key_size(self) -> int:
        """The longest key (bytes) the engine stores: longer source names are not indexed."""
        return int(self._environment().max_key_size())

    def reader_check(self) -> int:
        """Free reader slots left by dead processes; returns how many were freed."""
        return int(self._environment().reader_check())

    def sync(self) -> None:
        self._environment().sync(True)

    def copy_to(self, dest: str | os.PathLike[str], *, drop_free_pages: bool = True,
                compact: bool | None = None) -> Path:
        """A consistent hot copy (safe while readers and writers run); with
        ``drop_free_pages`` the live pages only, renumbered (LMDB's compacting copy: the
        file shrinks to what is used). ``compact``: the earlier name of ``drop_free_pages``."""
        if compact is not None:
            drop_free_pages = compact
        return self._shared().copy(Path(dest), self.options.dir_mode,
                                   drop_free_pages=drop_free_pages)


def _flush_if_alive(ref: weakref.ref[CacheStore]) -> None:
    store = ref()
    if store is not None:
        try:
            store.flush_stats()
        except CacheError as exc:
            log.warning("%s: counters not saved at exit: %s", store.path, exc)


# Every store this process has used (weakly): their counters are saved before a fork, and a
# forked child's copies forget the parent's environment and counters. (Registered after the
# environment's own hooks, so these run first before a fork and last after it.)
_open_stores: weakref.WeakSet[CacheStore] = weakref.WeakSet()


def _save_counters_before_fork() -> None:
    for store in list(_open_stores):
        try:
            store.flush_stats()  # (the child starts with no counters of its own)
        except CacheError as exc:
            log.warning("%s: counters not saved before a fork: %s", store.path, exc)


def _forget_in_child() -> None:
    for store in list(_open_stores):
        store._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_save_counters_before_fork, after_in_child=_forget_in_child)


__all__ = ["DEFAULT_ROLE", "STATS_FLUSH_EVERY_S", "CacheStore", "PipelineOpen"]
