"""Deleting a whole cache: its files, so the disk space comes back.

Only a directory that is a diskcache-ocr cache (``data.mdb`` + ``lock.mdb`` with our header), a
damaged one of ours, or an empty directory is touched; anything else is refused with nothing
removed. The files go while this process holds LMDB's writer lock, so no write is in flight,
and only when no other process is reading: a reader keeps the deleted file mapped, and a
writer starting after the delete would begin a second cache beside it.

NOTE: "reading" means holding a read transaction. A process that has the environment open
between reads (a DataLoader worker between batches) holds none and is not seen: the files go
under it, and what it writes afterwards lands in the deleted files (lost, never mixed into a
new cache, whose open takes the directory lock; see ``env.directory_lock``). Stop readers
before a clear.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from diskcache_ocr.errors import CacheError
from diskcache_ocr.schema import KINDS
from diskcache_ocr.store.env import (
    _GONE,
    _open_stores,
    check_cache_files,
    directory_lock,
    release_directory_lock,
)
from diskcache_ocr.store.header import _DBS, HEADER_KEY

CACHE_FILES = ("data.mdb", "lock.mdb")
# Folders of plain files derived from the sources and kept beside the records (the
# annotation index): rebuilt when missing, so removed with the cache.
DERIVED_DIRS = ("annotations",)
# How long to wait for a writer (a prebuild, a watch service, a dataset filling misses) to
# finish its transaction before giving up with nothing removed.
WRITER_WAIT_S = 5.0  # a writer that holds on longer is a build or a service, not a commit
_CHILD_START_S = 30.0


def has_cache(cache_dir: str | os.PathLike[str]) -> bool:
    """Whether there is a cache file at ``cache_dir`` (creates nothing)."""
    return (Path(cache_dir) / "data.mdb").is_file()


def _disk_bytes(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def _attached_pids(env: lmdb.Environment, also_ignore: int | None = None) -> list[int]:
    """Processes other than this one with a reader slot in the lock file."""
    env.reader_check()  # frees the slots of dead processes first
    pids = set()
    for line in env.readers().splitlines()[1:]:
        first = line.split()[:1]
        if first and first[0].isdigit():
            pids.add(int(first[0]))
    pids.discard(os.getpid())
    pids.discard(also_ignore)
    return sorted(pids)


def _contents(env: lmdb.Environment, path: Path) -> dict[str, int]:
    """Entries per kind and in the index; CacheError when this is an LMDB file of somebody
    else's (no header of ours)."""
    with env.begin() as txn:
        named = {bytes(k) for k, _ in txn.cursor()}
        if b"meta" not in named:
            raise CacheError(f"{path}: an LMDB environment, but not a diskcache-ocr cache "
                             "(no 'meta'); nothing removed")
        try:
            meta = env.open_db(b"meta", txn=txn, create=False)
        except lmdb.IncompatibleError:  # a plain 'meta' key: a stranger's, or damage
            return {}
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


def _child() -> None:
    """Run in a child process: take LMDB's writer lock, check no reader came, delete."""
    path = Path(sys.argv[1])
    # Nobody opens the cache while its files go (see env.directory_lock): an open sees both
    # old files or both new ones, never the old lock table with a new data file.
    guard = directory_lock(path, exclusive=True)
    if guard == _GONE:
        print(json.dumps({"removed": True}), flush=True)  # removed by another clear meanwhile
        return
    try:
        env = lmdb.open(str(path), readonly=False, create=False, lock=True,
                        max_dbs=len(_DBS) + 2, max_spare_txns=0, map_size=1 << 20)
        print("opened", flush=True)
        txn = env.begin(write=True)  # waits for a writer in progress (the parent's timeout)
        try:
            readers = _attached_pids(env, also_ignore=os.getppid())
            if readers:
                print(json.dumps({"readers": readers}), flush=True)
                return
            for name in CACHE_FILES:
                (path / name).unlink(missing_ok=True)
        finally:
            txn.abort()
            env.close()
        _remove_directory(path)
        print(json.dumps({"removed": True}), flush=True)
    finally:
        release_directory_lock(guard)


def _remove_under_writer_lock(path: Path, wait_s: float) -> None:
    """Delete the two files while holding the writer lock, from a child process: one that
    still waits when the time is up is killed, and nothing of it stays in this process (a
    thread left waiting here would keep the environment open in this process)."""
    code = "from diskcache_ocr.store.wipe import _child; _child()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + _CHILD_START_S  # its imports, on a busy machine
        while "opened\n" not in lines and child.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(child.args, _CHILD_START_S)
            time.sleep(0.01)
        child.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise CacheError(f"{path}: a writer holds the cache (a prebuild, watch service or "
                         f"dataset filling misses) for over {wait_s:g}s; nothing removed"
                         ) from None
    reader.join(5)
    results = [json.loads(line) for line in lines if line.startswith("{")]
    if child.returncode != 0 or not results:
        err = (child.stderr.read() if child.stderr else "").strip().splitlines()
        raise CacheError(f"{path}: could not delete the cache ({err[-1] if err else 'exit '}"
                         f"{'' if err else child.returncode}); nothing removed")
    if "readers" in results[0]:
        pids = results[0]["readers"]
        raise CacheError(f"{path}: {len(pids)} other process(es) opened the cache (pids "
                         f"{', '.join(map(str, pids))}); nothing removed")


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
    check_cache_files(path)  # (opening it below would write through a planted symlink)
    others = sorted(p.name for p in path.iterdir()
                    if p.name not in CACHE_FILES and p.name not in DERIVED_DIRS)
    if others:
        raise CacheError(f"{path}: holds files that are not a cache's ({', '.join(others[:5])}"
                         f"{', …' if len(others) > 5 else ''}); nothing removed")
    files = [path / n for n in CACHE_FILES if (path / n).exists()] + _derived_files(path)
    result: dict[str, Any] = {"dry_run": dry_run, "removed": {},
                              "files": [str(p) for p in files],
                              "freed_bytes": sum(_disk_bytes(p) for p in files)}
    if not (path / "data.mdb").exists():
        if not dry_run:
            _remove(path, files)
        return result
    if any(s.is_open and s.path.resolve() == path.resolve() for s in list(_open_stores)):
        # A second handle on the same environment in one process would break LMDB's locks.
        raise CacheError(f"{path}: this process has the cache open (close its dataset or "
                         "store first); nothing removed")
    guard = directory_lock(path, exclusive=False)  # (see _child)
    try:
        env = lmdb.open(str(path), readonly=False, create=False, lock=True, max_dbs=len(_DBS) + 2,
                        max_spare_txns=0, map_size=1 << 20)
    except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as exc:
        # A damaged file (or one of the other LMDB engine): nobody can be using it to write.
        result["reason"] = f"the cache file is damaged or unreadable ({exc})"
        env = None
    except lmdb.Error as exc:
        raise CacheError(f"{path}: cannot open the cache ({exc}); nothing removed") from None
    finally:
        release_directory_lock(guard)
    if env is None:
        if not dry_run:
            _remove(path, files)
        return result
    try:
        try:
            result["removed"] = _contents(env, path)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
            result["reason"] = f"the cache file is damaged ({exc})"
        readers = _attached_pids(env)
    finally:
        env.close()
    if readers:
        raise CacheError(f"{path}: {len(readers)} other process(es) have the cache open "
                         f"(pids {', '.join(map(str, readers))}); stop them and run "
                         "again; nothing removed")
    if not dry_run:
        _remove_under_writer_lock(path, writer_wait_s)  # (the directory too, when empty)
    return result


def _remove(path: Path, files: list[Path]) -> None:
    guard = directory_lock(path, exclusive=True)  # (nobody opens the cache meanwhile)
    if guard == _GONE:
        return
    try:
        for p in files:
            p.unlink(missing_ok=True)
        _remove_directory(path)
    finally:
        release_directory_lock(guard)


def _derived_files(path: Path) -> list[Path]:
    """The files of the derived folders; anything there but plain files is refused."""
    found = []
    for name in DERIVED_DIRS:
        folder = path / name
        try:
            if not folder.is_dir() or folder.is_symlink():
                if folder.exists() or folder.is_symlink():
                    raise CacheError(f"{folder}: not a folder; nothing removed")
                continue
            for entry in sorted(folder.iterdir()):
                if entry.is_symlink() or not entry.is_file():
                    raise CacheError(f"{folder}: holds {entry.name}, not a plain file; "
                                     "nothing removed")
                found.append(entry)
        except OSError as exc:
            raise CacheError(f"{folder}: cannot list it ({exc.strerror}); nothing removed"
                             ) from None
    return found


def _remove_directory(path: Path) -> None:
    """Remove the emptied cache directory (under its exclusive lock: an open that waited
    for the lock finds it gone and makes it again), and its derived folders first."""
    for name in DERIVED_DIRS:
        folder = path / name
        try:
            if folder.is_dir() and not folder.is_symlink():
                for entry in folder.iterdir():
                    if entry.is_file() and not entry.is_symlink():
                        entry.unlink(missing_ok=True)
                folder.rmdir()
        except OSError:  # (left as it is: the directory below stays too)
            pass
    try:
        path.rmdir()
    except OSError:  # not empty after all (a file appeared): leave the directory
        pass
