"""The annotation index in the cache directory (diskcache_ocr.ocr.annindex) and the Catalog
over it: equal to the annotation file, rebuilt when the file's content changes (not when it
is touched) or the index is damaged, held in the process where it cannot be stored, and
shared by processes (a forked worker's private memory does not grow with the split)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.ocr import annindex
from diskcache_ocr.ocr.annotations import load_annotations
from diskcache_ocr.ocr.catalog import Catalog
from diskcache_ocr.samples import Catalog as CatalogFromSamples
from diskcache_ocr.synth import split_paths

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]


def make_split(root: Path, n: int, words: int = 5, extra: dict[str, Any] | None = None,
               seed: int = 0) -> tuple[Path, Path]:
    """``n`` (empty) images and a JSON file of ``words`` rectangles each, plus ``extra``."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    doc: dict[str, Any] = {}
    for i in range(n):
        name = f"img_{i:05d}.jpg"
        (images / name).write_bytes(b"")
        ws = {}
        for k in range(words):
            x, y = rng.uniform(0, 900, 2).round(2)
            w, h = rng.uniform(5, 90, 2).round(2)
            ws[f"{k:04d}"] = {"points": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]}
        doc[name] = {"words": ws}
    doc.update(extra or {})
    ann = root / "val.json"
    ann.write_text(json.dumps({"images": doc}), encoding="utf-8")
    return images, ann


def assert_equal_to_file(cat: Catalog, images: Path, ann: Path, rules: str = "db") -> None:
    """Field by field against the per-image reading of the same file."""
    ref = load_annotations(images, ann, rules)
    assert len(cat) == len(ref.items)
    assert cat.problems == ref.problems
    for i, item in enumerate(ref.items):
        assert cat.source(i) == item.file
        polys, ignore = cat.words(i)
        assert [p.tobytes() for p in polys] == [p.tobytes() for p in item.polygons]
        assert [p.shape for p in polys] == [p.shape for p in item.polygons]
        assert tuple(ignore.tolist()) == item.ignore
        assert tuple(cat.word_ids(i)) == item.word_ids
        assert cat.find(item.file) == i
    assert cat.annotation_set() == ref


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The annotation files parsed (not mapped) in this test."""
    seen: list[str] = []
    real = annindex.parse_json

    def spy(data: bytes, source: str, rules: str) -> Any:
        seen.append(source)
        return real(data, source, rules)

    monkeypatch.setattr(annindex, "parse_json", spy)
    return seen


def idx_files(cache: Path) -> list[Path]:
    return sorted((cache / annindex.INDEX_DIR).glob("*.idx"))


MESSY = {
    "./img_00001.jpg": {"words": {"1": {"points": SQUARE}}},  # a duplicate after normalising
    "gone.jpg": {"words": {"1": {"points": SQUARE}}},
    "../out.jpg": {},
    "img_00002.jpg": [],  # repeated: the last entry counts, at the first one's place
}


@pytest.mark.parametrize("rules", ["db", "origin"])
@pytest.mark.parametrize("extra", [None, MESSY], ids=["plain", "messy"])
def test_the_index_equals_the_annotation_file(tmp_path, rules, extra, parses):
    images, ann = make_split(tmp_path, 12, extra=extra)
    doc = json.loads(ann.read_text())
    doc["images"]["img_00003.jpg"]["words"]["bad"] = {"points": SQUARE[:3]}
    doc["images"]["img_00004.jpg"]["words"]["tie"] = {"points": [[0, 0], [9, 9], [9, 0], [0, 9]]}
    ann.write_text(json.dumps(doc))
    cache = tmp_path / "cache"
    first = Catalog.load(images, ann, rules, cache_dir=cache)
    assert len(idx_files(cache)) == 1 and parses == [str(ann)]
    warm = Catalog.load(images, ann, rules, cache_dir=cache)
    assert parses == [str(ann)]  # parsed once
    assert not warm._points.flags.writeable  # a read-only map of the file
    for cat in (first, warm, Catalog.load(images, ann, rules)):
        assert_equal_to_file(cat, images, ann, rules)


def test_a_touch_does_not_rebuild_and_an_edit_keeping_the_mtime_does(tmp_path, parses):
    images, ann = make_split(tmp_path, 5)
    cache = tmp_path / "cache"
    Catalog.load(images, ann, cache_dir=cache)
    os.utime(ann)  # touched
    Catalog.load(images, ann, cache_dir=cache)
    assert len(parses) == 1
    st = ann.stat()
    doc = json.loads(ann.read_text())
    doc["images"]["img_00000.jpg"]["words"]["0000"]["points"] = [[1, 1], [7, 1], [7, 7], [1, 7]]
    text = json.dumps(doc)
    ann.write_text(text + " " * (st.st_size - len(text)))  # same size
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert ann.stat().st_size == st.st_size and ann.stat().st_mtime_ns == st.st_mtime_ns
    cat = Catalog.load(images, ann, cache_dir=cache)
    assert len(parses) == 2
    assert cat.words(0)[0][0].tolist() == [[1, 1], [7, 1], [7, 7], [1, 7]]
    assert len(idx_files(cache)) == 2  # one per content


def test_a_warm_start_reads_not_even_the_annotation_file(tmp_path, monkeypatch):
    images, ann = make_split(tmp_path, 5)
    cache = tmp_path / "cache"
    Catalog.load(images, ann, cache_dir=cache)

    def refuse(path: Path) -> bytes:
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(annindex, "read_source", refuse)
    assert_equal_to_file(Catalog.load(images, ann, cache_dir=cache), images, ann)


@pytest.mark.parametrize("damage", ["flip a coordinate", "truncate", "foreign", "header",
                                    "a skipped word's reason"])
def test_a_damaged_index_is_rebuilt_with_a_warning(tmp_path, damage, parses, caplog):
    bad = {"img_00099.jpg": {"words": {"1": {"points": SQUARE[:3]}}}}
    images, ann = make_split(tmp_path, 6, extra=bad)
    (images / "img_00099.jpg").write_bytes(b"")
    cache = tmp_path / "cache"
    Catalog.load(images, ann, cache_dir=cache)
    (idx,) = idx_files(cache)
    raw = bytearray(idx.read_bytes())
    if damage == "flip a coordinate":
        header = json.loads(raw[16:16 + int.from_bytes(raw[12:16], "little")])
        start = -(-(16 + int.from_bytes(raw[12:16], "little")) // 64) * 64
        raw[start + header["columns"]["points"]["offset"] + 3] ^= 0x40
    elif damage == "truncate":
        raw = raw[:len(raw) // 2]
    elif damage == "foreign":
        raw = bytearray(os.urandom(len(raw)))
    elif damage == "header":
        raw[20] = ord("}")
    else:
        at = raw.index(b"got 3")
        raw[at + 4] = ord("9")  # still valid JSON, another message
    idx.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="diskcache_ocr.annindex"):
        cat = Catalog.load(images, ann, cache_dir=cache)
    assert "rebuilding the annotation index" in caplog.text and str(idx) in caplog.text
    assert len(parses) == 2
    assert_equal_to_file(cat, images, ann)
    caplog.clear()
    Catalog.load(images, ann, cache_dir=cache)  # rebuilt for good
    assert len(parses) == 2 and "rebuilding" not in caplog.text


def test_where_the_index_cannot_be_stored_it_is_held_in_the_process(tmp_path, caplog):
    images, ann = make_split(tmp_path, 4)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / annindex.INDEX_DIR).write_text("not a directory")
    with caplog.at_level(logging.INFO):
        cat = Catalog.load(images, ann, cache_dir=cache)
    assert "held in this process" in caplog.text and "cannot store" in caplog.text
    assert_equal_to_file(cat, images, ann)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ro = Catalog.load(images, ann, cache_dir=tmp_path / "other", readonly=True)
    assert "read-only" in caplog.text and not (tmp_path / "other").exists()
    assert_equal_to_file(ro, images, ann)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        Catalog.load(images, ann)
    assert "held in this process" in caplog.text


def test_a_read_only_reader_maps_an_index_that_exists(tmp_path, parses):
    images, ann = make_split(tmp_path, 4)
    cache = tmp_path / "cache"
    Catalog.load(images, ann, cache_dir=cache)
    cat = Catalog.load(images, ann, cache_dir=cache, readonly=True)
    assert len(parses) == 1 and not cat._points.flags.writeable


def test_it_pickles_as_the_index_file(tmp_path):
    images, ann = make_split(tmp_path, 300, words=20)
    cat = Catalog.load(images, ann, cache_dir=tmp_path / "cache")
    raw = pickle.dumps(cat)
    assert len(raw) < 4096  # the file's path, not 6,000 words
    back = pickle.loads(raw)
    assert_equal_to_file(back, images, ann)
    held = Catalog.load(images, ann)  # no cache: the arrays travel
    assert len(pickle.dumps(held)) > held._points.nbytes
    assert_equal_to_file(pickle.loads(pickle.dumps(held)), images, ann)


def _build(args: tuple[str, str, str]) -> list[list[float]]:
    images, ann, cache = args
    cat = Catalog.load(images, ann, cache_dir=cache)
    return [p.tolist() for i in range(len(cat)) for p in cat.words(i)[0]]


def test_processes_building_at_once_agree(tmp_path):
    images, ann = make_split(tmp_path, 40, words=30)
    cache = tmp_path / "cache"
    with mp.get_context("fork").Pool(4) as pool:
        results = pool.map(_build, [(str(images), str(ann), str(cache))] * 4)
    assert all(r == results[0] for r in results)
    (idx,) = idx_files(cache)
    assert not [p for p in (cache / annindex.INDEX_DIR).iterdir() if p.name.endswith(".tmp")]
    assert_equal_to_file(Catalog.load(images, ann, cache_dir=cache), images, ann)


def _memory_kib(key: str) -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} line")


def _worker(ds: Any, conn: Any) -> None:
    """A DataLoader worker's reads of the annotations: every image's words, and ``anns``."""
    dirty = _memory_kib("Private_Dirty")
    anns, total = ds.anns, 0
    for i, name in enumerate(anns):
        polys, _ = ds.words(i)
        points, sizes, _ = ds.flat_words(i)
        total += len(polys) + int(sizes.sum()) + len(anns[name]) + len(ds.source(i))
    conn.send((_memory_kib("Anonymous"), _memory_kib("Private_Dirty") - dirty, total))


def _main_process(config: dict[str, Any], conn: Any) -> None:
    """A training process: a warm construction, ``anns`` read (the evaluation does), then a
    forked worker that reads everything."""
    from diskcache_ocr.origin import ValidatedOCRDataset

    ds = ValidatedOCRDataset(config)
    assert list(ds.anns.keys())
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    worker = ctx.Process(target=_worker, args=(ds, theirs))
    worker.start()
    conn.send(mine.recv())
    worker.join()


@pytest.mark.full  # (processes that build two splits: some seconds)
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux smaps")
def test_a_forked_workers_memory_does_not_grow_with_the_split(tmp_path):
    """Each size runs in a fresh process forked from this one (the same starting point); the
    worker's anonymous memory (its own and what it shares with its parent) is compared."""
    from diskcache_ocr.origin import ValidatedOCRDataset

    ctx, words, seen, configs = mp.get_context("fork"), 40, {}, {}
    for n in (300, 3000):
        images, ann = make_split(tmp_path / str(n), n, words=words, seed=n)
        configs[n] = {"image_path": str(images), "annotation_path": str(ann),
                      "cache_dir": str(tmp_path / "cache")}
        ValidatedOCRDataset(configs[n])  # the index is built once, before training starts
    for n, config in configs.items():
        mine, theirs = ctx.Pipe()
        main = ctx.Process(target=_main_process, args=(config, theirs))
        main.start()
        anonymous, dirtied, total = mine.recv()
        main.join()
        assert main.exitcode == 0 and total > n * words
        seen[n] = (anonymous, dirtied)
    # Held as Python objects, 40 words cost some 30 KiB an image (80 MiB for the 2,700 more
    # images); the bound is 1 KiB an image plus 4 MiB of allocator noise.
    assert seen[3000][0] - seen[300][0] <= 4096 + 2700, seen
    assert seen[3000][1] <= 4096 + 2700, seen  # pages the worker made its own


def test_the_dataset_maps_the_index_in_its_cache(synth_data, tmp_path):
    images, ann = split_paths(synth_data(4, 3, min_words=2, max_words=6, size=(120, 160)))
    ds = CachedOCRDataset(images, ann, tmp_path / "c", preset="balanced")
    assert len(idx_files(tmp_path / "c")) == 1 and not ds.catalog._points.flags.writeable
    assert_equal_to_file(ds.catalog, images, ann)
    assert CatalogFromSamples is Catalog
    none = CachedOCRDataset(images, ann, tmp_path / "n", preset="none")
    assert not (tmp_path / "n").exists() and none.catalog._points.flags.writeable


def test_clearing_the_cache_removes_the_index_and_refuses_a_planted_link(synth_data, tmp_path):
    from diskcache_ocr.errors import CacheError
    from diskcache_ocr.store.wipe import wipe

    images, ann = split_paths(synth_data(4, 3, min_words=2, max_words=6, size=(120, 160)))
    for name, plant in (("plain", False), ("planted", True)):
        cache = tmp_path / name
        ds = CachedOCRDataset(images, ann, cache, preset="balanced")
        del ds
        if plant:
            (cache / annindex.INDEX_DIR / "x.idx").symlink_to(ann)
            with pytest.raises(CacheError, match="not a plain file"):
                wipe(cache)
            assert ann.exists() and (cache / "data.mdb").exists()
            continue
        removed = wipe(cache)
        assert any(f.endswith(".idx") for f in removed["files"]) and not cache.exists()


@pytest.mark.parametrize("extra", [None, {"gone.jpg": {}}], ids=["empty", "nothing usable"])
def test_a_split_without_images_has_an_index_too(tmp_path, extra):
    images, ann = make_split(tmp_path, 0, extra=extra)
    for _ in range(2):  # built, then mapped
        cat = Catalog.load(images, ann, cache_dir=tmp_path / "cache")
        assert len(cat) == 0 and cat.find("gone.jpg") is None
        assert len(pickle.loads(pickle.dumps(cat))) == 0
        assert_equal_to_file(cat, images, ann)
