"""Concurrency: four readers while a prebuild writes, the watcher invalidates and a fifth
process rewrites the sources; every sample read is one of the two known contents of its file,
whole (image and maps of the same content). Reader slots of killed readers are reclaimed."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from relhelp import (
    Child,
    copy_images,
    hold_reader,
    part_digests,
    prebuild_until,
    read_and_check,
    rewrite_sources,
    run_serve,
    sample_digest,
    wait_for,
)

MODES = ("getitem", "getitems", "dataloader", "batchloader")
REWRITES = 150
JOIN_S = 120.0


@pytest.fixture(scope="module")
def two_contents(tiny, tiny_alt, tmp_path_factory):
    """Digests of the fresh, uncached samples of both contents of every file."""
    from diskcache_ocr.dataset import CachedOCRDataset

    refs: dict[str, dict] = {}
    for label, data in (("0", tiny), ("1", tiny_alt)):
        ds = CachedOCRDataset(data.images, tiny.annotations, None, preset={"load_maps": True})
        for i in range(len(ds)):
            sample = ds[i]
            ref = refs.setdefault(ds.source(i), {"whole": {}, "parts": {}})
            ref["whole"][label] = sample_digest(sample)
            ref["parts"][label] = part_digests(sample)
    path = tmp_path_factory.mktemp("refs") / "refs.json"
    path.write_text(json.dumps(refs))
    return path, refs


def _run_scenario(tiny, tiny_alt, two_contents, tmp_path: Path, rewrites: int, seed: int,
                  min_epochs: int) -> None:
    from diskcache_ocr import ops
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.store import CacheStore

    refs_path, refs = two_contents
    live, cache, stop = tmp_path / "images", tmp_path / "cache", tmp_path / "stop"
    copy_images(tiny.images, live)
    with CacheStore(cache) as store:  # the watcher needs a cache to watch
        store.header()
    ready = tmp_path / "watch-ready"
    watcher = Child(run_serve, str(cache), str(live), str(tiny.annotations), str(ready),
                    log=tmp_path / "watch.log")
    wait_for(lambda: ready.exists() or watcher.proc.exitcode is not None, 60, "the watcher")
    assert watcher.proc.exitcode is None, watcher.log_text()
    readers = [Child(read_and_check, str(live), str(tiny.annotations), str(cache),
                     str(refs_path), mode, str(stop), min_epochs, 200, seed + i,
                     str(tmp_path / f"reader-{i}.json"), log=tmp_path / f"reader-{i}.log")
               for i, mode in enumerate(MODES)]
    argv = ["prebuild", "--images", str(live), "--annotations", str(tiny.annotations),
            "--cache", str(cache), "--workers", "2", "--json"]
    builder = Child(prebuild_until, argv, str(stop), str(tmp_path / "builder.json"),
                    log=tmp_path / "builder.log")
    contents = {n: [str(tiny.images / n), str(tiny_alt.images / n)] for n in tiny.names}
    rewriter = Child(rewrite_sources, str(live), contents, rewrites, seed,
                     str(tmp_path / "rewriter.json"), log=tmp_path / "rewriter.log")
    try:
        assert rewriter.join(JOIN_S) == 0, rewriter.log_text()
        stop.touch()
        for i, reader in enumerate(readers):
            assert reader.join(JOIN_S) == 0, f"reader {MODES[i]}:\n{reader.log_text()}"
        assert builder.join(JOIN_S) == 0, builder.log_text()
        watcher.kill(signal.SIGTERM)
        assert watcher.join(60) == 0, watcher.log_text()
    finally:
        for child in (*readers, builder, rewriter, watcher):
            child.kill()
    invalidated = re.search(r"(\d+) sources? invalidated", watcher.log_text())
    assert invalidated and int(invalidated.group(1)) > 0, watcher.log_text()
    assert json.loads((tmp_path / "builder.json").read_text())["runs"] >= 1
    total, contents = 0, {"0": 0, "1": 0}
    for i, mode in enumerate(MODES):
        result = json.loads((tmp_path / f"reader-{i}.json").read_text())
        assert result["bad"] == [], f"reader {mode}: " + "\n".join(result["bad"][:10])
        assert result["epochs"] >= min_epochs
        total += result["samples"]
        for label, n in result["contents"].items():
            contents[label] += n
    print(f"{total} samples checked by {len(MODES)} readers during {rewrites} rewrites "
          f"(contents seen: {contents}); the watcher invalidated {invalidated.group(1)}")
    assert min(contents.values()) > 0  # both contents of the files were read
    assert ops.verify(cache)["corrupt"] == []
    # Whatever the interleaving, the cache now serves exactly the files' final contents.
    final = json.loads((tmp_path / "rewriter.json").read_text())
    ds = CachedOCRDataset(live, tiny.annotations, cache, preset="validation_optimized",
                          preload=False)
    for i in range(len(ds)):
        name = ds.source(i)
        assert sample_digest(ds[i]) == refs[name]["whole"][str(final[name])], name
    ds.close()


def test_four_readers_prebuild_watcher_and_rewriter(tiny, tiny_alt, two_contents, tmp_path):
    _run_scenario(tiny, tiny_alt, two_contents, tmp_path, REWRITES, seed=11, min_epochs=2)


@pytest.mark.slow
def test_concurrency_soak(tiny, tiny_alt, two_contents, tmp_path):
    _run_scenario(tiny, tiny_alt, two_contents, tmp_path, 600, seed=12, min_epochs=10)


def test_reader_slots_of_killed_readers_are_reclaimed(tmp_path):
    """With every slot held, a new reader gets a clear CacheError (not a hang); once the
    holders are killed, `reader_check` / `health` free their slots and readers work again."""
    import numpy as np

    from diskcache_ocr import ops
    from diskcache_ocr.store import CacheStore

    slots, cache = 4, tmp_path / "cache"
    store = CacheStore(cache, max_readers=slots)  # the first opener fixes the table size
    store.put("images", b"k" * 32, {"image": np.zeros((2, 2, 3), np.uint8)})
    # This process holds one slot while a read block is open (an idle reader holds none).
    held = store.reader()
    assert held.__enter__().get("images", b"k" * 32) is not None

    def holders(n: int, tag: str) -> tuple[list[Child], list[Path]]:
        marks = [tmp_path / f"{tag}-{i}" for i in range(n)]
        kids = [Child(hold_reader, str(cache), slots, str(m), 300.0, log=tmp_path / f"{m}.log")
                for m in marks]
        for m in marks:
            # (the file exists a moment before its text is written)
            wait_for(lambda m=m: m.exists() and m.read_text() != "", 60,
                     f"{m.name} to hold its slot")
        return kids, marks

    kids, marks = holders(slots - 1, "holder")
    assert all(m.read_text() == "holding" for m in marks)
    late, late_marks = holders(2, "late")  # more processes than slots
    for kid in late:
        assert kid.join(60) == 0
    for m in late_marks:
        assert m.read_text().startswith("CacheError: ") and "reader slots" in m.read_text()
    for kid in kids:
        kid.kill()
        assert kid.join(60) == -signal.SIGKILL
    # The dead holders still own their slots ...
    again, again_marks = holders(1, "again")
    assert again[0].join(60) == 0 and again_marks[0].read_text().startswith("CacheError")
    # ... until health (reader_check) frees them.
    report = ops.health(cache)
    assert any(p["code"] == "stale_readers" for p in report["problems"]), report
    assert store.reader_check() == 0
    after, after_marks = holders(slots - 1, "after")
    assert all(m.read_text() == "holding" for m in after_marks)
    for kid in after:
        kid.kill()
        kid.join(60)
    assert store.reader_check() == slots - 1
    held.__exit__(None, None, None)
    store.close()


def test_a_touched_source_keeps_every_record_named_in_the_index(tiny, tmp_path):
    """A file touched (same bytes, new mtime) is re-indexed from records found by content;
    the new entry must still name all of them, or invalidating it later leaks records."""
    import os

    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.schema import source_id
    from diskcache_ocr.store import CacheStore
    from diskcache_ocr.watch import Watcher

    images, cache = tmp_path / "images", tmp_path / "cache"
    copy_images(tiny.images, images)
    ds = CachedOCRDataset(images, tiny.annotations, cache, preset="validation_optimized",
                          preload=False)
    ds[0]
    name = ds.source(0)
    st = os.stat(images / name)
    os.utime(images / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds[0]
    ds.close()
    written = set(ds.plan.serve_writes)  # what a read-through miss writes
    assert {"tensors", "maps"} <= written
    with CacheStore(cache) as store:
        named = store.get_index(source_id(images, name)).records()
        assert {kind for kind, _ in named} == written
    watcher = Watcher(cache, images, tiny.annotations)
    assert watcher.invalidate([name]) == 1
    watcher.stop()
    with CacheStore(cache) as store:
        assert all(store.kind_stats(k)["entries"] == 0 for k in ("images", "tensors", "maps"))
