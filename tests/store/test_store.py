from __future__ import annotations

import multiprocessing as mp
import pickle
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest
import torch

from diskcache_ocr.errors import CacheClosedError, CacheError, CacheFormatError, CacheVersionError
from diskcache_ocr.hashing import content_hash
from diskcache_ocr.store import CacheStore, IndexEntry, KindVersion


def key(i: int) -> bytes:
    return content_hash(str(i).encode())


def test_put_get_delete_keys_counts(store):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    with store.writer() as w:
        for i in range(5):
            w.put("tensors", key(i), {"image": a + i, "mask": np.ones(3, np.uint8)})
    assert store.kind_stats("tensors")["entries"] == 5
    assert store.kind_stats("tensors")["bytes"] > 5 * a.nbytes
    assert sorted(store.keys("tensors")) == sorted(key(i) for i in range(5))
    got = store.get("tensors", key(3))
    assert np.array_equal(got["image"], a + 3) and got["mask"].dtype == np.uint8
    store.delete("tensors", key(3))
    assert store.get("tensors", key(3)) is None and not store.contains("tensors", key(3))
    assert store.kind_stats("images")["entries"] == 0
    with pytest.raises(ValueError, match="unknown kind"):
        store.put("bogus", key(1), {"a": a})


def test_drop_one_kind_keeps_others(store):
    store.put("images", key(1), {"image": np.zeros((2, 2, 3), np.uint8)})
    store.put("maps", key(1), {"prob_map": np.zeros((1, 4, 4), np.float32)})
    store.drop("maps")
    assert store.keys("maps") == [] and store.keys("images") == [key(1)]


@pytest.mark.parametrize("shape", [(1,), (7, 3), (640, 640, 3), (1, 640, 640)])
def test_views_are_aligned_zero_copy_and_read_only(store, shape):
    arrays = {"head": np.arange(3, dtype=np.int64), "x": np.random.rand(*shape).astype(np.float32)}
    store.put("tensors", key(0), arrays)
    with store.reader() as r:
        rec = r.get("tensors", key(0))
        raw = r.get_raw("tensors", key(0))
        base = np.frombuffer(raw, np.uint8).ctypes.data
        for name, arr in arrays.items():
            view = rec[name]
            assert view.ctypes.data % 16 == 0, (name, view.ctypes.data % 64)
            assert np.array_equal(view, arr)
            assert not view.flags.writeable
        if rec["x"].nbytes > 4096:  # a large value is read in place: inside LMDB's value
            assert base <= rec["x"].ctypes.data < base + len(raw)
            assert rec["x"].ctypes.data % 64 == 0
        with pytest.raises(ValueError):
            rec["x"][...] = 0


def test_view_cannot_be_used_after_its_block(store):
    store.put("images", key(0), {"image": np.ones((64, 64, 3), np.uint8)})
    with store.reader() as r:
        rec = r.get("images", key(0))
        inside = rec["image"].sum()
    assert inside == 64 * 64 * 3
    with pytest.raises(CacheClosedError, match="read transaction has ended"):
        rec["image"]
    with pytest.raises(CacheClosedError):
        rec.copy()
    with pytest.raises(CacheClosedError):
        r.get("images", key(0))


def test_public_get_returns_owned_memory_safe_for_in_place_ops(store):
    store.put("tensors", key(0), {"image": np.ones((3, 100, 100), np.float32)})
    got = store.get("tensors", key(0))
    t = torch.from_numpy(got["image"])
    t.add_(1)  # would kill the process on a view over the read-only map
    got["image"] *= 2
    assert float(t.mean()) == 4.0
    assert float(store.get("tensors", key(0))["image"].mean()) == 1.0


def test_index_entries_round_trip(store):
    entry = IndexEntry(size=10, mtime_ns=123, content_hash=key(0), keys={"images": key(0)})
    with store.writer() as w:
        w.put_index("a/b.jpg", entry)
        w.put_index("c.jpg", IndexEntry(1, 2, key(1), status="failed: corrupt JPEG"))
    assert store.get_index("a/b.jpg") == entry
    rows = dict(store.iter_index())
    assert set(rows) == {"a/b.jpg", "c.jpg"} and not rows["c.jpg"].ok


def test_version_policies(tmp_path):
    v1 = {"images": KindVersion("1", "aaa"), "tensors": KindVersion("1", "bbb")}
    with CacheStore(tmp_path / "c") as s:
        assert s.check_kinds(v1) == []
        s.put("images", key(0), {"i": np.zeros(3, np.uint8)})
        s.put("tensors", key(0), {"t": np.zeros(3, np.float32)})
    v2 = {"images": KindVersion("1", "aaa"), "tensors": KindVersion("1", "ccc")}
    with CacheStore(tmp_path / "c") as s:
        with pytest.raises(CacheVersionError, match="'tensors'.*1/bbb.*1/ccc") as info:
            s.check_kinds(v2, "error")
        assert isinstance(info.value, RuntimeError)
        assert s.check_kinds(v2, "ignore") == []
        assert s.keys("tensors") == [key(0)]
        assert s.check_kinds(v2, "rebuild") == ["tensors"]
        assert s.keys("tensors") == [] and s.keys("images") == [key(0)]
        assert s.header()["kinds"]["tensors"] == {"version": "1", "fingerprint": "ccc"}
        assert s.check_kinds(v2, "error") == []


def test_header_records_format_library_and_engine(store):
    header = store.header()
    assert header["format"] == 3 and header["library"] and header["engine"].startswith("0.9")


def test_foreign_and_damaged_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(CacheFormatError, match="not a diskcache-ocr cache"):
        CacheStore(foreign).header()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(CacheFormatError, match="not an LMDB file"):
        CacheStore(garbage).header()
    with CacheStore(tmp_path / "old") as s:
        s.update_header(format=99)
    with pytest.raises(CacheFormatError, match="cache format 99"):
        CacheStore(tmp_path / "old").header()


def test_pickle_carries_only_path_and_options(store):
    store.put("images", key(0), {"i": np.arange(4, dtype=np.uint8)})
    blob = pickle.dumps(store)
    assert len(blob) < 500
    clone = pickle.loads(blob)
    store.close()
    assert clone.get("images", key(0))["i"].tolist() == [0, 1, 2, 3]
    clone.close()


def _child_read(path, q):
    s = CacheStore(path)
    q.put(s.get("images", key(7))["i"].tolist())


@pytest.mark.parametrize("method", ["fork", pytest.param("spawn", marks=pytest.mark.full)])
def test_children_read_a_store_the_parent_opened(tmp_path, method):
    s = CacheStore(tmp_path / "c")
    s.put("images", key(7), {"i": np.arange(5, dtype=np.uint8)})
    assert s.get("images", key(7)) is not None  # the parent has the environment open
    ctx = mp.get_context(method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(str(s.path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert results == [[0, 1, 2, 3, 4]] * 2
    # The parent keeps working after the fork closed and reopened its environment.
    assert s.get("images", key(7))["i"].tolist() == [0, 1, 2, 3, 4]
    s.close()


def test_forked_child_uses_pickled_store_object(tmp_path):
    s = CacheStore(tmp_path / "c")
    s.put("images", key(1), {"i": np.arange(3, dtype=np.uint8)})
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(s.get("images", key(1))["i"].tolist()))
    p.start()
    assert q.get(timeout=60) == [0, 1, 2]
    p.join(60)
    s.close()


READER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from diskcache_ocr.store import CacheStore
    from diskcache_ocr.hashing import content_hash
    s = CacheStore(sys.argv[1])
    seen = 0
    deadline = time.time() + 60
    print("ready", flush=True)
    while time.time() < deadline:
        n = 0
        for i in range(40):
            got = s.get("tensors", content_hash(str(i).encode()))
            if got is not None:
                assert float(got["x"][0, 0]) == float(i), i
                n += 1
        seen = max(seen, n)
        if seen == 40:
            break
        time.sleep(0.01)
    print("seen", seen, flush=True)
    """
)


def test_map_grows_from_tiny_size_while_another_process_reads(tmp_path):
    path = tmp_path / "c"
    s = CacheStore(path, map_size=1 << 16)
    s.put("tensors", key(0), {"x": np.zeros((8, 8), np.float32)})
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert reader.stdout.readline().strip() == "ready"
    for i in range(40):
        s.put("tensors", key(i), {"x": np.full((256, 256), i, np.float32)})
    out, _ = reader.communicate(timeout=90)
    assert reader.returncode == 0, out
    assert out.strip() == "seen 40"
    assert s.info()["map_size"] > 1 << 16
    s.close()


def test_stats_are_visible_from_another_process(tmp_path):
    with CacheStore(tmp_path / "c") as s:
        s.count("images", hits=3, misses=1, bytes_read=100)
        s.count("images", hits=2)
        # Nothing written yet: counting does not open a write transaction per read.
        assert s.stats()["images.hits"] == 5
    code = (
        "from diskcache_ocr.store import CacheStore;import sys;"
        "print(CacheStore(sys.argv[1], readonly=True).stats())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], text=True,
                         capture_output=True, check=True).stdout
    assert "'images.hits': 5" in out and "'images.misses': 1" in out


def test_stats_saved_when_a_worker_process_exits(tmp_path):
    s = CacheStore(tmp_path / "c")
    s.put("images", key(0), {"i": np.zeros(1, np.uint8)})
    ctx = mp.get_context("fork")
    p = ctx.Process(target=lambda: s.count("images", hits=7))
    p.start()
    p.join(60)
    assert s.stats().get("images.hits") == 7
    s.close()


def test_readonly_store(tmp_path):
    with CacheStore(tmp_path / "c") as s:
        s.put("images", key(0), {"i": np.zeros(2, np.uint8)})
    ro = CacheStore(tmp_path / "c", readonly=True)
    assert ro.get("images", key(0)) is not None
    with pytest.raises(CacheError, match="read-only"):
        ro.put("images", key(1), {"i": np.zeros(2, np.uint8)})
    ro.close()
    with pytest.raises(CacheError, match="no cache here"):
        CacheStore(tmp_path / "none", readonly=True).header()


def test_copy_makes_a_compact_readable_copy(store, tmp_path):
    for i in range(5):
        store.put("images", key(i), {"i": np.full(10000, i, np.uint8)})
    for i in range(4):
        store.delete("images", key(i))
    dest = store.copy_to(tmp_path / "copy")
    with CacheStore(dest, readonly=True) as c:
        assert c.keys("images") == [key(4)]
        assert c.get("images", key(4))["i"][0] == 4
    with pytest.raises(CacheError, match="already holds"):
        store.copy_to(dest)


def test_two_stores_on_one_directory_share_the_environment(tmp_path):
    a = CacheStore(tmp_path / "c")
    b = CacheStore(tmp_path / "c")
    a.put("images", key(1), {"i": np.ones(2, np.uint8)})
    assert b.get("images", key(1))["i"].tolist() == [1, 1]
    ro = CacheStore(tmp_path / "c", readonly=True)
    assert ro.contains("images", key(1))
    a.close()
    assert b.is_open and b.contains("images", key(1))  # b still holds the environment
    b.put("images", key(2), {"i": np.zeros(2, np.uint8)})
    b.close()
    ro.close()
    assert not (a.is_open or b.is_open or ro.is_open)
    with CacheStore(tmp_path / "c", readonly=True) as first_ro:
        first_ro.header()
        with pytest.raises(CacheError, match="already open read-only"):
            CacheStore(tmp_path / "c").put("images", key(3), {"i": np.zeros(1, np.uint8)})


def test_unsynced_writes_are_marked_with_the_boot_and_synced_at_close(tmp_path, monkeypatch):
    import diskcache_ocr.store.header as header_mod

    s = CacheStore(tmp_path / "c", sync=False)
    s.put("images", key(0), {"i": np.zeros(3, np.uint8)})
    assert s.header()["unsynced_boot"] == header_mod.boot_id()
    assert not s.unsynced_reboot()
    s.close()
    monkeypatch.setattr(header_mod, "boot_id", lambda: "another-boot")
    with CacheStore(tmp_path / "c", readonly=True) as again:
        assert again.unsynced_reboot()  # a reboot since: an OS crash may have hit it
    with CacheStore(tmp_path / "synced") as synced:
        synced.put("images", key(0), {"i": np.zeros(3, np.uint8)})
        assert "unsynced_boot" not in synced.header() and not synced.unsynced_reboot()


def test_open_survives_another_process_growing_the_map_meanwhile(tmp_path, monkeypatch):
    import diskcache_ocr.store.opening as opening_mod

    with CacheStore(tmp_path / "c") as s:
        s.put("images", key(0), {"i": np.zeros(3, np.uint8)})
    real, calls = opening_mod._check_complete, []

    def resized_once(env, path):
        calls.append(1)
        if len(calls) == 1:  # what LMDB raises when another writer grew the map mid-open
            raise lmdb.MapResizedError("mdb_txn_begin", -30785)
        return real(env, path)

    monkeypatch.setattr(opening_mod, "_check_complete", resized_once)
    with CacheStore(tmp_path / "c") as again:
        assert again.get("images", key(0)) is not None
    assert len(calls) == 2


def test_committed_records_are_exactly_encode_record_bytes(store):
    """Records go through one reused buffer per thread: each stored value must be the bytes
    encode_record gives, whatever the buffer held before (larger records, garbage)."""
    from diskcache_ocr.codec import encode_record
    from diskcache_ocr.store import WriteBatch

    rng = np.random.default_rng(1)
    records = {
        key(i): {"image": rng.integers(0, 255, (40 + 37 * i, 30, 3), np.uint8),
                 "mask": rng.random((3, 5 + i)).astype(np.float16)}
        for i in range(6)
    }
    order = [key(5), key(0), key(3), key(1), key(4), key(2)]  # large first, then smaller
    batch = WriteBatch()
    for k in order:
        batch.put("maps", k, records[k])
    store.commit(batch)
    with store.reader() as r:
        for k, arrays in records.items():
            assert bytes(r.get_raw("maps", k)) == bytes(encode_record(arrays))


def test_a_bad_array_is_refused_at_put_not_at_commit(store):
    from diskcache_ocr.store import WriteBatch

    batch = WriteBatch()
    with pytest.raises(CacheFormatError, match="cannot store dtype"):
        batch.put("images", key(0), {"a": np.array([object()])})
    assert len(batch) == 0


def test_the_encode_buffer_is_reused_then_dropped_when_idle(store, monkeypatch):
    import diskcache_ocr.store.scratch as txn_mod

    store.put("images", key(0), {"i": np.zeros((100, 100, 3), np.uint8)})
    buf = txn_mod.encode_buffer.buf
    assert buf is not None
    store.put("images", key(1), {"i": np.ones((50, 100, 3), np.uint8)})
    assert txn_mod.encode_buffer.buf is buf  # smaller records reuse it
    monkeypatch.setattr(txn_mod, "_SCRATCH_IDLE_S", 0.0)
    store.get("images", key(0))  # the end of a read block lets an idle buffer go
    assert txn_mod.encode_buffer.buf is None
    monkeypatch.setattr(txn_mod, "_SCRATCH_MAX", 1000)
    store.put("images", key(2), {"i": np.ones((50, 100, 3), np.uint8)})
    assert txn_mod.encode_buffer.buf is None  # a record over the cap gets its own buffer
    assert store.get("images", key(2))["i"].sum() == 50 * 100 * 3


def _borrowed(store):
    sh = store._sh
    return sum(slot.borrowed for slot in sh.slots.values())


def test_reader_lends_and_returns_the_slot(store):
    store.put("images", key(0), {"image": np.ones((4, 4), np.uint8)})
    with store.reader() as r:
        assert _borrowed(store) == 1
        with store.reader() as inner:  # nested blocks share this thread's transaction
            assert _borrowed(store) == 2 and inner._txn is r._txn
        assert _borrowed(store) == 1 and r.get("images", key(0)) is not None
    assert _borrowed(store) == 0
    with pytest.raises(KeyError), store.reader():
        raise KeyError("not ours")  # other errors pass through unchanged
    assert _borrowed(store) == 0


def test_reader_turns_lmdb_errors_into_cache_errors(store):
    store.put("images", key(0), {"image": np.ones((4, 4), np.uint8)})
    with pytest.raises(CacheError, match="key too long"), store.reader():
        raise lmdb.BadValsizeError("simulated")
    assert _borrowed(store) == 0
    with pytest.raises(CacheFormatError, match="cache file is damaged") as info, store.reader():
        raise lmdb.CorruptedError("simulated")
    assert info.value.__suppress_context__
    assert _borrowed(store) == 0 and store.get("images", key(0)) is not None


def test_a_damaged_record_names_its_kind_and_key(store):
    good = {"image": np.arange(64, dtype=np.float32)}
    store.put("tensors", key(1), good)
    store.put("tensors", key(2), good)
    with store.reader() as r:
        value = bytes(r.get_raw("tensors", key(1)))
        assert np.array_equal(r.get("tensors", key(1))["image"], good["image"])  # cached
    store.put("tensors", key(2), value[:-8])  # same header, payload cut short
    with pytest.raises(CacheFormatError, match=f"tensors/{key(2).hex()}: .*outside"):
        with store.reader() as r:
            r.get("tensors", key(2))


def test_verify_names_the_cache_and_the_record_of_a_damaged_one(store):
    from diskcache_ocr.store import WriteBatch

    store.put("images", key(0), {"image": np.ones((4, 4), np.uint8)})
    batch = WriteBatch()
    batch.put("images", key(1), b"garbage, not a record")
    store.commit(batch)
    found = dict(store.verify("images"))
    assert found[key(0)] is None
    message = str(found[key(1)])
    assert str(store.path) in message and f"images/{key(1).hex()}" in message
    assert list(store.verify("images", [key(2)])) == []  # a key not present is skipped
