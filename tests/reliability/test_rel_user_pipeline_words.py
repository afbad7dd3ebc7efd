"""Don't-care flags travel with the polygons through the user's transform: a crop that drops
words (albumentations with ``remove_invisible=True``, or a callable that says which words it
kept) leaves each polygon with its own word's flag, in the sample and in the maps, cold and
warm; a callable that changes the count without saying is a clear error naming the file and
the transform."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from diskcache_ocr import CachedOCRDataset
from diskcache_ocr.ocr.conventions import get_convention
from diskcache_ocr.ocr.stages import TransformError

A = pytest.importorskip("albumentations")

HALF = 120  # the tiny images are 240 × 320 (either way up): a crop to 120 × 240 drops words
VAL_PRESET = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}
TRAIN_PRESET = {"load_maps": True, "cache_config": {"cache_images": True}}


@pytest.fixture(scope="module")
def flagged(tiny, tmp_path_factory):
    """``tiny`` with every other word a don't-care word: (images, annotations)."""
    root = tmp_path_factory.mktemp("flagged")
    images = root / "images"
    shutil.copytree(tiny.images, images)
    data = json.loads(tiny.annotations.read_text())
    for entry in data["images"].values():
        for i, word in enumerate(entry["words"].values()):
            word["ignore"] = i % 2 == 1
    annotations = root / "val.json"
    annotations.write_text(json.dumps(data))
    return images, annotations


def _own_flags(ds, i, sample):
    """Each polygon's own word's flag: the crop keeps coordinates, so a polygon is its source
    word's points (mirrored inside the crop when flipped)."""
    words, flags = ds.words(i)
    out = []
    for p in sample["polygons"]:
        p = np.asarray(p, np.float64)
        mirrored = np.stack([HALF - 1 - p[:, 0], p[:, 1]], 1)
        found = [k for k, w in enumerate(words) if len(w) == len(p) and (
            np.allclose(w, p, rtol=0, atol=1e-6) or np.allclose(w, mirrored, rtol=0, atol=1e-6))]
        assert len(found) == 1, (sample["meta"]["file"], p)
        out.append(bool(flags[found[0]]))
    return out


def _check(ds):
    dropped = 0
    maker = get_convention("db").maps
    for i in range(len(ds)):
        s = ds[i]
        want = _own_flags(ds, i, s)
        assert s["ignore"].tolist() == want, s["meta"]["file"]
        maps = maker(s["polygons"], *s["prob_map"].shape[-2:], np.array(want, bool))
        assert np.array_equal(s["prob_map"].numpy(), maps["prob_map"]), s["meta"]["file"]
        dropped += len(ds.words(i)[0]) - len(s["polygons"])
    assert dropped > 0  # (the crop did drop words)


def _crop_compose(*extra):
    return A.Compose([A.Crop(0, 0, HALF, 240), *extra, A.Normalize()],
                     keypoint_params=A.KeypointParams(format="xy", remove_invisible=True))


@pytest.mark.parametrize("kind", ["val-cached", "train-prefix"])
def test_an_albumentations_crop_that_drops_words_keeps_the_flags_in_step(flagged, tmp_path,
                                                                         kind):
    """Today ``run_compose`` refuses a Compose that drops keypoints; with the check removed,
    ``sample["ignore"]`` kept the source's list (another word's flag, or the wrong count)."""
    images, annotations = flagged
    if kind == "val-cached":
        args = {"transform": _crop_compose(), "preset": VAL_PRESET}
    else:  # the crop is the cached prefix, the flip runs live
        args = {"transform": _crop_compose(A.HorizontalFlip(p=0.5)), "preset": TRAIN_PRESET,
                "split": "train"}
    for _ in range(2):  # cold, then warm
        ds = CachedOCRDataset(images, annotations, tmp_path / "cache", convention="db", **args)
        if kind == "val-cached":
            assert {"tensors", "maps"} <= set(ds.engine.kind_versions())
        _check(ds)


def _crop_callable(tell: bool, rng: random.Random | None = None):
    """A DBNet-style crop of a random (or fixed) left part that drops the words it cuts."""
    def crop(image, polygons):
        width = HALF if rng is None else rng.randrange(HALF - 20, HALF + 20)
        kept = [i for i, p in enumerate(polygons) if np.asarray(p)[:, 0].max() < width]
        out = np.ascontiguousarray(image[:, :width])
        moved = [np.asarray(polygons[i], np.float64) for i in kept]
        if tell:
            return out, moved, np.eye(3), kept
        return out, moved, np.eye(3)
    return crop


def test_a_callable_crop_that_says_what_it_kept_keeps_the_flags_in_step(flagged):
    images, annotations = flagged
    ds = CachedOCRDataset(images, annotations, None, preset={"load_maps": True},
                          split="train", transform=_crop_callable(True, random.Random(3)),
                          transform_version="crop-1")
    _check(ds)


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
def test_a_callable_that_drops_words_without_saying_is_a_clear_error(flagged, tmp_path,
                                                                     cached):
    """Today: ``ValueError: ignore: expected 37 flags, got shape (40,)`` with live maps,
    naming neither the file nor the transform (or, without maps, flags out of step)."""
    images, annotations = flagged
    preset = VAL_PRESET if cached else {"load_maps": True}
    ds = CachedOCRDataset(images, annotations, tmp_path / "cache" if cached else None,
                          preset=preset, transform=_crop_callable(False),
                          transform_version="crop-1")
    index = next(i for i in range(len(ds))
                 if any(np.asarray(p)[:, 0].max() >= HALF for p in ds.words(i)[0]))
    with pytest.raises(TransformError) as caught:
        ds[index]
    message = str(caught.value)
    assert ds.source(index) in message and "_crop_callable.<locals>.crop" in message


def test_without_differing_flags_a_count_change_is_fine(tiny):
    """All flags alike (the origin's annotations have none): nothing to keep in step."""
    ds = CachedOCRDataset(tiny.images, tiny.annotations, None, preset={"load_maps": True},
                          transform=_crop_callable(False), transform_version="crop-1")
    for i in range(len(ds)):
        s = ds[i]
        assert s["ignore"].tolist() == [False] * len(s["polygons"])
