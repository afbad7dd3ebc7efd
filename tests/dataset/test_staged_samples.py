"""A stage pipeline's batches packed into batch rows: once a process has packed one batch, a
hit is copied straight from the cache into its row; the values stay the user's pipeline's,
bit for bit, also when the learned shapes are wrong for a batch and while older batches are
still held."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.ocr.conventions import get_convention
from diskcache_ocr.staged_samples import StageBuffers, StageLayout, take_record
from diskcache_ocr.synth import split_paths, synthesize

N = 6
PRESET = {"load_maps": True, "cache_config": {
    "cache_images": False, "cache_transformed_tensors": True, "cache_maps": True}}


def square(image, polygons):
    """A user's deterministic transform: scale to 64 × 64, float32 CHW."""
    h, w = image.shape[:2]
    out = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    moved = [np.asarray(p, np.float64) * [64 / w, 64 / h] for p in polygons]
    inverse = np.diag([w / 64, h / 64, 1.0])
    return out.transpose(2, 0, 1).astype(np.float32) / 255, moved, inverse


def by_orientation(image, polygons):
    """Like :func:`square`, but landscape pages come out 48 × 64: batches of mixed shapes."""
    out, moved, inverse = square(image, polygons)
    h, w = image.shape[:2]
    if w > h:
        out = np.ascontiguousarray(out[:, :48])
    return out, moved, inverse


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("staged-samples")
    # seed 11 gives both orientations, which the mixed-shape batches need (asserted there)
    synthesize(root, N, seed=11, min_words=2, max_words=5, size=(120, 150), exif_fraction=0.0)
    return root


def make(data, cache, transform):
    images, annotations = split_paths(data)
    return CachedOCRDataset(images, annotations, cache, preset=PRESET, transform=transform,
                            transform_version=transform.__name__, item_keys="db")


def expected(ds, transform):
    """The user's pipeline without the cache, per index."""
    out = {}
    for i in range(len(ds)):
        path = ds.images_dir / ds.source(i)
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        words, ignore = ds.words(i)
        img, moved, _ = transform(image, [np.asarray(p, np.float64) for p in words])
        maps = get_convention("db").maps(moved, img.shape[1], img.shape[2], ignore)
        out[i] = {"image": img, **maps}
    return out


def check(samples, indices, want):
    for s, i in zip(samples, indices, strict=True):
        for name, arr in want[i].items():
            got = s[name].numpy() if isinstance(s[name], torch.Tensor) else s[name]
            assert got.dtype == arr.dtype and np.array_equal(got, arr), (i, name)


def test_a_hit_lands_in_its_row_after_the_first_packed_batch(data, tmp_path):
    ds = make(data, tmp_path / "c", square)
    want = expected(ds, square)
    ds.__getitems__(list(range(N)))  # fills the cache
    engine = ds.engine
    engine.pipe.layout.specs = None  # a process that has packed nothing yet
    first = ds.__getitems__([0, 1, 2])
    check(first, [0, 1, 2], want)
    assert engine.pipe.layout.specs is not None  # learned from that batch
    buffers = engine.buffers(3)
    for spec in engine.pipe.layout.specs:
        assert buffers.target(spec.name, 2, np.empty(spec.shape, spec.dtype)) is not None
    # a cached record is copied straight into the row of its slot
    record = {"image": want[5]["image"], "points": np.zeros((0, 2), np.float32)}
    taken = take_record(record, buffers, 2)
    row = buffers.target("image", 2, want[5]["image"])
    assert np.shares_memory(taken["image"], row) and np.array_equal(row, want[5]["image"])
    assert not np.shares_memory(taken["points"], record["points"])  # not a row: its own copy
    second = engine.samples([3, 4, 5], buffers)
    check(second, [3, 4, 5], want)
    check(first, [0, 1, 2], want)  # the first batch, still held, is untouched
    ds.close()


def test_mixed_shapes_fall_back_and_stay_exact(data, tmp_path):
    ds = make(data, tmp_path / "c", by_orientation)
    want = expected(ds, by_orientation)
    shapes = {want[i]["image"].shape for i in range(N)}
    assert len(shapes) == 2  # the data set has both orientations
    ds.__getitems__(list(range(N)))
    same = [i for i in range(N) if want[i]["image"].shape == want[0]["image"].shape]
    held = []
    for _epoch in range(2):
        # one batch of a single shape (packs, learns the layout), then every index mixed
        # (the learned layout fits some rows, not all: nothing may be lost or mixed up)
        for batch in (same, list(range(N)), same[::-1]):
            samples = ds.__getitems__(batch)
            check(samples, batch, want)
            held.append((samples, batch))
    for samples, batch in held:  # every batch, held all along, still as it was made
        check(samples, batch, want)
    ds.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_epochs_equal_the_users_pipeline(data, tmp_path, workers):
    ds = make(data, tmp_path / "c", square)
    want = expected(ds, square)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=ds.collate_fn(),
                        persistent_workers=workers > 0,
                        multiprocessing_context="fork" if workers else None)
    index = {ds.source(i): i for i in range(N)}
    for _epoch in range(3):  # fill, then read through the learned layout
        kept = []
        for batch in loader:
            rows = [index[m["file"]] for m in batch["meta"]]
            for row, i in enumerate(rows):
                for name, arr in want[i].items():
                    assert np.array_equal(batch[name][row].numpy(), arr), (i, name)
            kept.append((batch, rows))
        for batch, rows in kept:  # held batches are not overwritten by later ones
            for row, i in enumerate(rows):
                assert np.array_equal(batch["image"][row].numpy(), want[i]["image"])
    del loader
    ds.close()


def test_stage_buffers_without_a_layout_offer_no_rows():
    assert StageBuffers(pack=True, layout=StageLayout(), n=4).target(
        "image", 0, np.zeros((3, 8, 8), np.float32)) is None
    assert StageBuffers(pack=False, n=4).target("image", 0, np.zeros(3, np.float32)) is None


def test_the_first_batch_of_a_process_learns_from_one_sample(data, tmp_path, monkeypatch):
    """A process that has packed nothing yet takes one sample first, learns the shapes from
    it, and copies the rest of that very batch straight into their rows."""
    ds = make(data, tmp_path / "c", square)
    want = expected(ds, square)
    ds.__getitems__(list(range(N)))  # fills the cache
    ds.engine.pipe.layout.specs = None
    rows = []
    real = StageBuffers.target

    def spy(self, name, slot, like):
        row = real(self, name, slot, like)
        if row is not None:
            rows.append((slot, name))
        return row

    monkeypatch.setattr(StageBuffers, "target", spy)
    batch = [5, 2, 0, 4]
    samples = ds.__getitems__(batch)
    check(samples, batch, want)
    assert {slot for slot, name in rows if name == "image"} == {1, 2, 3}
    assert {name for _, name in rows} >= {"image", "prob_map", "thresh_map"}
    ds.close()
