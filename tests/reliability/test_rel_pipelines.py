"""Several pipelines in one cache directory: the README's layout (train and val in one
``cache/``, each with its own Compose), one Compose read both ``float32`` and ``compact``,
the "db" and "origin" conventions on one images directory. Each pipeline's records live
beside the others', each read back bit for bit as its pipeline computes it; ``rebuild``
drops only the records of the pipeline being rebuilt; ``clear --stale`` removes what no
registered pipeline reaches; ``status`` lists the pipelines; a format-2 cache upgrades."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from diskcache_ocr import CachedOCRDataset, finish_batch, ops
from diskcache_ocr.errors import CacheFormatError, CacheVersionError
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")

N = 4
EVERYTHING = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}


def _compose(side, *tail):
    return A.Compose([A.LongestMaxSize(side), A.PadIfNeeded(side, side, border_mode=0, value=0),
                      *tail, A.Normalize((0.5,) * 3, (0.25,) * 3)],
                     keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """The README's layout: images/{train,val} and jsons/{train,val}.json under one root."""
    root = tmp_path_factory.mktemp("readme-layout")
    for split, seed in (("train", 31), ("val", 32)):
        synthesize(root, N, split=split, seed=seed, min_words=2, max_words=6, size=(150, 190))
    return root


def _open(root, split, cache, transform, **kw):
    images, annotations = split_paths(root, split)
    preset = EVERYTHING if cache is not None else {"load_maps": True}
    return CachedOCRDataset(images, annotations, cache, preset=preset, split=split,
                            transform=transform, **kw)


def _arrays(sample):
    out = {k: np.ascontiguousarray(np.asarray(sample[k])) for k in
           ("image", "prob_map", "prob_mask", "thresh_map", "thresh_mask", "inverse_matrix")
           if k in sample}
    out["polygons"] = [np.asarray(p) for p in sample["polygons"]]
    return out


def _same(got, want):
    assert got.keys() == want.keys()
    for name in got:
        if name == "polygons":
            assert len(got[name]) == len(want[name])
            for a, b in zip(got[name], want[name], strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            assert got[name].dtype == want[name].dtype, name
            assert got[name].tobytes() == want[name].tobytes(), name


def _read_all(ds, close=False):
    out = [_arrays(ds[i]) for i in range(len(ds))]
    if close:
        ds.close()
    return out


def _reference(root, split, transform, **kw):
    return _read_all(_open(root, split, None, transform, **kw))


def _hits_misses(ds, kind="tensors"):
    stats = ds.stats()
    return stats.get(f"{kind}.hits", 0), stats.get(f"{kind}.misses", 0)


def _read_counting(ds):
    before = _hits_misses(ds)
    out = _read_all(ds)
    after = _hits_misses(ds)
    return out, (after[0] - before[0], after[1] - before[1])


# -- the README's layout ----------------------------------------------------------------------
def test_train_and_val_with_their_own_compose_share_one_cache(readme, tmp_path):
    cache = tmp_path / "cache"
    train_t, val_t = _compose(96), _compose(128)
    want = {"train": _reference(readme, "train", train_t), "val": _reference(readme, "val", val_t)}
    for split, t in (("train", train_t), ("val", val_t)):  # first epoch of each: computed
        _, (hits, misses) = _read_counting(_open(readme, split, cache, t))
        assert (hits, misses) == (0, N)
    for split, t in (("train", train_t), ("val", val_t), ("train", train_t)):
        got, (hits, misses) = _read_counting(_open(readme, split, cache, t))
        assert (hits, misses) == (N, 0), split  # each reads its own records
        for g, w in zip(got, want[split], strict=True):
            _same(g, w)


def test_rebuild_drops_only_the_records_of_the_changed_pipeline(readme, tmp_path):
    cache = tmp_path / "cache"
    val_t = _compose(128)
    for split, t in (("train", _compose(96)), ("val", val_t)):
        _read_all(_open(readme, split, cache, t))
    with CacheStore(cache, readonly=True) as store:
        val_keys = set(store.keys("tensors"))
    changed = _compose(96, A.ToGray(p=1.0))
    with pytest.raises(CacheVersionError, match="train"):
        _open(readme, "train", cache, changed)  # the default policy still refuses
    want_train = _reference(readme, "train", changed)
    got, (hits, misses) = _read_counting(_open(readme, "train", cache, changed,
                                               on_mismatch="rebuild"))
    assert (hits, misses) == (0, N)
    for g, w in zip(got, want_train, strict=True):
        _same(g, w)
    for _ in range(2):  # train runs again: val's records stay, all served as hits
        _read_all(_open(readme, "train", cache, changed, on_mismatch="rebuild"))
        got, (hits, misses) = _read_counting(_open(readme, "val", cache, val_t))
        assert (hits, misses) == (N, 0)
        for g, w in zip(got, _reference(readme, "val", val_t), strict=True):
            _same(g, w)
    with CacheStore(cache, readonly=True) as store:
        tensors = set(store.keys("tensors"))
    # val's N records and the new train's N: the old train's are gone
    assert len(tensors) == 2 * N and len(val_keys - tensors) == N


# -- one Compose, two output forms ------------------------------------------------------------
def test_one_compose_read_compact_after_float32(readme, tmp_path):
    cache = tmp_path / "cache"
    t = _compose(96)
    want = _reference(readme, "val", t)
    for output in ("float32", "compact", "float32", "compact"):
        ds = _open(readme, "val", cache, t, output=output)
        for i in range(N):
            if output == "compact":
                batch = finish_batch(ds.collate_fn()([ds[i]]))
                assert torch.equal(batch["image"][0], torch.from_numpy(want[i]["image"]))
                assert np.array_equal(batch["prob_map"][0].numpy(), want[i]["prob_map"])
            else:
                _same(_arrays(ds[i]), want[i])
    hits, misses = _hits_misses(ds)
    assert misses == 2 * N and hits == 2 * N  # each form computed once, then read


# -- the "db" and "origin" conventions on one images directory --------------------------------
@pytest.fixture(scope="module")
def alpha_data(tmp_path_factory):
    """PNGs with a varying alpha channel: the db decode composes them over white, the origin
    decode drops the alpha."""
    root = tmp_path_factory.mktemp("alpha")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    doc = {"images": {}}
    for i in range(3):
        rgba = rng.integers(0, 256, (60, 80, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(images / f"p{i}.png")
        doc["images"][f"p{i}.png"] = {"words": {"0001": {
            "points": [[5, 5], [40, 5], [40, 20], [5, 20]]}}}
    annotations = root / "val.json"
    annotations.write_text(json.dumps(doc))
    return images, annotations


IMAGES_ONLY = {"load_maps": True, "cache_config": {"cache_images": True}}


def _conv(alpha_data, cache, convention):
    images, annotations = alpha_data
    return CachedOCRDataset(images, annotations, cache, convention=convention, item_keys="db",
                            preset=IMAGES_ONLY if cache is not None else {"load_maps": True})


def test_db_and_origin_decodes_of_one_file_never_share_a_record(alpha_data, tmp_path):
    cache = tmp_path / "cache"
    want = {c: _read_all(_conv(alpha_data, None, c)) for c in ("db", "origin")}
    assert not np.array_equal(want["db"][0]["image"], want["origin"][0]["image"])
    for convention in ("db", "origin", "db", "origin"):
        ds = _conv(alpha_data, cache, convention)
        for g, w in zip(_read_all(ds), want[convention], strict=True):
            _same(g, w)
    with CacheStore(cache, readonly=True) as store:
        assert len(store.keys("images")) == 2 * 3  # one decoded image per file per decode
        names = {n for _, e in store.iter_index() for n in e.keys}
    assert "images" in names and any(n.startswith("images:") for n in names)


# -- clear --stale, status, health ------------------------------------------------------------
def test_clear_stale_keeps_every_registered_pipeline_and_drops_the_rest(readme, tmp_path,
                                                                        capsys):
    from testkit import run_cli

    cache = tmp_path / "cache"
    t, val_t = _compose(96), _compose(128)
    _read_all(_open(readme, "train", cache, t))
    for output in ("float32", "compact"):
        _read_all(_open(readme, "val", cache, val_t, output=output))
    with CacheStore(cache) as store:
        store.put("tensors", b"\x01" * 32, {"x": np.zeros(3, np.float32)})  # nobody's record
        before = {k: set(store.keys(k)) for k in ("images", "tensors", "maps")}
    report = ops.clear(cache, stale=True)
    assert report["removed"]["tensors"] == 1 and report["removed"]["maps"] == 0
    with CacheStore(cache, readonly=True) as store:
        assert set(store.keys("tensors")) == before["tensors"] - {b"\x01" * 32}
        assert set(store.keys("maps")) == before["maps"]
    for output in ("float32", "compact"):
        _, (hits, misses) = _read_counting(_open(readme, "val", cache, val_t, output=output))
        assert (hits, misses) == (N, 0)

    # status lists the three pipelines, with their kinds and entries
    rc, out, _ = run_cli(capsys, "status", "--cache", cache, "--json")
    assert rc == 0
    pipelines = json.loads(out)["pipelines"]
    assert len(pipelines) == 3
    roles = sorted(p["role"] for p in pipelines)
    assert sum("split=train" in r for r in roles) == 1
    assert sum("output=compact" in r for r in roles) == 1
    for p in pipelines:
        assert set(p["kinds"]) == {"images", "tensors", "maps"}
        assert p["kinds"]["tensors"]["entries"] == N and p["kinds"]["maps"]["entries"] == N
        assert p["id"]
    rc, out, _ = run_cli(capsys, "status", "--cache", cache)
    assert rc == 0 and "split=train" in out and "output=compact" in out
    with CacheStore(cache) as store:
        store.reset_stats()  # (a first epoch of each is all misses: not what is checked here)
    rc, out, _ = run_cli(capsys, "health", "--cache", cache, "--json")
    assert rc == 0 and json.loads(out) == {"ok": True, "problems": []}, out

    # a pipeline no longer registered: clear --stale removes the records only it reached
    with CacheStore(cache) as store:
        header = store.header()
        compact_role = next(r for r in header["pipelines"] if "output=compact" in r)
        store.update_header(pipelines={r: p for r, p in header["pipelines"].items()
                                       if r != compact_role})
    report = ops.clear(cache, stale=True)
    assert report["removed"]["tensors"] == N  # compact's uint8 tensors (its maps are shared)
    with CacheStore(cache, readonly=True) as store:
        assert len(store.keys("tensors")) == 2 * N
        for _, entry in store.iter_index():
            for kind, key in entry.records():
                assert store.contains(kind, key)
    _, (hits, misses) = _read_counting(_open(readme, "val", cache, val_t))
    assert (hits, misses) == (N, 0)


# -- a cache of the previous format ------------------------------------------------------------
def _as_format_2(cache: Path) -> None:
    """Rewrite a cache as the previous format wrote it: one set of kinds in the header, each
    index entry naming its records by kind alone, every decoded image keyed by its source's
    content alone (whatever decoded it)."""
    import lmdb

    env = lmdb.open(str(cache), max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        meta, index = env.open_db(b"meta", txn=txn), env.open_db(b"index", txn=txn)
        images = env.open_db(b"images", txn=txn)
        header = msgpack.unpackb(txn.get(b"header", db=meta), raw=False)
        header["format"] = 2
        header.pop("pipelines"), header.pop("plain")
        txn.put(b"header", msgpack.packb(header, use_bin_type=True), db=meta)
        for key, raw in list(txn.cursor(index)):
            entry = msgpack.unpackb(bytes(raw), raw=False)
            names = entry["keys"]
            for name in [n for n in names if n.startswith("images:")]:
                record = bytes(txn.get(names[name], db=images))
                txn.delete(names.pop(name), db=images)
                txn.put(entry["content_hash"], record, db=images)
                names["images"] = entry["content_hash"]
            entry["keys"] = {n.partition(":")[0]: v for n, v in names.items()}
            txn.put(bytes(key), msgpack.packb(entry, use_bin_type=True), db=index)
    env.close()


def test_a_format_2_cache_upgrades_and_is_read(readme, tmp_path):
    cache = tmp_path / "cache"
    t = _compose(128)
    want = _reference(readme, "val", t)
    _read_all(_open(readme, "val", cache, t), close=True)
    _as_format_2(cache)
    with pytest.raises(CacheFormatError, match="read-write"):
        _open(readme, "val", cache, t, readonly=True)
    got, (hits, misses) = _read_counting(_open(readme, "val", cache, t))
    assert (hits, misses) == (N, 0)  # its records, found by the upgraded index
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    with CacheStore(cache, readonly=True) as store:
        header = store.header()
        assert header["format"] == 3 and list(header["pipelines"]) == [
            next(iter(header["pipelines"]))] and "legacy" not in header["pipelines"]
    # and the train pipeline now lives beside it
    _read_all(_open(readme, "train", cache, _compose(96)))
    _, (hits, misses) = _read_counting(_open(readme, "val", cache, t))
    assert (hits, misses) == (N, 0)


def test_a_format_2_cache_of_another_decode_never_serves_its_images_as_ours(alpha_data,
                                                                           tmp_path):
    """Format 2 keyed every decoded image by content alone, whatever decoded it: an origin
    decode's images must not be read as the library's own decode after the upgrade."""
    cache = tmp_path / "cache"
    want = _read_all(_conv(alpha_data, None, "db"))
    _read_all(_conv(alpha_data, cache, "origin"), close=True)
    _as_format_2(cache)
    got = _read_all(_conv(alpha_data, cache, "db"))
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    # and the origin decode reads its own again (computed once more, then cached)
    want = _read_all(_conv(alpha_data, None, "origin"))
    for _ in range(2):
        for g, w in zip(_read_all(_conv(alpha_data, cache, "origin")), want, strict=True):
            _same(g, w)


def test_a_damaged_pipelines_field_is_refused(tmp_path):
    cache = tmp_path / "cache"
    with CacheStore(cache) as store:
        store.update_header(pipelines={"r": {"kinds": {"tensors": "x"}}})
    with pytest.raises(CacheFormatError, match="pipelines"):
        CacheStore(cache, readonly=True).header()


def test_an_upgrade_keeps_names_the_engine_uses(readme, tmp_path):
    """After an upgrade, every index entry names its records by kind and version, exactly as
    a fresh read-through names them."""
    cache = tmp_path / "cache"
    t = _compose(128)
    _read_all(_open(readme, "val", cache, t), close=True)
    with CacheStore(cache, readonly=True) as store:
        fresh = {s: dict(e.keys) for s, e in store.iter_index()}
    _as_format_2(cache)
    _open(readme, "val", cache, t).close()
    with CacheStore(cache, readonly=True) as store:
        assert {s: dict(e.keys) for s, e in store.iter_index()} == fresh


def test_an_index_entry_names_the_records_of_many_pipelines():
    from diskcache_ocr.schema import MAX_NAMES, IndexEntry, record_name

    names = {record_name("tensors", f"{i:032x}"): bytes([i % 256]) * 32 for i in range(40)}
    entry = IndexEntry(1, 2, b"h" * 32, keys=names)
    assert IndexEntry.unpack(entry.pack(), "x").keys == names
    assert MAX_NAMES >= 3 * 64  # (each kind of 64 pipeline versions reading one source)


def test_ignore_serves_the_roles_stored_records_and_leaves_the_others(readme, tmp_path):
    cache = tmp_path / "cache"
    train_t, val_t = _compose(96), _compose(128)
    for split, t in (("train", train_t), ("val", val_t)):
        _read_all(_open(readme, split, cache, t), close=True)
    want = _reference(readme, "train", train_t)
    ds = _open(readme, "train", cache, _compose(96, A.ToGray(p=1.0)), on_mismatch="ignore")
    got, (hits, misses) = _read_counting(ds)
    assert (hits, misses) == (N, 0)  # the stored train records, as the policy says
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    ds.close()
    _, (hits, misses) = _read_counting(_open(readme, "val", cache, val_t))
    assert (hits, misses) == (N, 0)
    _, (hits, misses) = _read_counting(_open(readme, "train", cache, train_t))
    assert (hits, misses) == (N, 0)  # nothing of the ignored pipeline was written
