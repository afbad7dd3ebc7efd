"""The LMDB environment and its process rules.

NOTE: LMDB refuses to open the same files twice in one process, and a forked child inherits
the parent's "already open" record. So the environment opens lazily in the process that uses
it (pid checked), one per process and directory shared by every store on it. Around a fork
(``os.register_at_fork``) the parent waits for its read blocks in flight, ends its idle read
transactions and holds new ones back until the fork is done; it keeps its environment open.
The child, which has no transaction then, closes its inherited copy (that only forgets it:
closing a live transaction there would free the parent's reader slot in the shared lock
table), so DataLoader workers always start clean and the parent's threads read on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from diskcache_ocr.errors import (
    CacheClosedError,
    CacheError,
    CacheFormatError,
    CacheFullError,
)
from diskcache_ocr.store import mapadvice
from diskcache_ocr.store.counters import Counters, merge_counters
from diskcache_ocr.store.files import (  # (the rest: names that lived here before)
    CACHE_FILES,
    MOUNTINFO,
    NETWORK_FILESYSTEMS,
    check_cache_files,
    directory_lock,
    network_filesystem,
    release_directory_lock,
)
from diskcache_ocr.store.header import mark_unsynced
from diskcache_ocr.store.opening import (
    DEFAULT_MAP_SIZE,
    MAX_GROWS,
    StoreOptions,
    is_disk_full,
    open_environment,
    readers_full,
)
from diskcache_ocr.store.scratch import encode_buffer

log = logging.getLogger("diskcache_ocr.store")

# How long a fork or a close waits for other threads' read blocks to end. A block is one
# batch's lookup; only a block left open on purpose (an unfinished iter_raw) lasts longer.
_DRAIN_S = 60.0


_forking: list[SharedEnv] = []  # environments held quiet across this process's fork


def _before_fork() -> None:
    SharedEnv._registry_lock.acquire()
    for shared in list(SharedEnv._registry.values()):
        if shared.pid == os.getpid() and shared.env is not None:
            shared.lock.acquire()
            shared.quiet = shared.drain("fork")
            _forking.append(shared)


def _after_fork_in_parent() -> None:
    for shared in _forking:
        shared.lock.release()
    _forking.clear()
    SharedEnv._registry_lock.release()


def _after_fork_in_child() -> None:
    SharedEnv._registry_lock = threading.Lock()
    SharedEnv._registry = {}
    for shared in _forking:
        env, shared.env, shared.slots = shared.env, None, {}
        shared.lock = threading.RLock()
        shared.cond = threading.Condition(shared.lock)
        if env is not None and shared.quiet:
            env.close()  # no transaction is left: this only forgets the parent's open
        elif env is not None:
            _inherited.append(env)  # never closed here (see drain)
    _forking.clear()


_inherited: list[lmdb.Environment] = []


# (The stores' own fork hooks, registered by ``cache`` after these, save their counters
# before these run and forget the parent's environment after.)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class _Slot:
    """A thread's read transaction and how many (nested) blocks borrow it; it ends with the
    last of them (see ``end_block``)."""

    __slots__ = ("txn", "borrowed")

    def __init__(self, txn: lmdb.Transaction) -> None:
        self.txn = txn
        self.borrowed = 0


class SharedEnv:
    """One process's open environment for one cache directory, shared by every CacheStore
    on that directory (LMDB allows one open per process), with its threads' read slots."""

    _registry: dict[tuple[int, str], SharedEnv] = {}
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
        self.cond = threading.Condition(self.lock)  # a read block ended
        self.closing = False
        self.quiet = False  # no transaction was alive when this process forked
        self.slots: dict[int, _Slot] = {}
        self.users = 0
        self.unsynced = False  # this process committed without fsync: sync at close

    @classmethod
    def acquire(cls, path: Path, options: StoreOptions) -> SharedEnv:
        """This process's environment for ``path``, opened now if it is not open here."""
        key = (os.getpid(), os.path.realpath(path))
        check_cache_files(path)  # (also when open here: a file replaced since)
        with cls._registry_lock:
            sh = cls._registry.get(key)
            if sh is None or sh.env is None:
                env, handles = open_environment(path, options)
                sh = cls(path, env, handles, options.readonly, options.max_readers)
                cls._registry[key] = sh
            elif sh.readonly and not options.readonly:
                raise CacheError(
                    f"{path}: already open read-only in this process; open the read-write "
                    "store first or close the read-only one"
                )
            sh.users += 1
            return sh

    @classmethod
    def open_here(cls, path: Path) -> bool:
        """Whether this process has the environment of ``path`` open."""
        sh = cls._registry.get((os.getpid(), os.path.realpath(path)))
        return sh is not None and sh.env is not None

    def release(self) -> None:
        with self._registry_lock:
            self.users -= 1
            last = self.users <= 0
        if last:  # (outside the registry lock: closing waits for read blocks to end)
            self.close()

    def drain(self, why: str) -> bool:
        """Wait (lock held) until no other thread is inside a read block, then end every
        read transaction; False when that cannot be done (this thread is inside one, or
        another stays inside one too long), and then nothing is ended."""
        me = threading.get_ident()
        mine = self.slots.get(me)
        if mine is not None and mine.borrowed:
            log.warning("%s: %s inside a read block of this thread: its environment is not "
                        "handed on", self.path, why)
            return False
        busy = lambda: any(s.borrowed for t, s in self.slots.items() if t != me)  # noqa: E731
        if busy() and not self.cond.wait_for(lambda: not busy(), _DRAIN_S):
            log.warning("%s: %s: a read block of another thread stayed open for %.0f s",
                        self.path, why, _DRAIN_S)
            return False
        for slot in self.slots.values():
            slot.txn.abort()
        self.slots = {}
        return True

    def close(self) -> None:
        with self.lock:
            if self.env is None:
                return
            # NOTE: closing unmaps the file: a thread still copying from a view would crash.
            # New blocks are refused (CacheClosedError) while the ones in flight end.
            self.closing = True
            try:
                if not self.drain("close"):
                    raise CacheError(f"{self.path}: cannot close while a read block is open")
            finally:
                self.closing = False
            if self.unsynced:
                self.env.sync(True)
            self.env.close()
            self.env = None
            mapadvice.closed(self.path)
        with self._registry_lock:
            key = (self.pid, os.path.realpath(self.path))
            if self._registry.get(key) is self:
                del self._registry[key]

    def acquire_slot(self) -> _Slot:
        tid = threading.get_ident()
        with self.lock:
            if self.env is None or self.closing:
                raise CacheClosedError(f"{self.path}: the environment was closed")
            slot = self.slots.get(tid)
            if slot is None:
                slot = _Slot(self._begin_read())
                self.slots[tid] = slot
            slot.borrowed += 1
            return slot

    def drop_slot(self, tid: int) -> None:
        with self.lock:
            slot = self.slots.get(tid)
            if slot is not None and slot.borrowed == 0:
                slot.txn.abort()
                del self.slots[tid]

    def end_block(self, slot: _Slot) -> None:
        """A read block ended. The thread's last one ends its transaction: an idle reader
        (a worker between epochs) holding a snapshot would keep every page freed after it
        from being reused, and the file would grow by each rebuild."""
        with self.lock:
            slot.borrowed -= 1
            if slot.borrowed == 0:
                tid = threading.get_ident()
                if self.slots.get(tid) is slot:
                    del self.slots[tid]
                    slot.txn.abort()
                self.cond.notify_all()
        encode_buffer.drop_if_idle(time.monotonic())  # (a reader that no longer writes)

    def _begin_read(self) -> lmdb.Transaction:
        assert self.env is not None
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.adopt_map_size()
            return self.env.begin(buffers=True)
        except lmdb.ReadersFullError:
            raise readers_full(self.path, self.max_readers) from None

    def _release_idle_slots(self) -> None:
        # NOTE: resizing the map unmaps it: no view of this process may be in use then.
        if not self.drain("resizing the map"):
            raise CacheError(
                f"{self.path}: the map must be resized while a read block is open in this "
                "process; leave `with store.reader()` blocks before writing"
            )

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

    def facts(self) -> dict[str, Any]:
        """The map's size and use, the reader slots, the engine's version."""
        assert self.env is not None
        info, stat = self.env.info(), self.env.stat()
        return {
            "map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "readers": info["num_readers"], "max_readers": info["max_readers"],
            "engine": ".".join(map(str, self.env.lib_version())),
        }

    def copy(self, dest: Path, dir_mode: int, *, drop_free_pages: bool) -> Path:
        """A consistent hot copy into the empty directory ``dest`` (made when missing);
        with ``drop_free_pages`` the live pages only (LMDB's compacting copy)."""
        assert self.env is not None
        dest.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        if (dest / "data.mdb").exists():
            raise CacheError(f"{dest}: already holds a cache; choose an empty directory")
        self.env.copy(str(dest), compact=drop_free_pages)
        return dest

    def write(self, body: Callable[[lmdb.Transaction], None], counters: Counters, path: Path,
              *, sync: bool) -> None:
        """Run ``body`` in one write transaction, saving ``counters`` with it (given back if
        it fails) and, without ``sync``, marking the header unsynced once; a full map is
        grown (or another process's growth adopted) and the write retried. LMDB errors
        become :class:`CacheError` naming ``path``."""
        env = self.env
        assert env is not None
        for _ in range(MAX_GROWS):
            # NOTE: the counters' lock is held only to take or give back the counters: a
            # write that grows the map waits for other threads' read blocks to end, and
            # those count their hits (under that lock) before they can end.
            with self.lock:
                pending = counters.take()
                try:
                    marking = not sync and not self.unsynced
                    txn = env.begin(write=True)
                    try:
                        body(txn)
                        if pending:
                            merge_counters(txn, self.handles["stats"], pending)
                        if marking:
                            mark_unsynced(txn, self.handles["meta"], path)
                    except BaseException:
                        txn.abort()  # (explicitly: a failed write must not keep the lock)
                        raise
                    txn.commit()
                    self.unsynced = self.unsynced or marking
                    return
                except lmdb.MapFullError:
                    counters.give_back(pending)
                    self.grow()
                except lmdb.MapResizedError:
                    counters.give_back(pending)
                    self.adopt_map_size()
                except BaseException as exc:
                    counters.give_back(pending)
                    if not isinstance(exc, lmdb.Error):
                        raise
                    if is_disk_full(exc, path):
                        raise CacheFullError(
                            f"{path}: the disk is full; nothing of this write was kept, "
                            f"the cache is intact ({exc})"
                        ) from None
                    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError,
                                        lmdb.BadTxnError)):
                        # A damaged tree (BadTxn follows a first such error): a refusal that
                        # `clear --all` recognises, and a fresh read snapshot next time.
                        self.drop_slot(threading.get_ident())
                        raise CacheFormatError(
                            f"{path}: write failed, the cache file is damaged ({exc}); "
                            "clear it with `diskcache-ocr clear --all`"
                        ) from None
                    raise CacheError(f"{path}: write failed ({exc})") from None
        raise CacheFullError(f"{path}: the map could not grow enough for this write")


__all__ = ["CACHE_FILES", "DEFAULT_MAP_SIZE", "MOUNTINFO", "NETWORK_FILESYSTEMS", "SharedEnv",
           "StoreOptions", "check_cache_files", "directory_lock", "network_filesystem",
           "open_environment", "release_directory_lock"]
