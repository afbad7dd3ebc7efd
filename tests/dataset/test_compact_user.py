"""Compact output with your own transform: a deterministic albumentations Compose ending in a
Normalize is cached as the uint8 image before it, and ``finish_batch`` applies that Normalize,
reproduced: the finished batch equals the float32 output of the user's pipeline, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testkit import Seeded
from torch.utils.data import DataLoader

from diskcache_ocr import CachedOCRDataset, finish_batch
from diskcache_ocr.ocr.albu_cut import cut_normalize_tail as split_normalize_tail
from diskcache_ocr.ocr.transform import normalize_channels_last_torch
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")

N = 5
SIDE = 96
PRESET = {"load_maps": True, "cache_config": {
    "cache_images": False, "cache_transformed_tensors": True, "cache_maps": True}}


def keypoints():
    return A.KeypointParams(format="xy", remove_invisible=False)


def val_transform(*tail, side=SIDE):
    return A.Compose([A.LongestMaxSize(side), A.PadIfNeeded(side, side, border_mode=0, value=0),
                      *tail], keypoint_params=keypoints())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact-user")
    synthesize(root, N, seed=8, min_words=2, max_words=6, size=(150, 190), exif_fraction=0.4)
    return root


RAMP = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)


@pytest.mark.parametrize("mean, std, max_value", [
    ((0.5602,) * 3, (0.2539,) * 3, 255.0),
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0),
    (0.5, 0.25, 255.0),
    ((0.1, 0.2, 0.3), (0.7, 0.8, 0.9), 1.0),
])
def test_the_reproduced_normalize_equals_theirs_for_every_value(mean, std, max_value):
    normalize = A.Normalize(mean, std, max_pixel_value=max_value)
    parts = split_normalize_tail(val_transform(normalize))
    assert parts is not None
    _, tail = parts
    theirs = normalize(image=RAMP)["image"]
    ours = tail.apply(RAMP)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32),
                                                       theirs.view(np.uint32))
    # the device code path (torch operations), run here on the CPU
    out = normalize_channels_last_torch(torch.from_numpy(RAMP), torch.from_numpy(tail.shift),
                                        torch.from_numpy(tail.scale),
                                        torch.empty(RAMP.shape, dtype=torch.float32))
    assert np.array_equal(out.numpy().view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("compose", [
    val_transform(),  # no Normalize at the end
    val_transform(A.Normalize(p=0.5)),  # not always applied
    val_transform(A.Normalize(), A.HorizontalFlip(p=1.0)),  # not last
    val_transform(A.ToFloat(), A.Normalize(max_pixel_value=1.0)),  # no uint8 before it
], ids=["none", "sometimes", "not-last", "float-head"])
def test_a_compose_without_a_reproducible_tail_is_not_split(compose):
    assert split_normalize_tail(compose) is None


def make(data, cache, output, keys="origin", transform=None):
    """The dataset over ``cache``; None: nothing cached (the user's pipeline as it is)."""
    images, annotations = split_paths(data)
    preset = PRESET if cache is not None else {"load_maps": True}
    return CachedOCRDataset(images, annotations, cache, preset=preset, convention="origin",
                            item_keys=keys, output=output,
                            transform=transform or val_transform(A.Normalize((0.5602,) * 3,
                                                                             (0.2539,) * 3)))


def by_file(batch, keys):
    names = batch["image_filename"] if keys == "origin" else [m["file"] for m in batch["meta"]]
    return names


# spawn (the pipeline, its Compose head and the reproduced Normalize travel pickled) costs
# seconds per worker: one case of it.
@pytest.mark.parametrize("keys, workers, method", [
    pytest.param(keys, workers, method, marks=pytest.mark.full if workers else ())
    for keys, workers, method in (("origin", 0, None), ("origin", 2, "fork"), ("db", 0, None),
                                  ("db", 2, "fork"), ("origin", 2, "spawn"))])
def test_compact_then_finish_equals_the_float32_pipeline(data, tmp_path, keys, workers, method):
    plain = make(data, None, "float32", keys)  # the user's pipeline, uncached
    assert plain.store is None
    image_key = "images" if keys == "origin" else "image"
    maps = ("prob_maps", "thresh_maps") if keys == "origin" else ("prob_map", "thresh_map")
    want = {}
    for batch in DataLoader(plain, batch_size=N, collate_fn=plain.collate_fn()):
        for row, name in enumerate(by_file(batch, keys)):
            want[name] = {k: batch[k][row].clone() for k in (image_key, *maps)}
    ds = make(data, tmp_path / "c", "compact", keys)
    assert ds.output == "compact"
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=ds.collate_fn(),
                        persistent_workers=workers > 0, multiprocessing_context=method)
    for _epoch in range(2):  # read-through, then cached
        seen = []
        for batch in loader:
            assert batch[image_key].dtype == torch.uint8 and "finish" in batch
            done = finish_batch(batch)
            assert "finish" not in done
            for row, name in enumerate(by_file(done, keys)):
                seen.append(name)
                for k, expected in want[name].items():
                    got = torch.as_tensor(np.asarray(done[k][row]))
                    assert got.dtype == expected.dtype and torch.equal(got, expected), (name, k)
        assert sorted(seen) == sorted(want)
    del loader
    with CacheStore(tmp_path / "c", readonly=True) as store, store.reader() as txn:
        key = next(iter(store.keys("tensors")))
        assert txn.get("tensors", key)["image"].dtype == np.uint8  # a quarter of the bytes


def test_compact_and_float32_caches_are_versioned_apart(data, tmp_path):
    """Two output forms of one Compose are two pipelines: each has its own tensors records,
    side by side in one cache, and each reads its own."""
    make(data, tmp_path / "c", "compact").__getitems__([0, 1])
    with CacheStore(tmp_path / "c", readonly=True) as store:
        compact = set(store.keys("tensors"))
    float32 = make(data, tmp_path / "c", "float32")
    plain = make(data, None, "float32")
    for i in (0, 1):
        assert torch.equal(float32[i]["image"], plain[i]["image"])
    float32.close()
    with CacheStore(tmp_path / "c", readonly=True) as store:
        both = set(store.keys("tensors"))
    assert compact < both and len(both) == 2 * len(compact)


def test_other_transforms_fall_back_to_their_own_output(data, tmp_path):
    ds = make(data, tmp_path / "c", "compact", transform=val_transform())  # no Normalize
    assert ds.output == "float32"
    sample = ds[0]
    assert sample["image"].dtype == torch.uint8 and "finish" not in sample  # as it returns


def train_transform(*tail):
    return val_transform(A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.7), *tail)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_random_transform_runs_its_rest_without_the_normalize(data, tmp_path, workers):
    """The train Compose: its deterministic prefix cached, the random rest run live without
    its final Normalize, which finish_batch applies: equal to the float32 pipeline bit for
    bit under the same seeds, and the random state left as the whole rest leaves it."""
    import random

    images, annotations = split_paths(data)
    transform = train_transform(A.Normalize((0.5602,) * 3, (0.2539,) * 3))

    def make_train(cache, output):
        preset = {"load_maps": True, "cache_config": {"cache_images": cache is not None}}
        return CachedOCRDataset(images, annotations, cache, split="train", convention="origin",
                                preset=preset, transform=transform, output=output)

    plain = make_train(None, "float32")  # nothing cached: the user's pipeline as it is
    assert plain.store is None
    ds = make_train(tmp_path / "c", "compact")
    assert ds.output == "compact" and ds.pipeline.compact_rest is not None
    for i in range(N):  # one sample at a time, the random state compared after each
        random.seed(i)
        np.random.seed(i)
        want = plain[i]
        after_plain = random.getstate()
        random.seed(i)
        np.random.seed(i)
        got = finish_batch(ds.collate_fn()([ds[i]]))
        assert random.getstate() == after_plain
        assert torch.equal(got["images"][0], want["image"])
        assert np.array_equal(got["prob_maps"][0].numpy(), want["prob_map"])
    loader = DataLoader(Seeded(ds), batch_size=2, num_workers=workers,
                        collate_fn=ds.collate_fn(), persistent_workers=workers > 0,
                        multiprocessing_context="fork" if workers else None)
    index = {ds.source(i): i for i in range(N)}
    for _epoch in range(2):
        for batch in loader:
            assert batch["images"].dtype == torch.uint8
            done = finish_batch(batch)
            for row, name in enumerate(done["image_filename"]):
                i = index[name]
                random.seed(i)
                np.random.seed(i)
                want = plain[i]
                assert torch.equal(done["images"][row], want["image"]), name
                assert torch.equal(done["thresh_maps"][row], torch.from_numpy(want["thresh_map"]))
    del loader


def test_a_random_transform_without_a_final_normalize_is_not_compacted(data, tmp_path):
    images, annotations = split_paths(data)
    ds = CachedOCRDataset(images, annotations, tmp_path / "c", split="train", convention="origin",
                          preset={"load_maps": True, "cache_config": {"cache_images": True}},
                          transform=train_transform(), output="compact")
    assert ds.output == "float32" and ds.pipeline.compact_rest is None
