"""Shared by the tests: the command line (in process, or the console script), a small
prebuilt cache and private copies of it, a cache's whole content, comparable between two
caches, and a dataset wrapper that seeds the global generators per index."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
from torch.utils.data import Dataset

from diskcache_ocr import cli
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.store import KINDS, CacheStore
from diskcache_ocr.synth import split_paths, synthesize


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Write a file's dirty pages, then ask the kernel to drop its pages from the page cache
    (a cold read follows; pages mapped by live processes stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def command() -> list[str]:
    """The console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("diskcache-ocr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diskcache_ocr.cli"]


def run_together(*argvs: list[str], timeout: float = 120,
                 **options) -> list[subprocess.CompletedProcess]:
    """Each command as ``subprocess.run(argv, capture_output=True, text=True, **options)``
    returns it, all started at once: fresh interpreters that import the library overlap their
    imports."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              **options) for argv in argvs]
    done = []
    try:
        for argv, proc in zip(argvs, procs):
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """``diskcache-ocr ARGV`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def build_small(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """(dataset root, cache): ``n`` small synthetic pages under ``root/data``, prebuilt into
    ``root/cache``."""
    data = root / "data"
    synthesize(data, n, seed=seed, min_words=3, max_words=10, size=(240, 320))
    prebuild(*split_paths(data), root / "cache", workers=1, progress=False)
    return data, root / "cache"


def private_copy(data: Path, cache: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of a dataset and of its cache under ``dest``, the copy's index as a build of
    the copied dataset would have written it.

    The index knows a source by its path and its file's stat (inode and ctime included), so
    the copied entries are moved to the copied paths and stats. Records are keyed by content
    and need no change.
    """
    shutil.copytree(data, dest / "data")
    shutil.copytree(cache, dest / "cache")
    rebase_index(dest / "cache", data, dest / "data")
    return dest / "data", dest / "cache"


def rebase_index(cache: Path, old_root: Path, new_root: Path) -> None:
    """Move a cache's index entries from the sources under ``old_root`` to their copies
    (stat-identical but for inode and ctime) under ``new_root``, as a build there would
    have written them."""
    old, new = os.path.realpath(old_root), os.path.realpath(new_root)
    with CacheStore(cache) as store:
        entries = list(store.iter_index())
        header = store.header()
        with store.writer() as batch:
            for source, entry in entries:
                batch.delete_index(source)
                moved = new + source[len(old):]
                st = os.stat(moved)
                batch.put_index(moved, replace(entry, ino=st.st_ino, ctime_ns=st.st_ctime_ns))
        root = header.get("dataset_root")
        if root and os.path.realpath(root).startswith(old):
            store.update_header(dataset_root=new + os.path.realpath(root)[len(old):])


def snapshot(cache: Path) -> dict:
    """Every record (kind -> key -> digest of the raw value) and every index entry without
    its timestamp."""
    out: dict = {}
    with CacheStore(cache, readonly=True) as store:
        for kind in KINDS:
            records = {}
            for key in store.keys(kind):
                with store.reader() as r:
                    records[key] = hashlib.sha256(bytes(r.get_raw(kind, key))).hexdigest()
            out[kind] = records
        out["index"] = {
            source: (e.size, e.mtime_ns, e.content_hash, e.status, dict(e.keys))
            for source, e in store.iter_index()
        }
    return out


class Seeded(Dataset):
    """Seeds the global generators per index, so a random transform's draws do not depend on
    which worker serves which sample."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        random.seed(i)
        np.random.seed(i)
        return self.ds[i]


def load_script(path: Path, name: str) -> ModuleType:
    """A script that is not part of any package (under ``scripts/``), imported by its path
    as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
