"""Hostile and damaged cache files: each is a CacheError or a clear refusal to open, never a
crash, a hang or code execution; the dataset recomputes a damaged record; `health` and
`verify` report the damage; `clear --all` recovers."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest
from relhelp import Child, copy_images, diff_snapshots, sample_digest, snapshot

PREFIX_LEN = 12


def _record(arrays=None) -> bytes:
    from diskcache_ocr.codec import encode_record

    return encode_record(arrays or {"image": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                    "matrix": np.eye(3)})


def _rewrite(value: bytes, change) -> bytes:
    """Re-pack a record's msgpack header after ``change(header)`` (lengths fixed up)."""
    from diskcache_ocr.codec import MAGIC, PREFIX

    n = PREFIX.unpack_from(value, 0)[4]
    header = msgpack.unpackb(value[PREFIX_LEN:PREFIX_LEN + n], raw=False)
    change(header)
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(MAGIC, 1, 0, 0, len(packed)) + packed + value[PREFIX_LEN + n:]


def _raw_header(body: bytes, tail: bytes = b"\0" * 256) -> bytes:
    from diskcache_ocr.codec import MAGIC, PREFIX

    return PREFIX.pack(MAGIC, 1, 0, 0, len(body)) + body + tail


class _Evil:
    """Unpickling this would create a file: proof that nothing unpickles cache values."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _nested(depth: int) -> bytes:
    return b"\x82\xa1a" + b"\x91" * depth + b"\xc0" + b"\xa1c\xc4\x10" + bytes(16)


GOOD = _record()
HOSTILE = {
    "empty": b"",
    "wrong magic": b"XXXX" + GOOD[4:],
    "other record format": GOOD[:4] + b"\x02" + GOOD[5:],
    "truncated prefix": GOOD[:7],
    "truncated header": GOOD[:PREFIX_LEN + 5],
    "truncated payload": GOOD[:-10],
    "header length beyond the value": GOOD[:8] + (10**6).to_bytes(4, "little") + GOOD[12:],
    "header length 4 GiB": GOOD[:8] + b"\xff\xff\xff\xff" + GOOD[12:],
    "object dtype": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(1, "|O")),
    "unknown dtype": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(1, "<c16")),
    "big-endian dtype": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(1, ">f4")),
    "datetime dtype": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(1, "<M8[s]")),
    "shape overflows": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(2, [2**62, 2**62])),
    "shape overflows int64": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(2, [2**64 - 1, 1])),
    "zero dim with huge dims": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(
        2, [0, 2**40, 2**40])),
    "negative dim": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(2, [-2, -3, 4])),
    "too many dims": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(2, [1] * 9 + [24])),
    "shape/bytes mismatch": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(2, [2, 3, 5])),
    "offset past the end": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(3, len(GOOD))),
    "offset inside the header": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(3, 4)),
    "negative offset": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(3, -64)),
    "float offset": _rewrite(GOOD, lambda h: h["a"][0].__setitem__(3, 64.0)),
    "overlapping arrays": _rewrite(GOOD, lambda h: h["a"][1].__setitem__(3, h["a"][0][3])),
    "duplicate names": _rewrite(GOOD, lambda h: h["a"][1].__setitem__(0, h["a"][0][0])),
    "no arrays": _rewrite(GOOD, lambda h: h.__setitem__("a", [])),
    "extra header key": _rewrite(GOOD, lambda h: h.__setitem__("x", 1)),
    "checksum not bytes": _rewrite(GOOD, lambda h: h.__setitem__("c", "abc")),
    "header not a map": _raw_header(msgpack.packb([1, 2, 3])),
    "header is garbage": _raw_header(b"\xc1\xc1\xc1\xc1"),
    "header is huge": _raw_header(msgpack.packb({"a": [["x" * 60, "|u1", [1], 0, 1]] * 1200,
                                                 "c": bytes(16)})),
    "header nested 900 deep": _raw_header(_nested(900)),
    "header nested 50000 deep": _raw_header(_nested(50_000)),
    "header with a 2 GB string": _raw_header(b"\x82\xa1a\xdb\x7f\xff\xff\xff" + b"x" * 64),
    "a pickle": b"",  # filled in by the fixture (needs the marker path)
}


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """A built cache of ``tiny`` (with its own copy of the images) and its snapshot."""
    from diskcache_ocr.prebuild import prebuild

    base = tmp_path_factory.mktemp("hostile")
    images = base / "images"
    copy_images(tiny.images, images)
    cache = base / "cache"
    assert not prebuild(images, tiny.annotations, cache, progress=False).failed
    return images, cache, snapshot(cache)


@pytest.fixture
def cache_copy(built, tmp_path):
    images, cache, snap = built
    dest = tmp_path / "cache"
    dest.mkdir()
    shutil.copyfile(cache / "data.mdb", dest / "data.mdb")
    return images, dest, snap


def _keys_of(images: Path, annotations: Path, cache: Path, index: int = 0) -> dict[str, bytes]:
    """The keys the dataset will read for one image, by kind."""
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.schema import source_id

    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          preload=False, readonly=True)
    entry = ds.store.get_index(source_id(ds.images_dir, ds.source(index)))
    h = entry.content_hash
    keys = ds.engine.keys(index, h)
    ds.close()
    assert keys == dict(entry.keys)
    return {name.partition(":")[0]: key for name, key in keys.items()}  # ("tensors:1f0c...")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_record_values_are_refused(case, tmp_path):
    from diskcache_ocr.codec import decode_record, parse_header, record_nbytes, verify_checksum
    from diskcache_ocr.errors import CacheFormatError

    value = HOSTILE[case]
    if case == "a pickle":
        _Evil.marker = str(tmp_path / "pwned")
        value = pickle.dumps(_Evil())
    for fn in (decode_record, parse_header, verify_checksum, record_nbytes):
        with pytest.raises(CacheFormatError) as info:
            fn(value, "tensors/abc")
        assert str(info.value).startswith("tensors/abc: ") and len(str(info.value)) < 400
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["images", "tensors", "maps"])
def test_the_dataset_recomputes_hostile_records(tiny, references, cache_copy, kind, tmp_path):
    """Every hostile value, under the key the dataset reads: the sample is still right,
    health and verify name the damage, and the record is rewritten."""
    from diskcache_ocr import ops
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.store import CacheStore, WriteBatch

    images, cache, snap = cache_copy
    keys = _keys_of(images, tiny.annotations, cache)
    _Evil.marker = str(tmp_path / "pwned")
    for case, value in HOSTILE.items():
        if case == "a pickle":
            value = pickle.dumps(_Evil())
        with CacheStore(cache) as store:
            batch = WriteBatch()
            batch.put(kind, keys[kind], value)
            if kind == "images":  # else the tensor is found and the image never read
                batch.delete("tensors", keys["tensors"])
            store.commit(batch)
        report = ops.health(cache, records=True)
        assert any(p["code"] == "corrupt" for p in report["problems"]), (case, report)
        assert ops.verify(cache)["corrupt"], case
        ds = CachedOCRDataset(images, tiny.annotations, cache, preset="validation_optimized",
                              preload=False)
        sample = ds[0]
        assert sample["meta"]["error"] is None, (case, sample["meta"])
        assert sample_digest(sample) == references[ds.source(0)], case
        ds.close()
        assert ops.verify(cache)["corrupt"] == [], case  # rewritten by the read-through
    assert not (tmp_path / "pwned").exists()
    assert not diff_snapshots(snapshot(cache), snap)


def test_a_flipped_payload_byte_is_caught_by_verify(tiny, cache_copy):
    from diskcache_ocr import ops
    from diskcache_ocr.codec import parse_header
    from diskcache_ocr.store import CacheStore, WriteBatch

    images, cache, snap = cache_copy
    keys = _keys_of(images, tiny.annotations, cache)
    rng = random.Random(5)
    with CacheStore(cache) as store:
        for kind, key in keys.items():
            with store.reader() as r:
                value = bytearray(r.get_raw(kind, key))
            start = parse_header(bytes(value)).payload_start
            value[rng.randrange(start, len(value))] ^= 1 << rng.randrange(8)
            batch = WriteBatch()
            batch.put(kind, key, bytes(value))
            store.commit(batch)
    report = ops.verify(cache)
    assert len(report["corrupt"]) == 3 and all("checksum" in c for c in report["corrupt"])
    ops.clear(cache, all=True)
    assert ops.verify(cache)["corrupt"] == []


def test_a_damaged_index_entry_is_recomputed(tiny, references, cache_copy):
    from diskcache_ocr import ops
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.store import CacheStore

    images, cache, snap = cache_copy
    with CacheStore(cache) as store:
        source_key = sorted(s for s, _ in store.iter_index())[0]
        store.write_raw(lambda txn, dbs: txn.put(os.fsencode(source_key), b"\xc1 not msgpack",
                                                 db=dbs["index"]))
    source = os.path.relpath(source_key, os.path.realpath(images))
    assert any(p["code"] == "corrupt" for p in ops.health(cache)["problems"])
    ds = CachedOCRDataset(images, tiny.annotations, cache, preset="validation_optimized",
                          preload=False)
    index = [ds.source(i) for i in range(len(ds))].index(source)
    assert sample_digest(ds[index]) == references[source]
    ds.close()
    assert not diff_snapshots(snapshot(cache), snap)
    assert all(p["code"] != "corrupt" for p in ops.health(cache)["problems"])


def test_damaged_counters_do_not_break_writes(tiny, cache_copy):
    from diskcache_ocr import ops
    from diskcache_ocr.store import CacheStore

    images, cache, _ = cache_copy
    with CacheStore(cache) as store:
        store.write_raw(lambda txn, dbs: txn.put(b"images.hits", b"\xc1\xc1", db=dbs["stats"]))
        store.count("images", hits=3)
        store.put("images", b"k" * 32, {"image": np.zeros((2, 2, 3), np.uint8)})
        assert store.stats()["images.hits"] == 3
    assert ops.health(cache) is not None


# -- whole files ----------------------------------------------------------------------------
def open_and_use(images: str, annotations: str, cache: str, out: str) -> int:
    """Child: every entry point on a damaged cache; a CacheError is an answer, not a crash."""
    import json

    from diskcache_ocr import ops
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.errors import CacheError

    results = {}

    def attempt(name, fn):
        try:
            results[name] = ["ok", repr(fn())[:200]]
        except CacheError as exc:
            results[name] = [type(exc).__name__, str(exc)[:300]]

    def epoch():
        ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                              preload=False)
        errors = [ds[i]["meta"]["error"] for i in range(len(ds))]
        ds.close()
        return errors

    attempt("dataset", epoch)
    attempt("health", lambda: ops.health(cache))
    attempt("verify", lambda: ops.verify(cache)["corrupt"])
    attempt("status", lambda: ops.status(cache)["kinds"]["maps"]["entries"])
    attempt("clear", lambda: ops.clear(cache, all=True))
    attempt("after clear", epoch)
    Path(out).write_text(json.dumps(results))
    return 0


def _damage_and_check(tiny, images: Path, cache: Path, tmp_path: Path, tag: str) -> dict:
    import json

    out = tmp_path / f"{tag}.json"
    child = Child(open_and_use, str(images), str(tiny.annotations), str(cache), str(out),
                  log=tmp_path / f"{tag}.log")
    rc = child.join(300)
    assert rc == 0, f"{tag}: exit {rc} ({'signal ' + signal.Signals(-rc).name if rc < 0 else ''})" \
                    f"\n{child.log_text()}"
    results = json.loads(out.read_text())
    # Whatever the damage, clear --all recovers and the next epoch is whole.
    assert results["clear"][0] == "ok", results
    assert results["after clear"] == ["ok", repr([None] * len(tiny.names))], results
    return results


def _truncations(size: int) -> list[int]:
    rng = random.Random(9)
    return sorted({0, 100, 4096, 8191, 8192, 8193, 3 * 4096, size // 2, size - 4096, size - 1,
                   *(rng.randrange(0, size) for _ in range(4))})


def test_truncated_data_files_are_refused_not_crashed(tiny, built, tmp_path):
    images, cache, _ = built
    size = (cache / "data.mdb").stat().st_size
    for n in _truncations(size):
        dest = tmp_path / f"cache-{n}"
        dest.mkdir()
        shutil.copyfile(cache / "data.mdb", dest / "data.mdb")
        with open(dest / "data.mdb", "r+b") as fh:
            fh.truncate(n)
        results = _damage_and_check(tiny, images, dest, tmp_path, f"truncated-{n}")
        if 0 < n < size - 4096 + 1:  # (the last page may be free space)
            assert results["dataset"][0] == "CacheFormatError", (n, results)
            assert "corrupt" in results["health"][1], (n, results)
        shutil.rmtree(dest)


@pytest.mark.parametrize("where", ["whole file", "meta pages", "first meta page"])
def test_garbage_data_files_are_refused_not_crashed(tiny, built, tmp_path, where):
    images, cache, _ = built
    dest = tmp_path / "cache"
    dest.mkdir()
    shutil.copyfile(cache / "data.mdb", dest / "data.mdb")
    rng = random.Random(where)
    size = (dest / "data.mdb").stat().st_size
    with open(dest / "data.mdb", "r+b") as fh:
        if where == "whole file":
            fh.write(rng.randbytes(size))
        elif where == "meta pages":
            fh.write(rng.randbytes(2 * 4096))
        else:
            fh.write(rng.randbytes(4096))
    results = _damage_and_check(tiny, images, dest, tmp_path, where.replace(" ", "-"))
    if where != "first meta page":  # (LMDB then falls back to the other meta page)
        assert results["dataset"][0] == "CacheFormatError", results


def test_garbage_over_record_pages_is_caught_by_verify(tiny, built, tmp_path):
    """Random pages of the record area overwritten: `verify` finds every damaged record."""
    images, cache, _ = built
    size = (cache / "data.mdb").stat().st_size
    rng = random.Random(13)
    for round_ in range(3):
        dest = tmp_path / f"cache-{round_}"
        dest.mkdir()
        shutil.copyfile(cache / "data.mdb", dest / "data.mdb")
        with open(dest / "data.mdb", "r+b") as fh:
            # the record payloads (overflow pages) are most of the file, past its first MB
            for _ in range(4):
                fh.seek(rng.randrange(256, size // 4096) * 4096 + 64)
                fh.write(rng.randbytes(2048))
        results = _damage_and_check(tiny, images, dest, tmp_path, f"pages-{round_}")
        assert results["verify"][0] == "ok" and results["verify"][1] != "[]", results


def test_a_cache_of_another_format_version_is_refused(tiny, cache_copy, tmp_path):
    import lmdb

    images, cache, _ = cache_copy
    env = lmdb.open(str(cache), max_dbs=10)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        header = msgpack.unpackb(txn.get(b"header", db=meta), raw=False)
        header["format"] = 99  # a format of a later release
        txn.put(b"header", msgpack.packb(header, use_bin_type=True), db=meta)
    env.close()
    results = _damage_and_check(tiny, images, cache, tmp_path, "format-99")
    assert results["dataset"][0] == "CacheNewerFormatError" and "format 99" in results["dataset"][1]
    assert "corrupt" in results["health"][1] and "newer version" in results["health"][1]


@pytest.mark.parametrize("what", ["garbage header", "foreign LMDB", "other engine"])
def test_foreign_and_unreadable_headers_are_refused(tiny, cache_copy, tmp_path, what):
    import lmdb

    images, cache, _ = cache_copy
    if what == "garbage header":
        env = lmdb.open(str(cache), max_dbs=10)
        with env.begin(write=True) as txn:
            txn.put(b"header", b"\xc1garbage", db=env.open_db(b"meta", txn=txn))
        env.close()
    else:
        (cache / "data.mdb").unlink()
        (cache / "lock.mdb").unlink(missing_ok=True)
        try:
            env = lmdb.open(str(cache), max_dbs=10,
                            **({"lib_version": 1} if what == "other engine" else {}))
        except lmdb.Error as exc:
            pytest.skip(f"this py-lmdb has no second engine: {exc}")
        with env.begin(write=True) as txn:
            name = b"meta" if what == "other engine" else b"something"
            txn.put(b"header", msgpack.packb({"format": 1}), db=env.open_db(name, txn=txn))
        env.close()
        (cache / "lock.mdb").unlink(missing_ok=True)
    results = _damage_and_check(tiny, images, cache, tmp_path, what.replace(" ", "-"))
    assert results["dataset"][0] == "CacheFormatError", results


def test_health_reports_a_damaged_tree_instead_of_raising(cache_copy, monkeypatch):
    """A read that meets a damaged B-tree page (simulated) is reported as 'corrupt'."""
    from diskcache_ocr import ops
    from diskcache_ocr.errors import CacheFormatError
    from diskcache_ocr.store import CacheStore

    _, cache, _ = cache_copy

    def damaged(self):
        raise CacheFormatError(f"{self.path}: read failed, the cache file is damaged (simulated "
                               "MDB_CORRUPTED)")

    monkeypatch.setattr(CacheStore, "stats", damaged)
    report = ops.health(cache)
    assert not report["ok"] and any(p["code"] == "corrupt" for p in report["problems"])
