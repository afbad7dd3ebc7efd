"""Pluggable transform / maps stages: outputs, fingerprints, cacheability, prefix split."""

from __future__ import annotations

import pickle
import random
import warnings

import numpy as np
import pytest

from diskcache_ocr.keys import fingerprint
from diskcache_ocr.ocr.conventions import get_convention
from diskcache_ocr.ocr.staged import transform_stage
from diskcache_ocr.ocr.stages import (
    CallableTransform,
    MapsStage,
    NotCacheableWarning,
    maps_stage,
    plain_version,
)

A = pytest.importorskip("albumentations")
from diskcache_ocr.ocr.albu_cut import cut_deterministic_prefix as split_deterministic_prefix  # noqa: E402

MEAN, STD = (0.5602,) * 3, (0.2539,) * 3


def _seed(compose, seed: int) -> None:
    """Seed what the Compose draws from: the global generators (albumentations 1.x) or its
    own (2.x, which it shares with its transforms)."""
    random.seed(seed)
    np.random.seed(seed)
    if hasattr(compose, "set_random_seed"):
        compose.set_random_seed(seed)


def _kp(remove_invisible: bool = True):
    return A.KeypointParams(format="xy", remove_invisible=remove_invisible)


def val_transform(max_size: int = 640):
    return A.Compose([A.LongestMaxSize(max_size, interpolation=1),
                      A.PadIfNeeded(max_size, max_size, border_mode=0),
                      A.Normalize(mean=MEAN, std=STD)], keypoint_params=_kp())


def train_transform():
    return A.Compose([A.LongestMaxSize(640, interpolation=1),
                      A.PadIfNeeded(640, 640, border_mode=0),
                      A.HorizontalFlip(p=0.5),
                      A.ColorJitter(p=0.5),
                      A.Normalize(mean=MEAN, std=STD)], keypoint_params=_kp())


@pytest.fixture
def sample():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 457, 3), dtype=np.uint8)
    polys = [np.array([[10.0, 20.0], [100.0, 20.0], [100.0, 50.0], [10.0, 50.0]]),
             np.array([[200.5, 100.25], [400.0, 110.0], [380.0, 290.0]])]
    return image, polys


def _same(a, b) -> bool:
    return (np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1])
            and all(np.array_equal(p, q) for p, q in zip(a[1], b[1])))


def test_albumentations_stage_equals_the_compose(sample):
    image, polys = sample
    compose = val_transform()
    stage = transform_stage(compose)
    out, moved, inverse = stage(image, polys)
    expected = compose(image=image, keypoints=[tuple(p) for p in np.concatenate(polys).tolist()])
    np.testing.assert_array_equal(out, expected["image"])
    np.testing.assert_array_equal(np.concatenate(moved), np.array(expected["keypoints"]))
    assert [len(p) for p in moved] == [4, 3]
    # The inverse maps outputs back to the source frame (albumentations 2 moves keypoints in
    # float32, hence the tolerance).
    for src, dst in zip(polys, moved):
        np.testing.assert_allclose(dst @ inverse[:2, :2].T + inverse[:2, 2], src, atol=1e-3)
    assert stage.cacheable and stage.is_deterministic()


def test_albumentations_stage_matches_the_origin_builtin(sample):
    if not A.__version__.startswith("1.3."):
        pytest.skip("the built-in reproduces albumentations 1.3's arithmetic")
    image, polys = sample
    out, moved, inverse = transform_stage(val_transform())(image, polys)
    b_out, b_moved, b_inverse = transform_stage(convention="origin")(image, polys)
    np.testing.assert_array_equal(b_out, out.transpose(2, 0, 1))
    for p, q in zip(moved, b_moved):  # (the origin keeps its polygons as float32)
        np.testing.assert_array_equal(np.asarray(p, np.float32), q)
    # The origin's inverse is its own letterbox arithmetic (truncated sizes), a fraction of
    # a pixel from the exact one derived from probe points.
    np.testing.assert_allclose(inverse, b_inverse, rtol=0, atol=0.05)


def test_albumentations_fingerprint_follows_parameters_and_version():
    base = transform_stage(val_transform()).fingerprint()
    assert base["albumentations"] == A.__version__
    assert base == transform_stage(val_transform()).fingerprint()
    assert fingerprint(base) != fingerprint(transform_stage(val_transform(512)).fingerprint())
    versioned = transform_stage(val_transform(), version="2").fingerprint()
    assert fingerprint(versioned) != fingerprint(base)


def test_compose_needs_xy_keypoints():
    with pytest.raises(ValueError, match="keypoint_params"):
        transform_stage(A.Compose([A.HorizontalFlip()]))
    with pytest.raises(ValueError, match="'xy'"):
        transform_stage(A.Compose([A.HorizontalFlip()],
                                  keypoint_params=A.KeypointParams(format="yx")))


def test_a_word_a_crop_cuts_is_dropped_and_the_kept_ones_named(sample):
    """With remove_invisible=True a crop drops the keypoints outside it: a word that loses a
    vertex is dropped, and the polygons say which input words they are."""
    image, _ = sample
    crop = A.Compose([A.Crop(0, 0, 200, 200)], keypoint_params=_kp())
    partly_outside = np.array([[10.0, 10.0], [300.0, 10.0], [300.0, 40.0]])
    inside = np.array([[10.0, 60.0], [90.0, 60.0], [90.0, 80.0]])
    _, moved, _ = transform_stage(crop)(image, [partly_outside, inside])
    assert len(moved) == 1 and np.array_equal(moved[0], inside)
    assert moved.index.tolist() == [1]


def _my_transform(image, polygons):
    flipped = np.ascontiguousarray(image[:, ::-1])
    w = image.shape[1]
    moved = [np.stack([w - 1 - p[:, 0], p[:, 1]], 1) for p in polygons]
    return flipped.transpose(2, 0, 1), moved, np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])


def test_versioned_callable(sample):
    image, polys = sample
    stage = transform_stage(_my_transform, version="flip-1")
    assert stage.cacheable
    out, moved, inverse = stage(image, polys)
    np.testing.assert_array_equal(out, image[:, ::-1].transpose(2, 0, 1))
    assert moved[0][0].tolist() == [446.0, 20.0] and inverse[0, 2] == 456
    fp = stage.fingerprint()
    assert fp["version"] == "flip-1" and "_my_transform" in fp["name"]
    other = transform_stage(_my_transform, version="flip-2").fingerprint()
    assert fingerprint(fp) != fingerprint(other)


def test_hydra_config_node_as_version():
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"_target_": "my.Transform", "size": 640,
                                       "mean": [0.5, 0.5], "inner": {"p": 0.5}})
    stage = transform_stage(_my_transform, version=node)
    assert stage.fingerprint()["version"] == {"_target_": "my.Transform", "size": 640,
                                              "mean": [0.5, 0.5], "inner": {"p": 0.5}}
    node.size = 512
    assert transform_stage(_my_transform, version=node).fingerprint() != stage.fingerprint()


def test_unversioned_callable_is_live_with_one_warning(sample):
    image, polys = sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage = transform_stage(_my_transform)
        stage(image, polys)
        stage(image, polys)
    assert [w.category for w in caught] == [NotCacheableWarning]
    assert "version" in str(caught[0].message)
    assert not stage.cacheable and stage.fingerprint() is None


def test_bad_versions_are_refused():
    with pytest.raises(TypeError, match="transform_version"):
        CallableTransform(_my_transform, version=3)
    with pytest.raises(ValueError, match="non-empty"):
        plain_version("")
    with pytest.raises(TypeError, match="not plain data"):
        plain_version({"a": object()})
    with pytest.raises(ValueError, match="only for a transform you pass"):
        transform_stage(None, version="1")


def test_callable_with_wrong_return_shape(sample):
    image, polys = sample
    stage = transform_stage(lambda im, p: im, version="1")
    with pytest.raises(TypeError, match="must return"):
        stage(image, polys)


def test_prefix_split_equals_whole_under_same_seed(sample):
    image, polys = sample
    compose = train_transform()
    split = split_deterministic_prefix(compose)
    assert [type(t).__name__ for t in split.prefix.compose.transforms] == [
        "LongestMaxSize", "PadIfNeeded"]
    assert split.prefix.cacheable and split.prefix.is_deterministic()
    assert not transform_stage(compose).is_deterministic()
    cached = split.run_prefix(image, polys)
    cached = pickle.loads(pickle.dumps(cached))  # as if read back from elsewhere
    whole_stage = transform_stage(compose)
    flips = set()
    for seed in range(12):
        _seed(compose, seed)
        whole = whole_stage(image, polys)
        _seed(compose, seed)
        rest = split.run_rest(cached)
        assert _same(whole, rest), seed
        np.testing.assert_allclose(rest[2], whole[2], atol=1e-9)
        flips.add(float(whole[1][0][0, 0]))
    assert len(flips) == 2  # both branches of the flip were exercised
    # The prefix has its own fingerprint, apart from the whole transform's.
    assert split.prefix.fingerprint() != whole_stage.fingerprint()


def test_prefix_only_compose_keeps_the_random_stream(sample):
    image, polys = sample
    compose = val_transform()
    split = split_deterministic_prefix(compose)
    assert split.rest_compose is None
    cached = split.run_prefix(image, polys)
    _seed(compose, 5)
    whole = transform_stage(compose)(image, polys)
    after_whole = random.random()
    _seed(compose, 5)
    rest = split.run_rest(cached)
    assert _same(whole, rest) and random.random() == after_whole


def test_no_prefix_when_it_starts_random():
    compose = A.Compose([A.HorizontalFlip(p=0.5), A.LongestMaxSize(640)], keypoint_params=_kp())
    assert split_deterministic_prefix(compose).prefix is None
    never = A.Compose([A.LongestMaxSize(640)], keypoint_params=_kp(), p=0.5)
    assert split_deterministic_prefix(never).prefix is None
    crop = A.Compose([A.RandomCrop(50, 50, p=1.0)], keypoint_params=_kp(False))
    assert split_deterministic_prefix(crop).prefix is None


def test_maps_stage_builtin_and_fingerprint():
    origin = MapsStage.builtin("origin")
    assert origin.cacheable
    poly = [np.array([[10.0, 10.0], [50.0, 10.0], [50.0, 30.0], [10.0, 30.0]])]
    maps = origin(poly, 64, 64)
    assert set(maps) == {"prob_map", "thresh_map"} and maps["prob_map"].shape == (64, 64)
    tweaked = maps_stage(convention="origin", shrink_ratio=0.5)
    assert fingerprint(tweaked.fingerprint()) != fingerprint(origin.fingerprint())
    assert not np.array_equal(tweaked(poly, 64, 64)["prob_map"], maps["prob_map"])
    db = maps_stage(convention="db", min_text_size=4)
    assert set(db(poly, 64, 64)) == {"prob_map", "prob_mask", "thresh_map", "thresh_mask"}
    assert fingerprint(db.fingerprint()) != fingerprint(maps_stage(convention="db").fingerprint())


def _my_maps(polygons, height, width, ignore=None):
    return {"prob_map": np.full((height, width), len(polygons), np.float32)}


def test_maps_stage_callables():
    stage = maps_stage(_my_maps, version={"algo": "count", "v": 1})
    assert stage.cacheable and stage.fingerprint()["version"] == {"algo": "count", "v": 1}
    assert stage([np.zeros((3, 2))] * 2, 4, 5)["prob_map"][0, 0] == 2
    with pytest.warns(NotCacheableWarning):
        live = maps_stage(_my_maps)
    assert not live.cacheable and live.fingerprint() is None
    with pytest.raises(ValueError, match="built-in maker only"):
        maps_stage(_my_maps, version="1", shrink_ratio=0.3)


def test_stages_pickle(sample):
    image, polys = sample
    stages = [transform_stage(val_transform()), transform_stage(convention="origin"),
              transform_stage(_my_transform, version="1"), maps_stage(convention="origin"),
              split_deterministic_prefix(train_transform())]
    for stage in stages:
        clone = pickle.loads(pickle.dumps(stage))
        if hasattr(stage, "fingerprint"):
            assert clone.fingerprint() == stage.fingerprint()
    first, clone = stages[0], pickle.loads(pickle.dumps(stages[0]))
    assert _same(first(image, polys), clone(image, polys))


def test_builtin_transform_by_convention(sample):
    image, polys = sample
    for name in ("origin", "db"):
        stage = transform_stage(convention=name)
        out, moved, inverse = stage(image, polys)
        assert out.dtype == np.float32 and out.shape == (3, 640, 640)
        ref = get_convention(name).transform(image, polys)
        assert np.array_equal(ref[0], out) and stage.fingerprint()["convention"] == name
        # (the origin's inverse is approximate by its own arithmetic: truncated sizes)
        np.testing.assert_allclose(moved[0] @ inverse[:2, :2].T + inverse[:2, 2], polys[0],
                                   atol=0.1 if name == "origin" else 1e-4)
