"""CacheStore: the front of the storage layer (kinds, keys, records, index, header, counters)."""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import numpy as np

from diskcache_ocr.codec import (
    RecordPlan,
    decode_record,
    verify_checksum,
)
from diskcache_ocr.errors import (
    CacheError,
    CacheFormatError,
    CacheFullError,
    CacheVersionError,
)
from diskcache_ocr.schema import KINDS, IndexEntry, KindVersion, name_kind, record_name
from diskcache_ocr.store import mapadvice, warming
from diskcache_ocr.store.env import (
    _MAX_GROWS,
    StoreOptions,
    _is_disk_full,
    _open_stores,
    _SharedEnv,
    open_environment,
)
from diskcache_ocr.store.header import (
    HEADER_KEY,
    LEGACY_ROLE,
    POLICIES,
    Policy,
    _counter,
    _mark_unsynced,
    _merge_counters,
    _pack,
    _unpack_header,
    written_unsynced_before_reboot,
)
from diskcache_ocr.store.txn import WriteBatch, _check_kind, _Reader, _scratch
from diskcache_ocr.store.warming import WarmReport

log = logging.getLogger("diskcache_ocr.store")

STATS_FLUSH_EVERY_S = 5.0

# The role of a cache opened by :meth:`CacheStore.check_kinds` (one pipeline per cache).
DEFAULT_ROLE = "default"


class PipelineOpen(NamedTuple):
    """What :meth:`CacheStore.open_pipeline` did: the kinds rebuilt empty, and (policy
    ``ignore``) the stored version of each kind served as it is."""

    rebuilt: list[str]
    stored: dict[str, KindVersion]


def _forget_records(txn: lmdb.Transaction, db: Callable[[str], Any], whole: set[str],
                    retired: set[str], path: Path) -> None:
    """Delete the records the index names by a ``retired`` name and by no other name, and
    take those names (and every name of a ``whole`` kind, already dropped) out of the
    entries."""
    index = db("index")
    rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(index)]
    doomed: dict[str, set[bytes]] = {}
    live: set[tuple[str, bytes]] = set()
    changed = []
    for source, raw in rows:
        try:
            entry = IndexEntry.unpack(raw, f"{path} index {source!r:.80}")
        except CacheFormatError:
            continue
        kept = {}
        for name, key in entry.keys.items():
            kind = name_kind(name)
            if name in retired:
                doomed.setdefault(kind, set()).add(key)
            elif kind not in whole:
                kept[name] = key
                live.add((kind, key))
        if len(kept) != len(entry.keys):
            changed.append((source, replace(entry, keys=kept)))
    for source, entry in changed:
        txn.put(source, entry.pack(), db=index)
    for kind, keys in doomed.items():
        for key in keys - {k for c, k in live if c == kind}:
            txn.delete(key, db=db(kind))


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

    def _forget_after_fork(self) -> None:
        # (in a forked child: the parent's environment, locks and counters are not its own)
        self._sh = None
        self._lock = threading.RLock()
        self._pending = Counter()

    def __del__(self) -> None:
        # NOTE: a store dropped before the process exits (a dataset made inside a function,
        # such as a Hydra main) saves its counters here: the exit finalizer holds only a weak
        # reference, so it no longer reaches this store then.
        try:
            if self._pending and self.is_open:
                self._close_env()
        except Exception:  # noqa: BLE001 - nothing may escape a finalizer
            pass

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
        return open_environment(self.path, self.options)

    def get(self, kind: str, key: bytes) -> dict[str, np.ndarray] | None:
        """Owned, writeable copies of a record's arrays, or None."""
        _check_kind(kind)
        with self.reader() as r:
            rec = r.get(kind, key)
            return None if rec is None else rec.copy()

    def lookups(self) -> AbstractContextManager[None]:
        """``with store.lookups():`` around a scan of keys: page faults read the pages the
        scan touches, without the read-around that suits records (see ``mapadvice``)."""
        return mapadvice.lookups(self.path, self.options.readahead)

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
            rows = [(os.fsdecode(bytes(k)), bytes(v))
                    for k, v in r._txn.cursor(r._handles["index"])]
        for source, raw in rows:
            yield source, IndexEntry.unpack(raw, source)

    def keys(self, kind: str) -> list[bytes]:
        _check_kind(kind)
        with self.reader() as r:
            return [bytes(k) for k in r._txn.cursor(r._handles[kind]).iternext(values=False)]

    def iter_raw(self, kind: str) -> Iterator[tuple[bytes, bytes | memoryview]]:
        """Every record of ``kind`` as (key, encoded value), in one read transaction.

        NOTE: a value is a view on the map, valid only until the next step of the iteration;
        copy what must outlive it.
        """
        _check_kind(kind)
        with self.reader() as r:
            if mapadvice.pending:
                mapadvice.record_read(self.path)
            for key, value in r._txn.cursor(r._handles[kind]):
                yield bytes(key), value

    def kind_stats(self, kind: str) -> dict[str, int]:
        """Entries of one kind and the bytes of the pages it occupies (records, with each
        one's unused end of its last page, and its B-tree), from the tree's own counts.

        NOTE: not from the values: py-lmdb touches every page of a value it hands out, so
        summing their lengths read the whole cache.
        """
        _check_kind(kind)
        with self.reader() as r:
            st = r._txn.stat(r._handles[kind])
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return {"entries": int(st["entries"]), "bytes": int(pages * st["psize"])}

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
            # NOTE: the counters' lock is held only to take or give back the counters: a
            # write that grows the map waits for other threads' read blocks to end, and
            # those count their hits (under that lock) before they can end.
            with sh.lock:
                with self._lock:
                    pending = self._take_pending()
                try:
                    marking = not self.options.sync and not sh.unsynced
                    txn = env.begin(write=True)
                    try:
                        body(txn)
                        if pending:
                            _merge_counters(txn, sh.handles["stats"], pending)
                        if marking:
                            _mark_unsynced(txn, sh.handles["meta"], self.path)
                    except BaseException:
                        txn.abort()  # (explicitly: a failed write must not keep the lock)
                        raise
                    txn.commit()
                    sh.unsynced = sh.unsynced or marking
                    return
                except lmdb.MapFullError:
                    self._give_back(pending)
                    sh.grow()
                except lmdb.MapResizedError:
                    self._give_back(pending)
                    sh.adopt_map_size()
                except BaseException as exc:
                    self._give_back(pending)
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
            raw = r._txn.get(HEADER_KEY, db=r._handles["meta"])
            return _unpack_header(bytes(raw), self.path) if raw is not None else {}

    def unsynced_reboot(self) -> bool:
        """Whether writes made without fsync predate the machine's last reboot (an OS crash
        may then have lost or damaged them: ``verify``, or rebuild)."""
        return written_unsynced_before_reboot(self.header())

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
        """:meth:`open_pipeline` for a cache of one pipeline (role ``"default"``): returns
        the kinds that were rebuilt."""
        return self.open_pipeline(DEFAULT_ROLE, expected, policy).rebuilt

    def open_pipeline(
        self, role: str, expected: Mapping[str, KindVersion], policy: Policy = "error", *,
        plain: Mapping[str, KindVersion] | None = None,
        described: Mapping[str, Any] | None = None,
    ) -> PipelineOpen:
        """Register the pipeline of ``role`` (what it replaces when it changes: the caller's
        business) with the versions of the kinds it caches, and apply ``policy`` to a kind
        whose version differs from the one this role holds: ``error`` raises
        :class:`CacheVersionError`; ``rebuild`` drops only that role's old records (every
        record of the kind when no other role holds the kind; else the records the index
        names for the old version and for no version another role holds); ``ignore`` logs
        and keeps the stored versions (returned in ``stored``, to look records up by).

        Other roles' pipelines are left alone: records of several pipelines live side by
        side, named in the index by kind and version. A kind new to the role is stamped.
        ``plain``: the version whose records of a kind are keyed by content alone (the
        same for every pipeline); another version recorded there is a mismatch of that
        kind's plain records, by the same policy (a cache upgraded from format 2 has them
        dropped whatever the policy: they were keyed by content whatever made them).
        ``described``: plain data about the pipeline, recorded with it.
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        for kind in expected:
            _check_kind(kind)
        header = self.header()
        pipelines = header.get("pipelines", {})
        held = {k: KindVersion.from_dict(v)
                for k, v in pipelines.get(role, {}).get("kinds", {}).items()}
        if not held and LEGACY_ROLE in pipelines and role != LEGACY_ROLE:
            legacy = {k: KindVersion.from_dict(v)
                      for k, v in pipelines[LEGACY_ROLE].get("kinds", {}).items()}
            if all(legacy.get(k, v) == v for k, v in expected.items()):
                held = legacy  # the upgraded cache's pipeline is this one: it takes it over
        mismatched = {k: (held[k], want) for k, want in expected.items()
                      if k in held and held[k] != want}
        plain_stored = header.get("plain", {})
        plain_changed = {k: v for k, v in (plain or {}).items()
                         if k in plain_stored and KindVersion.from_dict(plain_stored[k]) != v}
        upgraded = {k for k in plain_changed if plain_stored[k].get("upgraded")}
        if policy == "error" and (mismatched or set(plain_changed) - upgraded):
            if mismatched:
                kind, (have, want) = next(iter(mismatched.items()))
                what = f"kind {kind!r} of the pipeline of role {role!r} was built by {have}"
            else:
                kind = next(k for k in plain_changed if k not in upgraded)
                have, want = KindVersion.from_dict(plain_stored[kind]), plain_changed[kind]
                what = f"kind {kind!r} (records keyed by content) was built by {have}"
            raise CacheVersionError(
                f"{self.path}: {what}, this code expects {want}; open with "
                "on_mismatch='rebuild' or run prebuild to rebuild it (the records of other "
                "pipelines in this cache are kept)"
            )
        stored = {k: held[k] for k in mismatched} if policy == "ignore" else {}
        if policy == "ignore":
            for kind, (have, want) in mismatched.items():
                log.warning("%s: serving %s built by %s (expected %s): policy 'ignore'",
                            self.path, kind, have, want)
            for kind in set(plain_changed) - upgraded:
                log.warning("%s: serving %s keyed by content, built by %s (expected %s): "
                            "policy 'ignore'", self.path, kind, plain_stored[kind]["version"],
                            plain_changed[kind])
            served = set(plain_changed) - upgraded
            mismatched, plain_changed = {}, {k: plain_changed[k] for k in upgraded}
        else:
            served = set()
        if self.readonly:
            if plain_changed:
                kind = next(iter(plain_changed))
                raise CacheVersionError(
                    f"{self.path}: kind {kind!r} (records keyed by content, from a cache of "
                    "an earlier format) was built by another version; open it read-write "
                    "once to rebuild them")
            return PipelineOpen([], stored)
        rebuilt = list(dict.fromkeys([*mismatched, *plain_changed]))
        now = time.time()

        def body(txn: lmdb.Transaction) -> None:
            meta = self._db("meta")
            raw = txn.get(HEADER_KEY, db=meta)
            header = _unpack_header(raw, self.path) if raw is not None else {}
            pipelines = {r: dict(p) for r, p in header.get("pipelines", {}).items()}
            entry = pipelines.get(role) or {"first_used": now}
            if not entry.get("kinds") and LEGACY_ROLE in pipelines and held:
                taken = pipelines.pop(LEGACY_ROLE)
                entry = {**entry, "first_used": taken.get("first_used", now)}
            kinds = {**{k: v.to_dict() for k, v in held.items()}, **entry.get("kinds", {})}
            others = {r: p.get("kinds", {}) for r, p in pipelines.items() if r != role}
            plain_now = dict(header.get("plain", {}))
            whole = set(plain_changed)
            retired: set[str] = set()
            for kind, (have, _) in mismatched.items():
                if not any(kind in k for k in others.values()):
                    whole.add(kind)
                elif not any(KindVersion.from_dict(k[kind]) == have
                             for k in others.values() if kind in k):
                    retired.add(record_name(kind, have.fingerprint))
            for kind in whole:
                txn.drop(self._db(kind), delete=False)
            if whole or retired:
                _forget_records(txn, self._db, whole, retired, self.path)
            for kind in expected:
                if kind in mismatched or kind not in kinds or kind in whole:
                    kinds[kind] = expected[kind].to_dict()
                if kind in stored:
                    kinds[kind] = stored[kind].to_dict()
            for kind, version in (plain or {}).items():
                if kind not in served:  # (also takes off the mark of an upgrade)
                    plain_now[kind] = version.to_dict()
            entry.update(kinds=kinds, last_used=now)
            if described is not None and not stored:
                entry["described"] = dict(described)
            pipelines[role] = entry
            header.update(pipelines=pipelines, plain=plain_now, kinds=kinds)
            txn.put(HEADER_KEY, _pack(header), db=meta)

        self._write(body)
        for kind in rebuilt:
            log.warning("%s: kind %s of role %r rebuilt for version %s", self.path, kind, role,
                        expected.get(kind) or (plain or {}).get(kind))
        return PipelineOpen(rebuilt, stored)

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
            try:
                self.flush_stats()
            except CacheError as exc:  # (counters are kept for the next write; reads go on)
                log.debug("%s: counters not saved yet: %s", self.path, exc)

    def _give_back(self, pending: Counter[str]) -> None:
        with self._lock:
            self._pending.update(pending)

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
                     for k, v in r._txn.cursor(r._handles["stats"])}
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

