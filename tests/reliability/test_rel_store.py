"""The cache directory's answers: a cache of a newer library version is never called damaged
nor offered for deletion; a directory that cannot be created says where and what to do."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest
from conftest import Data

from diskcache_ocr import ops
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.store import CacheStore
from diskcache_ocr.store.header import STORE_FORMAT


@pytest.fixture
def newer_cache(tiny: Data, clean_build: dict, rel_root: Path, tmp_path: Path) -> Path:
    """A copy of a built cache made to look written by a newer release: a later format, a
    header laid out otherwise, a sub-database of ours gone and one of its own added."""
    import lmdb

    cache = tmp_path / "newer"
    cache.mkdir()
    shutil.copyfile(rel_root / "clean-cache" / "data.mdb", cache / "data.mdb")
    env = lmdb.open(str(cache), max_dbs=12)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        header = msgpack.unpackb(txn.get(b"header", db=meta), raw=False)
        header.update(format=STORE_FORMAT + 1, library="99.1.0",
                      kinds=[{"kind": "images", "pipelines": {}}])
        txn.put(b"header", msgpack.packb(header, use_bin_type=True), db=meta)
        txn.drop(env.open_db(b"stats", txn=txn), delete=True)
        env.open_db(b"pipelines", txn=txn)
    env.close()
    (cache / "lock.mdb").unlink(missing_ok=True)
    return cache


def _answers(tiny: Data, cache: Path) -> dict[str, str]:
    """What every entry point says about ``cache`` (a CacheError's message, or 'ok')."""
    from diskcache_ocr import cli

    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except CacheError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"

    def dataset(readonly: bool) -> None:
        CachedOCRDataset(tiny.images, tiny.annotations, cache, preset="validation_optimized",
                         preload=False, readonly=readonly)[0]

    def store(readonly: bool) -> None:
        with CacheStore(cache, readonly=readonly) as s:
            s.header()

    attempt("store", lambda: store(False))
    attempt("store read-only", lambda: store(True))
    attempt("dataset", lambda: dataset(False))
    attempt("dataset read-only", lambda: dataset(True))
    attempt("status", lambda: ops.status(cache))
    attempt("verify", lambda: ops.verify(cache))
    health = ops.health(cache)
    out["health"] = " ".join(p["detail"] for p in health["problems"])
    assert not health["ok"]
    for command in ("status", "health", "verify"):
        said = io.StringIO()
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            rc = cli.main([command, "--cache", str(cache)])
        assert rc != 0, command
        out[f"cli {command}"] = said.getvalue()
    return out


def test_a_cache_of_a_newer_version_says_upgrade_never_clear(tiny, newer_cache) -> None:
    before = (newer_cache / "data.mdb").read_bytes()
    answers = _answers(tiny, newer_cache)
    for where, said in answers.items():
        assert "newer version" in said and "Upgrade" in said, (where, said)
        assert "99.1.0" in said and f"format {STORE_FORMAT + 1}" in said, (where, said)
        assert "clear it" not in said and "clear --all" not in said, (where, said)
    assert (newer_cache / "data.mdb").read_bytes() == before  # nothing was written into it


def test_a_cache_of_an_unknown_older_format_is_still_called_damaged(tiny, newer_cache):
    import lmdb

    env = lmdb.open(str(newer_cache), max_dbs=12)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        header = msgpack.unpackb(txn.get(b"header", db=meta), raw=False)
        header.update(format=0, kinds={})
        txn.put(b"header", msgpack.packb(header, use_bin_type=True), db=meta)
        env.open_db(b"stats", txn=txn)
    env.close()
    with pytest.raises(CacheError, match="format 0.*clear it with"):
        CacheStore(newer_cache).header()


@pytest.fixture
def read_only_mount(tmp_path: Path):
    from relhelp import small_tmpfs

    with small_tmpfs(tmp_path / "ro", 8) as where:
        (where / "existing").mkdir()
        res = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot remount read-only: {res.stderr.strip()}")
        yield where


@pytest.mark.parametrize("under", ["", "existing/", "not/yet/"])
def test_a_cache_directory_that_cannot_be_created_is_a_clear_error(read_only_mount, under):
    cache = read_only_mount / f"{under}cache"
    with pytest.raises(CacheError, match="cannot create the cache directory.*Read-only file "
                       "system; choose a cache directory on a writable") as err:
        CacheStore(cache).header()
    assert str(cache) in str(err.value)
    assert not isinstance(err.value.__cause__, OSError)


def test_the_dataset_on_a_read_only_mount_says_the_same(tiny, read_only_mount):
    with pytest.raises(CacheError, match=f"{read_only_mount}/cache: cannot create"):
        CachedOCRDataset(tiny.images, tiny.annotations, read_only_mount / "cache",
                         preset="validation_optimized", preload=False)[0]
