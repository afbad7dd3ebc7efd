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

import errno
import logging
import os
import stat
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from diskcache_ocr.errors import (
    CacheClosedError,
    CacheError,
    CacheFormatError,
    CacheFullError,
)
from diskcache_ocr.store import mapadvice
from diskcache_ocr.store.header import _DBS, HEADER_KEY, check_header, check_not_newer
from diskcache_ocr.store.protocol import StoreHandle
from diskcache_ocr.store.txn import _scratch

log = logging.getLogger("diskcache_ocr.store")

# A large sparse reservation makes growth (and its cross-process resize dance) rare.
DEFAULT_MAP_SIZE = 16 << 30


_MAX_GROWS = 32


# Free space below which an I/O error from a write is taken for a full disk.
_NEARLY_FULL = 1 << 20


# How long a fork or a close waits for other threads' read blocks to end. A block is one
# batch's lookup; only a block left open on purpose (an unfinished iter_raw) lasts longer.
_DRAIN_S = 60.0


_open_stores: weakref.WeakSet[StoreHandle] = weakref.WeakSet()


_forking: list[_SharedEnv] = []  # environments held quiet across this process's fork


def _before_fork() -> None:
    for store in list(_open_stores):
        try:
            store.flush_stats()  # (the child starts with no counters of its own)
        except CacheError as exc:
            log.warning("%s: counters not saved before a fork: %s", store.path, exc)
    _SharedEnv._registry_lock.acquire()
    for shared in list(_SharedEnv._registry.values()):
        if shared.pid == os.getpid() and shared.env is not None:
            shared.lock.acquire()
            shared.quiet = shared.drain("fork")
            _forking.append(shared)


def _after_fork_in_parent() -> None:
    for shared in _forking:
        shared.lock.release()
    _forking.clear()
    _SharedEnv._registry_lock.release()


def _after_fork_in_child() -> None:
    _SharedEnv._registry_lock = threading.Lock()
    _SharedEnv._registry = {}
    for shared in _forking:
        env, shared.env, shared.slots = shared.env, None, {}
        shared.lock = threading.RLock()
        shared.cond = threading.Condition(shared.lock)
        if env is not None and shared.quiet:
            env.close()  # no transaction is left: this only forgets the parent's open
        elif env is not None:
            _inherited.append(env)  # never closed here (see drain)
    _forking.clear()
    for store in list(_open_stores):
        store._forget_after_fork()


_inherited: list[lmdb.Environment] = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


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


class _Slot:
    """A thread's read transaction and how many (nested) blocks borrow it; it ends with the
    last of them (see ``end_block``)."""

    __slots__ = ("txn", "borrowed")

    def __init__(self, txn: lmdb.Transaction) -> None:
        self.txn = txn
        self.borrowed = 0


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
        self.cond = threading.Condition(self.lock)  # a read block ended
        self.closing = False
        self.quiet = False  # no transaction was alive when this process forked
        self.slots: dict[int, _Slot] = {}
        self.users = 0
        self.unsynced = False  # this process committed without fsync: sync at close

    @classmethod
    def acquire(cls, store: StoreHandle) -> _SharedEnv:
        key = (os.getpid(), os.path.realpath(store.path))
        check_cache_files(store.path)  # (also when open here: a file replaced since)
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
        _scratch.drop_if_idle(time.monotonic())  # (a reader that no longer writes)

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



CACHE_FILES = ("data.mdb", "lock.mdb")


def check_cache_files(path: Path) -> None:
    """Refuse a cache directory whose files are symlinks or not regular files.

    NOTE: LMDB follows a symlink: a planted ``lock.mdb`` -> somebody's file would have its
    lock table written into that file, a ``data.mdb`` -> elsewhere the whole cache.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheError(f"{path}: cannot use the cache directory ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path}: the cache path exists and is not a directory")
    for name in CACHE_FILES:
        try:
            mode = os.lstat(path / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CacheError(f"{path / name}: cannot check the cache file ({exc.strerror})"
                             ) from None
        if not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise CacheError(f"{path / name}: the cache file is {kind}; refused (LMDB would "
                             "write through it). Remove that entry itself, not what it "
                             "points to")


def _lock_table_bytes(max_readers: int) -> int:
    # LMDB 0.9's lock file: a two-cache-line header and one cache line per reader slot.
    return 192 + 64 * (max_readers - 1)


def _reserve_lock_file(path: Path, opts: StoreOptions) -> None:
    """Give the lock file its pages before LMDB maps it.

    NOTE: LMDB sizes the lock file with ftruncate and writes its table through the map; on
    a full tmpfs a page that cannot be backed is a SIGBUS on that write. Allocating first
    turns that into ENOSPC here.
    """
    lockfile = path / "lock.mdb"
    created = not lockfile.exists()
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lockfile, flags, 0o600 if opts.dir_mode == 0o700 else 0o644)
    except OSError:
        return  # not writable by this user: LMDB's own open says what is wrong
    try:
        os.posix_fallocate(fd, 0, _lock_table_bytes(opts.max_readers))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            if created:
                lockfile.unlink(missing_ok=True)  # (leave nothing behind)
            raise CacheFullError(f"{path}: the disk is full; the cache cannot be opened "
                                 f"(its lock file needs room: {exc.strerror})") from None
        # (EOPNOTSUPP and the like: a file system without it allocates on write)
    finally:
        os.close(fd)


def _make_directory(path: Path, opts: StoreOptions) -> None:
    try:
        path.mkdir(mode=opts.dir_mode, parents=True, exist_ok=True)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise CacheError(
            f"{path}: cannot create the cache directory{where}: {exc.strerror}; choose a "
            "cache directory on a writable file system where this user may create it, "
            "or create it first with write permission for this user (a cache built "
            "elsewhere can be opened read-only)") from None
    check_cache_files(path)  # (planted between the check and the mkdir)


# NOTE: LMDB opens ``lock.mdb`` first, then ``data.mdb``, and trusts the lock table's last
# transaction id to pick the data file's meta page. ``clear --all`` deletes both files: an
# open between the two deletions would pair the old lock table with a new data file, and a
# later one the new table with that file: two writers without a common lock on one file
# (records torn, and readers picking the wrong meta page). So opening holds the directory's
# lock shared, and the clear holds it exclusively while it deletes (``wipe``): an open sees
# both old files or both new ones.
_OPEN_TRIES = 20
_GONE = -2  # directory_lock: the directory was replaced or removed while it waited


def directory_lock(path: Path, *, exclusive: bool) -> int | None:
    """Lock the cache directory (``flock``, shared to open, exclusive to delete the cache);
    returns the descriptor to release, ``_GONE`` when the directory was removed or replaced
    while it waited, or None where it cannot be locked (missing, unreadable, unsupported)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        st, now = os.fstat(fd), os.stat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            os.close(fd)
            return _GONE
    except FileNotFoundError:
        os.close(fd)
        return _GONE
    except OSError:  # no flock on this file system: as before
        os.close(fd)
        return None
    return fd


def release_directory_lock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def _open_lmdb(path: Path, opts: StoreOptions) -> lmdb.Environment:
    lock = opts.lock
    if lock and (not opts.readonly or _lock_writable(path)):
        _reserve_lock_file(path, opts)
    if opts.readonly and lock and not _lock_writable(path):
        # LMDB cannot register a reader in a lock file it may not write (a cache shared
        # read-only by another user): read without one, as read-only LMDB datasets do.
        log.warning("%s: lock.mdb is not writable by this user; reading without a lock, "
                    "which is safe only while no process writes this cache", path)
        lock = False
    try:
        return lmdb.open(
            str(path), map_size=opts.map_size, readonly=opts.readonly,
            readahead=opts.readahead, max_readers=opts.max_readers, max_dbs=len(_DBS) + 2,
            max_spare_txns=0, lock=lock, sync=opts.sync, metasync=opts.sync,
            mode=0o600 if opts.dir_mode == 0o700 else 0o644,
        )
    except lmdb.ReadersFullError:
        raise _readers_full(path, opts.max_readers) from None
    except lmdb.InvalidError as exc:
        raise CacheFormatError(f"{path}/data.mdb is not an LMDB file ({exc})") from None
    except lmdb.VersionMismatchError as exc:
        raise CacheFormatError(f"{path}: written by another LMDB engine ({exc})") from None
    except lmdb.Error as exc:
        raise CacheError(f"{path}: cannot open the cache ({exc})") from None


# Network and cluster file systems, by the type the kernel's mount table gives them. LMDB
# must not be written on one: its lock table is a shared memory map, coherent only among the
# processes of one machine, and its data file is written through a memory map too.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "gpfs",
    "beegfs", "9p", "afs", "ncpfs", "coda", "panfs", "pvfs2", "orangefs", "ocfs2", "gfs2",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.ceph-fuse", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "fuse.beegfs", "fuse.lustre",
})


MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    # (the mount table writes a space, tab, newline and backslash in a path as \ooo octal)
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def network_filesystem(path: str | os.PathLike[str]) -> str | None:
    """The type of the network file system ``path`` (resolved) lies on, from the mount
    table (the mount nearest to it), or None on a local one or where the table cannot be
    read."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return None
    where = os.path.realpath(path)
    best, fstype = "", ""
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        if not sep or len(fields) < 5 or not tail:
            continue
        mount = _unescape(fields[4])
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        # (the longest mount point holds the path; of two at one point the later, on top)
        if inside and len(mount) >= len(best):
            best, fstype = mount, tail.split(" ")[0]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def _refuse_network_write(path: Path, fstype: str) -> CacheError:
    return CacheError(
        f"{path}: on a network file system ({fstype}); a cache is never written there (LMDB's "
        "locks and memory-mapped writes are not coherent between machines). Open it "
        "read-only (readonly=True: reads take no lock, misses are computed and not "
        "written), or build on a node-local disk (`diskcache-ocr prebuild --cache "
        "/local/disk/cache`, under torchrun on every node) and publish a read-only snapshot "
        f"here with `diskcache-ocr copy --cache /local/disk/cache --dest {path}`")


def open_environment(path: Path, opts: StoreOptions) -> tuple[lmdb.Environment, dict[str, Any]]:
    """Open (creating when writable) the environment at ``path``, check it is a complete
    cache of this format, and open its sub-databases. On a network file system a cache is
    only read, without a lock (a snapshot nobody writes); opening it to write is refused."""
    check_cache_files(path)
    remote = network_filesystem(path)
    if remote and not opts.readonly:
        raise _refuse_network_write(path, remote)
    if remote:
        opts = replace(opts, lock=False)
    for _ in range(_OPEN_TRIES):
        if not opts.readonly:
            _make_directory(path, opts)
        elif not (path / "data.mdb").exists():
            raise CacheError(f"{path}: no cache here (no data.mdb) to open read-only")
        guard = None if remote else directory_lock(path, exclusive=False)
        if guard == _GONE:
            continue  # (cleared and removed meanwhile: made again, or refused, above)
        try:
            env = _open_lmdb(path, opts)
            mapadvice.opened(path, opts.readahead)  # (before the first page is touched)
        finally:
            release_directory_lock(guard)
        break
    else:
        raise CacheError(f"{path}: the cache directory keeps disappearing while it is opened")
    try:
        for attempt in range(_MAX_GROWS):
            try:
                _check_complete(env, path)
                handles = _open_dbs(env, path, opts.readonly)
                check_header(env, handles, path, opts.readonly)
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
            raise _readers_full(path, opts.max_readers) from None
        if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError)):
            raise CacheFormatError(f"{path}: the cache file is damaged ({exc})") from None
        if isinstance(exc, lmdb.IncompatibleError):
            raise CacheFormatError(
                f"{path}: an LMDB environment, but not a diskcache-ocr cache ({exc}); clear "
                "it with `diskcache-ocr clear --all`") from None
        if isinstance(exc, lmdb.Error):
            raise CacheError(f"{path}: cannot open the cache ({exc})") from None
        raise
    return env, handles


def _refuse_newer(env: lmdb.Environment, txn: lmdb.Transaction, path: Path) -> None:
    """A cache of a newer format is refused before anything else is judged: it may have
    other sub-databases or header fields, which are not damage."""
    try:
        raw = txn.get(HEADER_KEY, db=env.open_db(b"meta", txn=txn, create=False))
        header = msgpack.unpackb(bytes(raw), raw=False) if raw is not None else None
    except Exception:  # noqa: BLE001 - not ours or damaged: the checks that follow say which
        return
    if isinstance(header, dict):
        check_not_newer(header, path)


def _open_dbs(env: lmdb.Environment, path: Path, readonly: bool) -> dict[str, Any]:
    with env.begin() as txn:
        named = {bytes(k) for k, _ in txn.cursor()}
        if b"meta" in named:
            _refuse_newer(env, txn, path)
    del txn  # a finished read transaction keeps its reader slot until it is freed
    if named and b"meta" not in named:
        raise CacheFormatError(
            f"{path}: an LMDB environment, but not a diskcache-ocr cache (no 'meta')"
        )
    if readonly:
        missing = [n for n in _DBS if n.encode() not in named]
        if missing:
            raise CacheFormatError(
                f"{path}: incomplete cache, missing sub-databases {missing}"
            )
        # NOTE: a handle opened inside an explicit read-only transaction is not usable
        # afterwards; let the binding open each one on its own.
        return {n: env.open_db(n.encode(), create=False) for n in _DBS}
    txn = env.begin(write=True)
    try:
        handles = {n: env.open_db(n.encode(), txn=txn) for n in _DBS}
    except BaseException:
        # NOTE: explicitly: a failed open (a plain 'meta' key) must not leave the writer
        # lock held by this process.
        txn.abort()
        raise
    txn.commit()
    return handles
