"""Deleting a whole cache: its files, so the disk space comes back.

Only a directory that is a diskcache-ocr cache (``data.mdb`` + ``lock.mdb`` with our header), a
damaged one of ours, or an empty directory is touched; anything else is refused with nothing
removed. The files go while this process holds LMDB's writer lock, so no write is in flight,
and only when no other process has the cache open for reading: a reader keeps the deleted file
mapped, and a writer starting after the delete would begin a second cache beside it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from diskcache_ocr.errors import CacheError
from diskcache_ocr.store import _DBS, HEADER_KEY, KINDS

CACHE_FILES = ("data.mdb", "lock.mdb")
# How long to wait for a writer (a prebuild, a watch service, a dataset filling misses) to
# finish its transaction before giving up with nothing removed.
WRITER_WAIT_S = 2.0


def has_cache(cache_dir: str | os.PathLike[str]) -> bool:
    """Whether there is a cache file at ``cache_dir`` (creates nothing)."""
    return (Path(cache_dir) / "data.mdb").is_file()


def _disk_bytes(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def _attached_pids(env: lmdb.Environment) -> list[int]:
    """Processes other than this one with a reader slot in the lock file."""
    env.reader_check()  # frees the slots of dead processes first
    pids = set()
    for line in env.readers().splitlines()[1:]:
        first = line.split()[:1]
        if first and first[0].isdigit():
            pids.add(int(first[0]))
    pids.discard(os.getpid())
    return sorted(pids)


def _contents(env: lmdb.Environment, path: Path) -> dict[str, int]:
    """Entries per kind and in the index; CacheError when this is an LMDB file of somebody
    else's (no header of ours)."""
    with env.begin() as txn:
        named = {bytes(k) for k, _ in txn.cursor()}
        if b"meta" not in named:
            raise CacheError(f"{path}: an LMDB environment, but not a diskcache-ocr cache "
                             "(no 'meta'); nothing removed")
        meta = env.open_db(b"meta", txn=txn, create=False)
        raw = txn.get(HEADER_KEY, db=meta)
        try:
            header = msgpack.unpackb(bytes(raw), raw=False) if raw is not None else None
        except Exception:  # a damaged header: still our file, as the 'meta' db says
            header = {}
        if header is not None and not isinstance(header, dict):
            raise CacheError(f"{path}: the 'meta' header is not ours; nothing removed")
        counts = {}
        for name in (*KINDS, "index"):
            if name.encode() in named:
                counts[name] = txn.stat(env.open_db(name.encode(), txn=txn, create=False))[
                    "entries"]
            else:
                counts[name] = 0
    return counts


def _hold_writer(env: lmdb.Environment, wait_s: float) -> lmdb.Transaction | None:
    """A write transaction (LMDB's writer lock), or None when another writer keeps it past
    ``wait_s``; an abandoned attempt aborts its transaction as soon as it gets one."""
    got: dict[str, Any] = {}
    ready = threading.Event()
    lock = threading.Lock()

    def take() -> None:
        txn = env.begin(write=True)
        with lock:
            if got.get("abandoned"):
                txn.abort()
                env.close()
                return
            got["txn"] = txn
        ready.set()

    threading.Thread(target=take, name="diskcache-ocr-wipe", daemon=True).start()
    ready.wait(wait_s)
    with lock:
        if "txn" in got:
            return got["txn"]
        got["abandoned"] = True
    return None


def wipe(cache_dir: str | os.PathLike[str], *, dry_run: bool = False,
         writer_wait_s: float = WRITER_WAIT_S) -> dict[str, Any]:
    """Delete the cache at ``cache_dir``: its two files, then the directory if it is empty.

    Returns ``{"dry_run", "removed": {kind: entries, "index": n}, "files": [...],
    "freed_bytes": n}``; for a damaged cache ``removed`` is ``{}`` and ``reason`` says why.
    A missing directory is nothing to do. Raises CacheError, with nothing removed, for a
    directory holding other files, an LMDB file that is not ours, attached readers, or a
    writer that does not finish within ``writer_wait_s``.
    """
    path = Path(cache_dir)
    if not path.exists():
        return {"dry_run": dry_run, "removed": {}, "files": [], "freed_bytes": 0}
    if not path.is_dir():
        raise CacheError(f"{path}: not a directory; nothing removed")
    others = sorted(p.name for p in path.iterdir() if p.name not in CACHE_FILES)
    if others:
        raise CacheError(f"{path}: holds files that are not a cache's ({', '.join(others[:5])}"
                         f"{', …' if len(others) > 5 else ''}); nothing removed")
    files = [path / n for n in CACHE_FILES if (path / n).exists()]
    result: dict[str, Any] = {"dry_run": dry_run, "removed": {},
                              "files": [str(p) for p in files],
                              "freed_bytes": sum(_disk_bytes(p) for p in files)}
    if not (path / "data.mdb").exists():
        if not dry_run:
            _remove(path, files)
        return result
    try:
        env = lmdb.open(str(path), readonly=False, create=False, lock=True, max_dbs=len(_DBS) + 2,
                        max_spare_txns=0, map_size=1 << 20)
    except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as exc:
        # A damaged file (or one of the other LMDB engine): nobody can be using it to write.
        result["reason"] = f"the cache file is damaged or unreadable ({exc})"
        if not dry_run:
            _remove(path, files)
        return result
    except lmdb.Error as exc:
        raise CacheError(f"{path}: cannot open the cache ({exc}); nothing removed") from None
    keep_env = False
    try:
        try:
            result["removed"] = _contents(env, path)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
            result["reason"] = f"the cache file is damaged ({exc})"
        readers = _attached_pids(env)
        if readers:
            raise CacheError(f"{path}: {len(readers)} other process(es) have the cache open "
                             f"(pids {', '.join(map(str, readers))}); stop them and run "
                             "again; nothing removed")
        if dry_run:
            return result
        txn = _hold_writer(env, writer_wait_s)
        if txn is None:
            keep_env = True  # the waiting thread closes it once it gets the lock
            raise CacheError(f"{path}: a writer holds the cache (a prebuild, watch service or "
                             f"dataset filling misses) for over {writer_wait_s:g}s; nothing "
                             "removed")
        try:
            readers = _attached_pids(env)  # anyone who opened it while we waited
            if readers:
                raise CacheError(f"{path}: {len(readers)} other process(es) opened the cache "
                                 f"(pids {', '.join(map(str, readers))}); nothing removed")
            _remove(path, files)
        finally:
            txn.abort()
    finally:
        if not keep_env:
            env.close()
    return result


def _remove(path: Path, files: list[Path]) -> None:
    for p in files:
        p.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:  # not empty after all (a file appeared): leave the directory
        pass
