"""The user's own pipeline through the cache: a cached sample equals what that pipeline computes
without the cache, bit for bit (albumentations val transform, a versioned callable, a random
train transform with its deterministic prefix cached), fingerprints, the origin convention
through the dataset against the reference outputs, origin item and batch keys."""

from __future__ import annotations

import hashlib
import random
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from diskcache_ocr.dataset import CachedOCRDataset, collate_fn
from diskcache_ocr.errors import TrainingSafetyError
from diskcache_ocr.ocr.conventions import get_convention
from diskcache_ocr.ocr.stages import NotCacheableWarning
from diskcache_ocr.origin import ValidatedOCRDataset
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")

from test_origin_convention import REF, STEMS  # noqa: E402
from testkit import Seeded  # noqa: E402

N = 3
SIDE = 96
MEAN, STD = (0.5602,) * 3, (0.2539,) * 3
VAL_PRESET = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}
TRAIN_PRESET = {"load_maps": True, "cache_config": {"cache_images": True}}


def keypoints():
    return A.KeypointParams(format="xy", remove_invisible=False)


def val_transform(side=SIDE):
    return A.Compose([A.LongestMaxSize(side), A.PadIfNeeded(side, side, border_mode=0, value=0),
                      A.Normalize(MEAN, STD)], keypoint_params=keypoints())


def train_transform():
    return A.Compose([A.LongestMaxSize(SIDE), A.PadIfNeeded(SIDE, SIDE, border_mode=0, value=0),
                      A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.7),
                      A.Normalize(MEAN, STD)], keypoint_params=keypoints())


def my_transform(image, polygons):
    """A user's callable: scale to SIDE × SIDE, float CHW in [0, 1]."""
    h, w = image.shape[:2]
    sx, sy = SIDE / w, SIDE / h
    out = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    moved = [np.asarray(p, np.float64) * [sx, sy] for p in polygons]
    inverse = np.array([[1 / sx, 0, 0], [0, 1 / sy, 0], [0, 0, 1.0]])
    return out.transpose(2, 0, 1).astype(np.float32) / 255, moved, inverse


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-pipeline")
    synthesize(root, N, seed=5, min_words=3, max_words=7, size=(150, 190), exif_fraction=0.5)
    return root


def _image(path):
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def uncached(ds, index, kind):
    """The user's pipeline without any cache: PIL, their annotation rule, their transform,
    the maps of the chosen convention."""
    image = _image(ds.images_dir / ds.source(index))
    words, ignore = ds.words(index)
    if kind == "callable":
        out, moved, _ = my_transform(image, [np.asarray(p, np.float64) for p in words])
        maps = get_convention("db").maps(moved, SIDE, SIDE, ignore)
        return out, moved, maps
    # the origin's rules (each checked against the origin's own outputs elsewhere): points
    # rounded to int32, the EXIF frame decided per image, words of < 3 points dropped before
    # the transform and thin words after it, float32 polygons
    origin = get_convention("origin")
    with Image.open(ds.images_dir / ds.source(index)) as im:
        raw_size, orientation = im.size, im.getexif().get(0x0112, 1)
    polys = origin.upright_polygons([origin.load_points(p) for p in words], orientation,
                                    raw_size)
    flat = [tuple(map(float, xy)) for p in polys for xy in p]
    compose = val_transform() if kind == "val" else train_transform()
    result = compose(image=image, keypoints=flat)
    points = np.array([k[:2] for k in result["keypoints"]], np.float64).reshape(-1, 2)
    moved = np.split(points, np.cumsum([len(p) for p in polys])[:-1]) if polys else []
    moved = origin.kept(moved)
    out = result["image"]  # H×W×3 float32 (no ToTensorV2: torchvision is not a dependency)
    maps = origin.maps(moved, out.shape[0], out.shape[1])
    return out, moved, maps


def make(data, cache, kind, preset=None, **kw):
    images, annotations = split_paths(data)
    if kind == "val":
        args = {"convention": "origin", "transform": val_transform()}
    elif kind == "train":
        args = {"convention": "origin", "transform": train_transform(), "split": "train"}
    else:
        args = {"transform": my_transform, "transform_version": {"side": SIDE, "v": 1},
                "item_keys": "db"}
    if preset is None:
        preset = TRAIN_PRESET if kind == "train" else VAL_PRESET
    return CachedOCRDataset(images, annotations, cache, preset=preset, **{**args, **kw})


def assert_same(sample, expected, keys):
    image, moved, maps = expected
    assert np.array_equal(sample["image"].numpy(), image)
    assert len(sample["polygons"]) == len(moved)
    for a, b in zip(sample["polygons"], moved, strict=True):
        assert np.array_equal(np.asarray(a), b)
    for name, arr in maps.items():
        got = sample[name]
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    meta = sample["metadata" if keys == "origin" else "meta"]
    assert meta.get("error") is None  # (the origin item has the key only for a bad source)


def as_list(batch):
    return batch


def expected_all(ds, kind):
    out = {}
    for i in range(len(ds)):
        random.seed(i)
        np.random.seed(i)
        out[i] = uncached(ds, i, kind)
    return out


# spawn (a fresh interpreter per worker: the pipeline travels pickled) costs seconds per
# worker, so only the most involved pipeline, the split random Compose, runs under it.
@pytest.mark.parametrize("kind, workers, method", [
    pytest.param(kind, workers, method, marks=pytest.mark.full if workers else ())
    for kind in ("val", "callable", "train")
    for workers, method in ((0, None), (2, "fork"), (2, "spawn"))
    if method != "spawn" or kind == "train"])
def test_cached_equals_the_users_pipeline(data, tmp_path, kind, workers, method):
    ds = make(data, tmp_path / "c", kind)
    keys = ds.item_keys
    assert keys == ("db" if kind == "callable" else "origin")
    expected = expected_all(ds, kind)
    loader = DataLoader(Seeded(ds), batch_size=2, num_workers=workers,
                        multiprocessing_context=method, collate_fn=as_list,
                        persistent_workers=workers > 0)
    for _epoch in range(2):  # the first fills the cache, the second reads it
        seen = []
        for batch in loader:
            for sample in batch:
                meta = sample["metadata" if keys == "origin" else "meta"]
                i = [ds.source(j) for j in range(N)].index(
                    meta["filename"] if keys == "origin" else meta["file"])
                seen.append(i)
                assert_same(sample, expected[i], keys)
        assert sorted(seen) == list(range(N))
    del loader
    stats = CacheStore(tmp_path / "c", readonly=True)
    kinds = {k for k in ("images", "tensors", "maps") if stats.keys(k)}
    stats.close()
    # the random transform caches its deterministic prefix only (no maps, no decoded image)
    assert kinds == ({"tensors"} if kind == "train" else {"images", "tensors", "maps"})


def _records(cache, kind):
    store = CacheStore(cache, readonly=True)
    try:
        return set(store.keys(kind))
    finally:
        store.close()


@pytest.mark.parametrize("change", ["parameter", "version"])
def test_a_changed_stage_rebuilds_exactly_its_kind(data, tmp_path, change):
    cache = tmp_path / "c"
    kind = "val" if change == "parameter" else "callable"
    ds = make(data, cache, kind)
    _ = [ds[i] for i in range(N)]
    before = {k: _records(cache, k) for k in ("images", "tensors", "maps")}
    versions = ds.engine.kind_versions()
    if change == "parameter":
        other = make(data, cache, kind, transform=val_transform(SIDE - 16), on_mismatch="rebuild")
    else:
        other = make(data, cache, kind, transform_version={"side": SIDE, "v": 2},
                     on_mismatch="rebuild")
    new = other.engine.kind_versions()
    assert new["images"] == versions["images"]
    assert new["tensors"].fingerprint != versions["tensors"].fingerprint
    assert new["maps"].fingerprint != versions["maps"].fingerprint
    assert _records(cache, "images") == before["images"]  # kept
    assert not _records(cache, "tensors") and not _records(cache, "maps")  # dropped
    samples = [other[i] for i in range(N)]
    assert _records(cache, "images") == before["images"]
    assert len(_records(cache, "tensors")) == N and len(_records(cache, "maps")) == N
    if change == "parameter":
        assert samples[0]["image"].shape[:2] == (SIDE - 16, SIDE - 16)
    # the same stage again: no mismatch, nothing rebuilt
    again = make(data, cache, kind, transform=val_transform(SIDE - 16)) if (
        change == "parameter") else make(data, cache, kind,
                                         transform_version={"side": SIDE, "v": 2})
    assert again.engine.kind_versions() == new


def test_an_unversioned_callable_is_computed_live_and_never_cached(data, tmp_path):
    images, annotations = split_paths(data)
    with pytest.warns(NotCacheableWarning, match="no version"):
        ds = CachedOCRDataset(images, annotations, tmp_path / "c", preset=VAL_PRESET,
                              transform=my_transform, item_keys="db")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at construction
        first = ds[0]
        second = ds[0]
    assert torch.equal(first["image"], second["image"])
    assert np.array_equal(first["image"].numpy(), uncached(ds, 0, "callable")[0])
    assert _records(tmp_path / "c", "images") and not _records(tmp_path / "c", "tensors")
    assert not _records(tmp_path / "c", "maps")


def test_a_random_transform_refuses_cached_maps(data, tmp_path):
    with pytest.raises(TrainingSafetyError, match="not deterministic"):
        make(data, tmp_path / "c", "train", preset=VAL_PRESET)


def test_balanced_with_maps_trains(data, tmp_path):
    images, annotations = split_paths(data)
    ds = CachedOCRDataset(images, annotations, tmp_path / "c", preset="balanced",
                          split="train", load_maps=True)
    batch = ds.collate_fn()([ds[0], ds[1]])
    assert batch["prob_map"].shape[0] == 2 and batch["thresh_map"].dtype == torch.float32
    staged = make(data, tmp_path / "c2", "train", preset="balanced", load_maps=True)
    sample = staged[0]
    assert sample["prob_map"].shape == sample["image"].shape[:2]


def test_the_origin_convention_through_the_dataset(tmp_path):
    ds = CachedOCRDataset(REF / "images", REF / "val.json", tmp_path / "c",
                          preset={"load_maps": True, "cache_config": {
                              "cache_transformed_tensors": True, "cache_maps": True}},
                          convention="origin")
    assert ds.item_keys == "origin"
    for _pass in range(2):  # computed, then cached
        for i in range(len(ds)):
            _check_reference(ds[i])
    assert len(_records(tmp_path / "c", "maps")) == len(STEMS)


def _check_reference(sample):
    stem = sample["metadata"]["filename"].rsplit(".", 1)[0]
    ref = np.load(REF / "outputs" / f"{stem}.npz")
    image = sample["image"].numpy()
    if image.shape[-1] == 3:  # an H×W×3 Compose output: what ToTensorV2 would make of it
        image = np.ascontiguousarray(image.transpose(2, 0, 1))
    assert hashlib.sha256(image.tobytes()).hexdigest() == str(ref["image_sha256"])
    assert sample["metadata"]["orientation"] == int(ref["orientation"])
    np.testing.assert_array_equal(sample["prob_map"], ref["prob_map"])
    np.testing.assert_array_equal(sample["thresh_map"], ref["thresh_map"])
    np.testing.assert_array_equal(sample["inverse_matrix"], ref["inverse_matrix"])
    assert [len(p) for p in sample["polygons"]] == ref["poly_sizes"].tolist()
    np.testing.assert_array_equal(np.concatenate(sample["polygons"]).astype(np.float32),
                                  ref["poly_points"])


def origin_val_transform():
    """The origin's val_transform as its Hydra list builds it (albumentations 1.3.1), less
    its final ToTensorV2 (torchvision is not a dependency here)."""
    return A.Compose([A.LongestMaxSize(640, interpolation=cv2.INTER_LINEAR),
                      A.PadIfNeeded(640, 640, border_mode=cv2.BORDER_CONSTANT, value=0),
                      A.Normalize(MEAN, STD, max_pixel_value=255.0)],
                     keypoint_params=keypoints())


def test_validated_dataset_with_their_transform(tmp_path):
    config = {"image_path": str(REF / "images"), "annotation_path": str(REF / "val.json"),
              "cache_dir": str(tmp_path / "c"), "load_maps": True,
              "cache_config": {"cache_images": True, "cache_maps": True,
                               "cache_transformed_tensors": True}}
    ds = ValidatedOCRDataset(config, transform=origin_val_transform())
    assert ds.item_keys == "origin" and ds.user_transform is not None
    for _pass in range(2):
        for i in range(len(ds)):
            _check_reference(ds[i])


class TheirCollate:
    """A DBCollateFN as the issue describes it: stacks the items' images, takes prob_map /
    thresh_map from the items when present, else makes them itself."""

    def __init__(self):
        self.made = 0

    def __call__(self, items):
        maps = []
        for item in items:
            if "prob_map" in item and "thresh_map" in item:
                maps.append((item["prob_map"], item["thresh_map"]))
            else:
                self.made += 1
                h, w = item["image"].shape[:2]
                out = get_convention("origin").maps(item["polygons"], h, w)
                maps.append((out["prob_map"], out["thresh_map"]))
        return {"images": torch.stack([it["image"] for it in items]),
                "prob_maps": torch.stack([torch.from_numpy(p) for p, _ in maps]),
                "thresh_maps": torch.stack([torch.from_numpy(t) for _, t in maps]),
                "image_filename": [it["metadata"]["filename"] for it in items],
                "inverse_matrix": [it["inverse_matrix"] for it in items]}


def test_their_collate_takes_the_cached_maps_and_ours_names_keys_their_way(data, tmp_path):
    ds = make(data, tmp_path / "c", "val")
    theirs = TheirCollate()
    items = [ds[i] for i in range(N)]
    batch = theirs(items)
    assert theirs.made == 0
    ours = collate_fn("origin")(items)
    assert set(batch) <= set(ours)
    for key in ("images", "prob_maps", "thresh_maps"):
        assert torch.equal(batch[key], ours[key])
    assert ours["image_filename"] == batch["image_filename"] == [ds.source(i) for i in range(N)]
    assert ours["prob_maps"].shape == (N, SIDE, SIDE)
    assert ours["inverse_matrix"].shape == (N, 3, 3)
    # without maps in the items their collate makes the same maps itself
    bare = [{k: v for k, v in it.items() if not k.endswith("_map")} for it in items]
    again = theirs(bare)
    assert theirs.made == N and torch.equal(again["prob_maps"], ours["prob_maps"])
    assert torch.equal(again["thresh_maps"], ours["thresh_maps"])


def test_the_command_line_on_a_cache_built_by_user_stages(data, tmp_path, capsys):
    from testkit import run_cli

    ds = make(data, tmp_path / "c", "val")
    _ = [ds[i] for i in range(N)]
    ds.close()
    rc, out, _ = run_cli(capsys, "status", "--cache", tmp_path / "c")
    assert rc == 0 and "tensors" in out
    rc, _, _ = run_cli(capsys, "verify", "--cache", tmp_path / "c")
    assert rc == 0  # every record's checksum
    rc, out, err = run_cli(capsys, "verify", "--cache", tmp_path / "c", "--recompute", "1",
                           "--annotations", split_paths(data)[1])
    assert rc != 0 and "user pipeline" in out + err
