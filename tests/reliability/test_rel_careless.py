"""Careless use: in-place edits of returned tensors, samples kept after close, one dataset
iterated from several threads, a dataset pickled mid-epoch. Each works or is a clear error;
the risky ones run in a child process, whose exit must not be a signal."""

from __future__ import annotations

import json
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch
from relhelp import Child, copy_images, sample_digest, unbatch


def careless(images: str, annotations: str, cache: str, out: str) -> int:
    """Child: everything a careless user might do; writes what each step gave."""
    from torch.utils.data import DataLoader

    from diskcache_ocr.dataset import CachedOCRDataset, collate
    from diskcache_ocr.errors import CacheClosedError
    from diskcache_ocr.loader import BatchLoader, split_batch
    from diskcache_ocr.store import CacheStore

    results: dict[str, object] = {}
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          preload=False)
    digests = {}
    for _epoch in range(2):  # the first computes, the second reads the cache
        for i in range(len(ds)):
            s = ds[i]
            digests.setdefault(s["meta"]["file"], []).append(sample_digest(s))
            s["image"].add_(1)  # in place, on what the cache returned
            s["prob_map"].mul_(-3)
            s["inverse_matrix"].zero_()
    for i in range(len(ds)):  # nothing of those edits reached the cache
        digests[ds.source(i)].append(sample_digest(ds[i]))
    with BatchLoader(ds, batch_size=3, threads=2) as bl:
        for batch in bl:
            for s in split_batch(batch):
                digests[s["meta"]["file"]].append(sample_digest(s))
            batch["image"].fill_(7)
            batch["thresh_map"].add_(1)
        for batch in bl:
            for s in split_batch(batch):
                digests[s["meta"]["file"]].append(sample_digest(s))
    results["digests"] = digests
    kept = [ds[i] for i in range(3)]
    kept_digests = [sample_digest(s) for s in kept]
    ds.close()
    ds.store.close() if ds.store is not None else None
    results["kept_after_close"] = [sample_digest(s) for s in kept] == kept_digests
    results["used_after_close"] = sample_digest(ds[0]) == digests[ds.source(0)][0]
    store = CacheStore(cache)
    key = next(iter(store.keys("maps")))
    with store.reader() as r:
        rec = r.get("maps", key)
    try:
        rec["prob_map"]
        results["view_after_block"] = "no error"
    except CacheClosedError as exc:
        results["view_after_block"] = f"CacheClosedError: {exc}"
    with store.reader() as r:
        view = r.get("maps", key)["prob_map"]
        try:
            view[0, 0, 0] = 1  # a view on the map is read-only
            results["write_to_view"] = "no error"
        except ValueError as exc:
            results["write_to_view"] = f"ValueError: {exc}"
    store.close()
    # pickled mid-epoch, the copy used here and in DataLoader workers
    it = iter(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate))
    next(it)
    copy = pickle.loads(pickle.dumps(ds))
    results["pickled_copy"] = [sample_digest(s) for b in DataLoader(
        copy, batch_size=2, num_workers=2, collate_fn=collate) for s in unbatch(b)]
    results["rest_of_epoch"] = sum(len(b["meta"]) for b in it)
    Path(out).write_text(json.dumps(results))
    return 0


def test_careless_use_in_a_child(tiny, references, tmp_path):
    images = tmp_path / "images"
    copy_images(tiny.images, images)
    out = tmp_path / "out.json"
    child = Child(careless, str(images), str(tiny.annotations), str(tmp_path / "cache"),
                  str(out), log=tmp_path / "log")
    rc = child.join(300)
    assert rc == 0, f"exit {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "") \
        + f"\n{child.log_text()}"
    got = json.loads(out.read_text())
    for name, digests in got["digests"].items():
        assert set(digests) == {references[name]}, name  # 2 epochs, after edits, 2 loader epochs
        assert len(digests) == 5
    assert got["kept_after_close"] and got["used_after_close"]
    assert got["view_after_block"].startswith("CacheClosedError: ")
    assert got["write_to_view"].startswith("ValueError: ")
    assert sorted(got["pickled_copy"]) == sorted(references.values())
    assert got["rest_of_epoch"] == len(tiny.names) - 2


@pytest.mark.parametrize("fresh", [False, True], ids=["warm", "cold-tiny-map"])
def test_one_dataset_from_four_threads(tiny, references, tmp_path, fresh):
    from diskcache_ocr.dataset import CachedOCRDataset

    images = tmp_path / "images"
    copy_images(tiny.images, images)
    options = {"map_size": 1 << 16} if fresh else None
    ds = CachedOCRDataset(images, tiny.annotations, tmp_path / "cache",
                          preset="validation_optimized", preload=not fresh,
                          store_options=options)
    bad: list[str] = []

    def run(t: int) -> None:
        try:
            for k in range(3):
                for i in range(len(ds)):
                    j = (i * (t + 1) + k) % len(ds)
                    s = ds[j]
                    if sample_digest(s) != references[ds.source(j)]:
                        bad.append(f"thread {t}: {ds.source(j)} {s['meta']['error']}")
                    s["image"].add_(1)
        except Exception as exc:  # noqa: BLE001 - any exception fails the test below
            bad.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    ds.close()
    assert bad == []


def test_pickle_round_trip_keeps_no_environment(tiny, tmp_path):
    from diskcache_ocr.dataset import CachedOCRDataset

    ds = CachedOCRDataset(tiny.images, tiny.annotations, tmp_path / "cache",
                          preset="validation_optimized", preload=False)
    ds[0]
    assert ds.store is not None and ds.store.is_open
    blob = pickle.dumps(ds)
    assert b"lmdb" not in blob.lower() or b"Environment" not in blob
    copy = pickle.loads(blob)
    assert not copy.store.is_open
    assert torch.equal(copy[1]["image"], ds[1]["image"])
    ds.close()
    copy.close()
