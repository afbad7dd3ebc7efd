"""Permissions: a cache another user built, read-only to the reader, works read-only; a
cache directory is created owner-only (0o700, files 0o600) unless configured otherwise."""

from __future__ import annotations

import json
import os
import pwd
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from relhelp import Child, sample_digest

import diskcache_ocr


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to drop privileges to")
    if os.geteuid() != 0:
        pytest.skip("needs root to build as one user and read as another")
    return entry.pw_uid, entry.pw_gid


def read_as(uid: int, gid: int, images: str, annotations: str, cache: str, out: str) -> int:
    """Child: drop to another user, then read the cache read-only and try to write it."""
    # Warm up as root: the interpreter's own (lazily imported) files are root's alone here.
    import importlib.readers  # noqa: F401

    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.errors import CacheError
    from diskcache_ocr.store import CacheStore

    warm = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                            readonly=True, preload=False)
    warm[0]
    warm.close()
    CachedOCRDataset(images, annotations, None, preset={"load_maps": True})[0]
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    results: dict[str, object] = {"uid": os.getuid()}
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          readonly=True, preload=False)
    results["digests"] = {ds.source(i): sample_digest(ds[i]) for i in range(len(ds))}
    results["hits"] = ds.stats().get("tensors.hits", 0)
    ds.close()
    try:
        CacheStore(cache).put("images", b"k" * 32, {"image": np.zeros((2, 2, 3), np.uint8)})
        results["write"] = "written"
    except CacheError as exc:
        results["write"] = f"{type(exc).__name__}: {exc}"
    Path(out).write_text(json.dumps(results))
    return 0


def test_a_cache_read_only_to_the_reader_works_read_only(tiny, references):
    from diskcache_ocr.prebuild import prebuild
    from diskcache_ocr.store import CacheStore

    uid, gid = _nobody()
    # The other user imports this checkout's package: a checkout under a private directory
    # (e.g. made by mktemp -d) cannot be reached, and that says nothing about the cache.
    package = Path(diskcache_ocr.__file__).resolve().parent
    closed = [p for p in package.parents if not p.stat().st_mode & stat.S_IXOTH]
    if closed:
        pytest.skip(f"{closed[0]} is not reachable by another user; the child could not "
                    "import this checkout")
    # (another pytest session starting meanwhile makes its base temp dir private again)
    for parent in tiny.root.parents:
        if parent in (Path("/"), Path("/tmp")):
            break
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    # Outside pytest's private temp dir, so the other user can reach it.
    base = Path(tempfile.mkdtemp(prefix="diskcache-ocr-perm-"))
    try:
        base.chmod(0o755)
        cache = base / "cache"
        with CacheStore(cache, dir_mode=0o755) as store:  # shared: world-readable, not writable
            store.header()
        prebuild(tiny.images, tiny.annotations, cache, progress=False)
        assert stat.S_IMODE(cache.stat().st_mode) == 0o755
        assert stat.S_IMODE((cache / "lock.mdb").stat().st_mode) == 0o644
        out = base / "out.json"
        out.touch()
        out.chmod(0o666)
        child = Child(read_as, uid, gid, str(tiny.images), str(tiny.annotations), str(cache),
                      str(out), log=base / "log")
        assert child.join(180) == 0, child.log_text()
        got = json.loads(out.read_text())
        assert got["uid"] == uid
        assert got["digests"] == references
        assert got["hits"] == len(tiny.names)  # read from the cache, not recomputed
        assert got["write"].startswith("CacheError: ") and "cannot open" in got["write"], got
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_cache_directories_are_owner_only_by_default(tmp_path):
    from diskcache_ocr.store import CacheStore

    old = os.umask(0o022)
    try:
        with CacheStore(tmp_path / "a" / "cache") as store:
            store.header()
        with CacheStore(tmp_path / "shared", dir_mode=0o750) as store:
            store.header()
    finally:
        os.umask(old)
    cache = tmp_path / "a" / "cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((cache / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o750
