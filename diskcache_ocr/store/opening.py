"""Opening an LMDB environment as a cache: the options, the directory and lock file made
first, the refusals (a network file system to write, a truncated or foreign file, a newer
format), and the sub-databases opened and the header checked.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from diskcache_ocr.errors import CacheError, CacheFormatError, CacheFullError
from diskcache_ocr.store import mapadvice
from diskcache_ocr.store.files import (
    DIRECTORY_GONE,
    check_cache_files,
    directory_lock,
    network_filesystem,
    release_directory_lock,
)
from diskcache_ocr.store.header import HEADER_KEY, SUB_DATABASES, check_header, check_not_newer

log = logging.getLogger("diskcache_ocr.store")

# A large sparse reservation makes growth (and its cross-process resize dance) rare.
DEFAULT_MAP_SIZE = 16 << 30

# How often a write (or an open) retries after growing or adopting the map.
MAX_GROWS = 32

# Free space below which an I/O error from a write is taken for a full disk.
_NEARLY_FULL = 1 << 20

# How often an open tries again when the directory was removed while it waited for the
# directory's lock (a concurrent ``clear --all``; see ``files.directory_lock``).
_OPEN_TRIES = 20


@dataclass(frozen=True)
class StoreOptions:
    """How a store opens its environment (validated here; pickled with the store)."""

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


def is_disk_full(exc: lmdb.Error, path: Path) -> bool:
    """Whether a failed write means the disk (or quota) under ``path`` is full."""
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


def readers_full(path: Path, max_readers: int) -> CacheError:
    """Every reader slot of the lock table is taken."""
    return CacheError(
        f"{path}: all {max_readers} reader slots are taken; run `diskcache-ocr health` to free "
        "slots of dead processes, or raise max_readers"
    )

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
            readahead=opts.readahead, max_readers=opts.max_readers, max_dbs=len(SUB_DATABASES) + 2,
            max_spare_txns=0, lock=lock, sync=opts.sync, metasync=opts.sync,
            mode=0o600 if opts.dir_mode == 0o700 else 0o644,
        )
    except lmdb.ReadersFullError:
        raise readers_full(path, opts.max_readers) from None
    except lmdb.InvalidError as exc:
        raise CacheFormatError(f"{path}/data.mdb is not an LMDB file ({exc})") from None
    except lmdb.VersionMismatchError as exc:
        raise CacheFormatError(f"{path}: written by another LMDB engine ({exc})") from None
    except lmdb.Error as exc:
        raise CacheError(f"{path}: cannot open the cache ({exc})") from None

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
        if guard == DIRECTORY_GONE:
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
        for attempt in range(MAX_GROWS):
            try:
                _check_complete(env, path)
                handles = _open_dbs(env, path, opts.readonly)
                check_header(env, handles, path, opts.readonly)
                break
            except lmdb.MapResizedError:
                # Another process grew the map while this one was opening: adopt its
                # size (no transaction is open here) and try again.
                if attempt == MAX_GROWS - 1:
                    raise
                env.set_mapsize(0)
    except BaseException as exc:
        env.close()
        if isinstance(exc, lmdb.ReadersFullError):
            raise readers_full(path, opts.max_readers) from None
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
        missing = [n for n in SUB_DATABASES if n.encode() not in named]
        if missing:
            raise CacheFormatError(
                f"{path}: incomplete cache, missing sub-databases {missing}"
            )
        # NOTE: a handle opened inside an explicit read-only transaction is not usable
        # afterwards; let the binding open each one on its own.
        return {n: env.open_db(n.encode(), create=False) for n in SUB_DATABASES}
    txn = env.begin(write=True)
    try:
        handles = {n: env.open_db(n.encode(), txn=txn) for n in SUB_DATABASES}
    except BaseException:
        # NOTE: explicitly: a failed open (a plain 'meta' key) must not leave the writer
        # lock held by this process.
        txn.abort()
        raise
    txn.commit()
    return handles


__all__ = ["DEFAULT_MAP_SIZE", "MAX_GROWS", "StoreOptions", "is_disk_full", "open_environment",
           "readers_full"]
