"""status / health / clear / verify find what they promise to find, on caches damaged on
purpose: stale and missing sources, old entries, low hit rates, version mismatches, damaged
records, garbage files, flipped payload bytes and valid-but-wrong records."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from testkit import private_copy

from diskcache_ocr.codec import decode_record
from diskcache_ocr.errors import CacheError
from diskcache_ocr.ops import clear, copy, health, status, verify
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.store import KINDS, CacheStore, WriteBatch
from diskcache_ocr.synth import split_paths

N = 4


@pytest.fixture
def case(built, tmp_path):
    """A private, stat-identical copy of the dataset and of its cache."""
    data, cache = private_copy(*built, tmp_path)
    return (*split_paths(data), cache)


def codes(report: dict) -> dict[str, str]:
    return {p["code"]: p["detail"] for p in report["problems"]}


def some_key(cache: Path, kind: str, index: int = 0) -> bytes:
    with CacheStore(cache, readonly=True) as store:
        return sorted(store.keys(kind))[index]


def put_raw(cache: Path, kind: str, key: bytes, value: bytes) -> None:
    with CacheStore(cache) as store:
        batch = WriteBatch()
        batch.put(kind, key, value)
        store.commit(batch)


def raw(cache: Path, kind: str, key: bytes) -> bytes:
    with CacheStore(cache, readonly=True) as store, store.reader() as r:
        return bytes(r.get_raw(kind, key))


# -- health -----------------------------------------------------------------------------------
def test_a_fresh_build_is_healthy(case):
    images, _, cache = case
    report = health(cache, images_dir=images)
    assert report == {"ok": True, "problems": []}
    assert health(cache) == {"ok": True, "problems": []}  # root from the header


def test_health_finds_a_changed_source(case):
    images, _, cache = case
    files = sorted(images.iterdir())
    files[1].write_bytes(files[1].read_bytes() + b"\0")  # size changes
    st = files[3].stat()
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # mtime only
    report = health(cache, images_dir=images)
    assert report["ok"] is False
    found = codes(report)
    assert set(found) == {"stale_entries"}
    assert found["stale_entries"].startswith("2 sources")
    assert f"{files[1].name} (changed)" in found["stale_entries"]
    assert f"{files[3].name} (changed)" in found["stale_entries"]


def test_health_finds_a_missing_source(case):
    images, _, cache = case
    victim = sorted(images.iterdir())[0]
    victim.unlink()
    found = codes(health(cache, images_dir=images))
    assert set(found) == {"stale_entries"}
    assert f"{victim.name} (missing)" in found["stale_entries"]
    assert found["stale_entries"].startswith("1 sources")


def test_health_finds_old_entries(case):
    images, _, cache = case
    assert "old_entries" in codes(health(cache, images_dir=images, max_age_days=0))
    assert "old_entries" not in codes(health(cache, images_dir=images, max_age_days=1))

    with CacheStore(cache) as store:
        source, entry = next(iter(store.iter_index()))
        batch = WriteBatch()
        month_ago = time.time_ns() - 30 * 86400 * 10**9
        batch.put_index(source, replace(entry, updated_ns=month_ago))
        store.commit(batch)
    found = codes(health(cache, images_dir=images))  # default: 7 days
    assert set(found) == {"old_entries"}
    assert found["old_entries"].startswith("1 entries older than 7 days")
    assert "old_entries" not in codes(health(cache, images_dir=images, max_age_days=60))


def test_health_finds_a_low_hit_rate(case):
    images, _, cache = case
    with CacheStore(cache) as store:
        store.count("tensors", hits=40)  # 40 / 44 with the build's 4 misses: fine
    assert health(cache, images_dir=images)["ok"] is True
    with CacheStore(cache) as store:
        store.count("maps", hits=5, misses=30)
    found = codes(health(cache, images_dir=images))
    assert set(found) == {"low_hit_rate"}
    assert found["low_hit_rate"].startswith("maps: 5/")


def test_health_and_status_show_a_version_mismatch(case):
    images, _, cache = case
    with CacheStore(cache) as store:
        kinds = dict(store.header()["kinds"])
        current = kinds["tensors"]
        kinds["tensors"] = {"version": current["version"], "fingerprint": "0" * 32}
        store.update_header(kinds=kinds)
    found = codes(health(cache, images_dir=images))
    assert set(found) == {"version_mismatch"}
    assert found["version_mismatch"].startswith("tensors: stored ")
    assert "0" * 32 in found["version_mismatch"]

    st = status(cache)["kinds"]
    assert st["tensors"]["up_to_date"] is False
    assert st["tensors"]["stored_version"] == f"{current['version']}/{'0' * 32}"
    assert st["tensors"]["current_version"] == f"{current['version']}/{current['fingerprint']}"
    assert st["images"]["up_to_date"] and st["maps"]["up_to_date"]


def test_health_finds_a_damaged_record(case):
    images, _, cache = case
    key = some_key(cache, "maps", 1)
    put_raw(cache, "maps", key, b"\x00not a record\xff" * 4)
    assert health(cache, images_dir=images)["ok"] is True  # (reads no record by default)
    found = codes(health(cache, images_dir=images, records=True))
    assert set(found) == {"corrupt"}
    assert found["corrupt"].startswith("1 damaged records")
    assert f"maps/{key.hex()[:16]}" in found["corrupt"]
    report = verify(cache)
    assert len(report["corrupt"]) == 1 and f"maps/{key.hex()}" in report["corrupt"][0]


def test_health_frees_reader_slots_of_dead_processes(case):
    images, _, cache = case
    code = textwrap.dedent(f"""
        import os, signal
        from diskcache_ocr.store import CacheStore
        store = CacheStore({str(cache)!r}, readonly=True)
        with store.reader() as r:
            r.get_raw("images", b"x")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    # LMDB resets the reader table when nobody holds the environment: keep it open here.
    with CacheStore(cache) as holder:
        holder.header()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert done.returncode == -9, done.stderr
        found = codes(health(cache, images_dir=images))
        assert set(found) == {"stale_readers"}
        assert found["stale_readers"].startswith("1 reader slots")
        assert health(cache, images_dir=images)["ok"] is True  # freed by the first look


# -- clear ------------------------------------------------------------------------------------
def _garbage(path: Path, seed: int, start: int = 0) -> None:
    size = path.stat().st_size
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(rng.randbytes(size - start))


def test_clear_all_recovers_a_cache_overwritten_with_garbage(case):
    images, annotations, cache = case
    _garbage(cache / "data.mdb", seed=1)
    found = codes(health(cache))
    assert set(found) == {"corrupt"}
    with pytest.raises(CacheError):
        status(cache)
    dry = clear(cache, all=True, dry_run=True)
    assert (cache / "data.mdb").exists() and dry["dry_run"] is True
    result = clear(cache, all=True)
    assert not (cache / "data.mdb").exists()
    assert str(cache / "data.mdb") in result["removed"]["files"]
    summary = prebuild(images, annotations, cache, workers=1, progress=False)
    assert (summary.built, summary.failed) == (N, [])
    assert health(cache)["ok"] is True
    assert verify(cache)["corrupt"] == []


def _damage_pages(cache: Path, target: str, seed: int) -> int:
    """Overwrite B-tree pages of ``data.mdb`` with garbage, keeping the two meta pages (so
    LMDB still opens the file): the root page of one named sub-database, or ("tree") every
    branch and leaf page. Returns how many pages were overwritten."""
    import lmdb  # the test needs LMDB's page layout; the library hides it

    env = lmdb.open(str(cache), readonly=True, lock=False, max_dbs=0)
    try:
        psize = env.stat()["psize"]
        with env.begin() as txn:
            described = {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()
    path = cache / "data.mdb"
    data = path.read_bytes()
    if target == "tree":
        # A page header starts with its own page number, then 2 pad bytes and the flags
        # (0x01 branch, 0x02 leaf).
        pages = [n for n in range(2, len(data) // psize)
                 if struct.unpack_from("<QHH", data, n * psize)[0] == n
                 and struct.unpack_from("<QHH", data, n * psize)[2] & 0x03]
    else:
        # The main database maps each name to its MDB_db record, which ends with the root.
        pages = [struct.unpack_from("<Q", described[target], len(described[target]) - 8)[0]]
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for n in pages:
            f.seek(n * psize)
            f.write(rng.randbytes(psize))
    return len(pages)


_CHECK_DAMAGED = textwrap.dedent("""
    import contextlib, io, json, sys
    from diskcache_ocr import cli
    cache = sys.argv[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        health_rc = cli.main(["health", "--cache", cache, "--json"])
    health = out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        clear_rc = cli.main(["clear", "--all", "--cache", cache, "--json"])
    print(json.dumps({"health_rc": health_rc, "health": health, "clear_rc": clear_rc}))
""")

@pytest.mark.full
@pytest.mark.parametrize("target", ["tree", "index", "images", "stats"])
def test_damaged_pages_are_reported_and_cleared(case, target):
    """health reports a damaged file as 'corrupt' (exit 1), clear --all removes it."""
    _, _, cache = case
    assert _damage_pages(cache, target, seed=2) >= 1
    # In a child process: reading a damaged LMDB file must never take the test run down.
    done = subprocess.run([sys.executable, "-c", _CHECK_DAMAGED, str(cache)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["health_rc"] == 1, done.stderr[-3000:]
    assert "corrupt" in {p["code"] for p in json.loads(result["health"])["problems"]}
    assert result["clear_rc"] == 0, done.stderr[-3000:]
    assert not (cache / "data.mdb").exists()


def test_clear_rejects_a_bad_choice(case):
    _, _, cache = case
    with pytest.raises(ValueError):
        clear(cache)
    with pytest.raises(ValueError):
        clear(cache, all=True, stale=True)
    with pytest.raises(ValueError, match="unknown kind"):
        clear(cache, kind="pixels")


def test_clear_stale_needs_a_root(tmp_path):
    with CacheStore(tmp_path / "bare") as store:
        store.put("images", b"k" * 32, {"image": np.zeros((2, 2, 3), np.uint8)})
    with pytest.raises(CacheError, match="dataset root"):
        clear(tmp_path / "bare", stale=True)


# -- verify -----------------------------------------------------------------------------------
def test_verify_finds_a_flipped_payload_byte(case):
    _, _, cache = case
    clean = verify(cache)
    assert (clean["checked"], clean["corrupt"]) == (N * len(KINDS), [])
    key = some_key(cache, "tensors", 2)
    value = bytearray(raw(cache, "tensors", key))
    value[-1] ^= 0x01
    put_raw(cache, "tensors", key, bytes(value))
    decode_record(bytes(value))  # still well-formed: only the checksum can tell
    report = verify(cache)
    assert len(report["corrupt"]) == 1
    assert report["corrupt"][0].startswith(f"tensors/{key.hex()}:")
    assert "checksum" in report["corrupt"][0]
    assert report["mismatched"] == []


def test_verify_recompute_finds_a_valid_but_wrong_record(case):
    images, annotations, cache = case
    with CacheStore(cache) as store:
        entries = dict(store.iter_index())
        source = sorted(entries)[1]
        keys = dict(entries[source].records())
        image = store.get("images", keys["images"])["image"]
        maps = store.get("maps", keys["maps"])
        wrong_image = image.copy()
        wrong_image[0, 0, 0] ^= 0x01
        maps["thresh_map"] = maps["thresh_map"] + np.float32(0.125)
        with store.writer() as w:
            w.put("images", keys["images"], {"image": wrong_image})
            w.put("maps", keys["maps"], maps)
    assert verify(cache)["corrupt"] == []  # valid records: only recomputing can tell

    without_maps = verify(cache, recompute=N, images_dir=images)
    assert without_maps["corrupt"] == []
    assert without_maps["mismatched"] == [f"{source} images.image"]

    report = verify(cache, recompute=N, images_dir=images, annotations=annotations)
    assert report["corrupt"] == [] and report["recomputed"] == N
    assert sorted(report["mismatched"]) == sorted([f"{source} images.image",
                                                   f"{source} maps.thresh_map"])


def test_verify_recompute_reports_a_damaged_record_instead_of_failing(case):
    images, annotations, cache = case
    key = some_key(cache, "images", 0)
    put_raw(cache, "images", key, b"garbage, not a record")
    report = verify(cache, recompute=N, images_dir=images, annotations=annotations)
    assert len(report["corrupt"]) == 1 and report["corrupt"][0].startswith(f"images/{key.hex()}")
    assert report["mismatched"] == []
    sampled = verify(cache, sample=0, recompute=N, images_dir=images)
    assert sampled["checked"] == 0
    assert len(sampled["corrupt"]) == 1 and key.hex() in sampled["corrupt"][0]


def test_verify_recompute_skips_changed_and_missing_sources(case):
    images, annotations, cache = case
    files = sorted(images.iterdir())
    files[0].unlink()
    files[1].write_bytes(files[2].read_bytes())
    report = verify(cache, recompute=N, images_dir=images, annotations=annotations)
    assert report == {"checked": N * len(KINDS), "corrupt": [], "mismatched": [],
                      "recomputed": N}


# -- status, copy -----------------------------------------------------------------------------
def test_status_counts_entries_bytes_and_failures(case):
    _, _, cache = case
    st = status(cache)
    with CacheStore(cache, readonly=True) as store:
        for kind in KINDS:
            keys = store.keys(kind)
            with store.reader() as r:
                total = sum(len(r.get_raw(kind, k)) for k in keys)
            assert st["kinds"][kind]["entries"] == len(keys)
            # (the pages they occupy: each record's, with the unused end of its last page,
            # and the tree's own)
            psize = 4096
            assert total <= st["kinds"][kind]["bytes"] <= total + psize * (2 * len(keys) + 2)
    assert st["index"] == {"sources": N, "failed": 0}
    assert st["stats"]["images.misses"] == N
    assert st["map"]["used_bytes"] <= st["map"]["map_size"]


def test_copy_refuses_a_missing_source_without_side_effects(tmp_path):
    with pytest.raises(CacheError):
        copy(tmp_path / "absent", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_verify_recompute_rebuilds_a_convention_pipeline_from_the_header(synth_data, tmp_path):
    """A cache the origin convention's own stages built is recomputed from its header (its
    annotations read by that convention's rules): equal records pass, a changed one is found;
    a user's transform still cannot be made from a header."""
    from diskcache_ocr.dataset import CachedOCRDataset

    images, annotations = split_paths(synth_data(6, 31, size=(240, 320), min_words=5, max_words=20))
    cache = tmp_path / "c"
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          convention="origin")
    ds.__getitems__(list(range(len(ds))))
    ds.store.close()
    report = verify(cache, recompute=N, images_dir=images, annotations=annotations)
    assert report["recomputed"] == N and report["corrupt"] == [] and report["mismatched"] == []

    with CacheStore(cache) as store:
        entries = {s: e for s, e in store.iter_index() if e.ok}
        source = sorted(entries)[0]
        kind, key = next((k, v) for k, v in dict(entries[source].records()).items()
                         if k == "maps")
        maps = store.get(kind, key)
        name = sorted(maps)[0]
        maps[name] = maps[name] + np.float32(0.5)
        with store.writer() as w:
            w.put(kind, key, maps)
    report = verify(cache, recompute=len(entries), images_dir=images, annotations=annotations)
    assert report["mismatched"] == [f"{source} maps.{name}"]

    mine = tmp_path / "mine"
    own = CachedOCRDataset(images, annotations, mine, preset="validation_optimized",
                           transform=lambda image, polygons: (image, polygons, np.eye(3)),
                           transform_version="1")
    own.__getitems__([0])
    own.store.close()
    with pytest.raises(CacheError, match="cannot rebuild"):
        verify(mine, recompute=1, images_dir=images, annotations=annotations)
