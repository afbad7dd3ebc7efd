"""Found by reviewing the user-pipeline and drop-in code: rare branches drawn with Python's
integer draws, a transform object's own settings and its own randomness, a config value of the
wrong type."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from diskcache_ocr import CachedOCRDataset
from diskcache_ocr.errors import CacheError, TrainingSafetyError
from diskcache_ocr.origin import ValidatedOCRDataset
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    synthesize(root, 3, seed=51, min_words=3, max_words=5, size=(150, 190))
    return root


def _rarely_randint(image, polygons):
    if random.randint(1, 20) == 1:
        image = 255 - image
    return image, polygons, np.eye(3)


def _rarely_choice(image, polygons):
    if random.choice(range(20)) == 0:
        image = 255 - image
    return image, polygons, np.eye(3)


def _rarely_shuffle(image, polygons):
    order = list(range(20))
    random.shuffle(order)
    if order[0] == 0:
        image = 255 - image
    return image, polygons, np.eye(3)


@pytest.mark.parametrize("transform", [_rarely_randint, _rarely_choice, _rarely_shuffle])
def test_a_rare_branch_drawn_with_integer_draws_is_random(root, tmp_path, transform):
    with pytest.raises(TrainingSafetyError):
        CachedOCRDataset(*split_paths(root), tmp_path / "c", preset="validation_optimized",
                         split="train", transform=transform, transform_version="v1")


class Holder:
    """An object holding a Compose, with a setting of its own and an optional coin flip."""

    def __init__(self, shift: int = 0, flip: bool = False) -> None:
        self.transform = A.Compose([A.LongestMaxSize(max_size=96)],
                                   keypoint_params=A.KeypointParams(format="xy"))
        self.shift, self.flip = shift, flip

    def __call__(self, image, polygons=None):
        out = self.transform(image=image, keypoints=[tuple(p) for q in polygons for p in q])
        img = out["image"].astype(np.int16) + self.shift
        if self.flip and random.random() < 0.5:
            img = img[:, ::-1]
        return OrderedDict(image=np.ascontiguousarray(img.clip(0, 255).astype(np.uint8)),
                           polygons=[], inverse_matrix=np.eye(3, dtype=np.float32))


def test_a_transform_objects_own_settings_are_in_its_fingerprint(root, tmp_path):
    ds = CachedOCRDataset(*split_paths(root), tmp_path / "c", preset="validation_optimized",
                          transform=Holder(0), convention="origin")
    other = CachedOCRDataset(*split_paths(root), None, preset="none",
                             transform=Holder(40), convention="origin")
    assert ds.pipeline.stage.fingerprint() != other.pipeline.stage.fingerprint()
    [ds[i] for i in range(len(ds))]
    changed = CachedOCRDataset(*split_paths(root), tmp_path / "c",
                               preset="validation_optimized", transform=Holder(40),
                               convention="origin", on_mismatch="rebuild")
    for i in range(len(changed)):
        assert np.array_equal(changed[i]["image"].numpy(), other[i]["image"].numpy())


def test_a_transform_objects_own_coin_flip_is_random(root, tmp_path):
    with pytest.raises(TrainingSafetyError):
        CachedOCRDataset(*split_paths(root), tmp_path / "c", preset="validation_optimized",
                         split="train", transform=Holder(flip=True), convention="origin")


def test_a_config_path_of_the_wrong_type_names_the_key(root, tmp_path):
    with pytest.raises(CacheError, match="image_path must be a path, got int"):
        ValidatedOCRDataset({"image_path": 5, "cache_dir": str(tmp_path / "c")})


def test_a_killed_build_of_one_split_is_not_hidden_by_another_splits_build(tmp_path):
    from diskcache_ocr import ops
    from diskcache_ocr.build import mark_started

    synthesize(tmp_path / "data", 3, seed=61, min_words=3, max_words=5, size=(150, 190))
    synthesize(tmp_path / "data", 4, split="train", seed=62, min_words=3, max_words=5,
               size=(150, 190))
    cache = tmp_path / "cache"
    train = CachedOCRDataset(*split_paths(tmp_path / "data", "train"), cache,
                             preset="balanced", split="train", preload=False)
    mark_started(train.store, train.engine, 1)  # a train prebuild killed before it finished
    assert [p["code"] for p in ops.health(cache)["problems"]] == ["incomplete_build"]
    val = CachedOCRDataset(*split_paths(tmp_path / "data"), cache,
                           preset="validation_optimized", preload=False)
    assert val.prebuild(progress=False).built == 3
    assert [p["code"] for p in ops.health(cache)["problems"]] == ["incomplete_build"]
    train.prebuild(progress=False)
    assert ops.health(cache)["problems"] == []
