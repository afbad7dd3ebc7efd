"""A user's pipeline is known by what it does: a changed albumentations parameter the library's
own serialization leaves out, a Lambda's new body or a custom transform class is never served
from records of the old one; a Compose built by Hydra (OmegaConf values) fingerprints as the
same Compose built in Python; the OpenCV version versions every stage that calls OpenCV."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diskcache_ocr import CachedOCRDataset
from diskcache_ocr.errors import CacheVersionError
from diskcache_ocr.keys import fingerprint
from diskcache_ocr.ocr.conventions import get_convention
from diskcache_ocr.ocr.staged import StagePipeline, transform_stage
from diskcache_ocr.ocr.stages import NotCacheableWarning

A = pytest.importorskip("albumentations")

SIDE = 128
VAL_PRESET = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}


def _kp():
    return A.KeypointParams(format="xy", remove_invisible=False)


def _val(position="center", extra=()):
    return A.Compose([A.LongestMaxSize(SIDE),
                      A.PadIfNeeded(SIDE, SIDE, border_mode=0, value=0, position=position),
                      *extra, A.Normalize((0.5,) * 3, (0.25,) * 3)], keypoint_params=_kp())


def _dataset(tiny, cache, transform, **kw):
    """Cached in ``cache``; computed without any cache when it is None."""
    preset = VAL_PRESET if cache is not None else {"load_maps": True}
    return CachedOCRDataset(tiny.images, tiny.annotations, cache, preset=preset,
                            convention="origin", transform=transform, **kw)


def _images(ds):
    return [ds[i]["image"].numpy().copy() for i in range(len(ds))]


def _fp(transform, **kw):
    stage = transform_stage(transform, **kw)
    return None if stage.fingerprint() is None else fingerprint(stage.fingerprint())


# -- every constructor argument ---------------------------------------------------------------
def test_a_parameter_to_dict_leaves_out_changes_the_fingerprint():
    """albumentations 1.3.1's ``to_dict`` has no ``position`` for PadIfNeeded: moving the
    padding to the top left kept the fingerprint."""
    assert _fp(_val("center")) == _fp(_val("center"))
    assert _fp(_val("center")) != _fp(_val("top_left"))


def test_a_moved_padding_is_not_served_from_the_old_records(tiny, tmp_path):
    cache = tmp_path / "cache"
    centred = _images(_dataset(tiny, cache, _val("center")))
    with pytest.raises(CacheVersionError):
        _dataset(tiny, cache, _val("top_left"))
    rebuilt = _dataset(tiny, cache, _val("top_left"), on_mismatch="rebuild")
    live = _dataset(tiny, None, _val("top_left"))
    moved = _images(rebuilt)
    for got, want in zip(moved, _images(live), strict=True):
        assert np.array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(moved, centred, strict=True))


def test_nested_composes_and_keypoint_params_are_covered():
    inner = [A.OneOf([A.Blur(blur_limit=3, p=1.0)], p=1.0)]
    base = _fp(A.Compose([*inner, A.Normalize()], keypoint_params=_kp()))
    other_blur = _fp(A.Compose([A.OneOf([A.Blur(blur_limit=5, p=1.0)], p=1.0), A.Normalize()],
                               keypoint_params=_kp()))
    other_kp = _fp(A.Compose([*inner, A.Normalize()], keypoint_params=A.KeypointParams(
        format="xy", remove_invisible=True)))
    targets = _fp(A.Compose([*inner, A.Normalize()], keypoint_params=_kp(),
                            additional_targets={"image2": "image"}))
    assert len({base, other_blur, other_kp, targets}) == 4


def _brighten(image, **_):
    return np.clip(image.astype(np.int16) + 40, 0, 255).astype(np.uint8)


def _darken(image, **_):
    return (image // 2).astype(np.uint8)


def test_a_lambda_is_computed_live_never_served_stale(tiny, tmp_path):
    """A named ``A.Lambda`` serialized by its name only: a new body was served the old
    body's records (8/8 stale)."""
    cache = tmp_path / "cache"
    with pytest.warns(NotCacheableWarning, match="custom_apply_fns"):
        first = _dataset(tiny, cache, _val(extra=[A.Lambda(name="tone", image=_brighten)]))
    _images(first)
    with pytest.warns(NotCacheableWarning):
        second = _dataset(tiny, cache, _val(extra=[A.Lambda(name="tone", image=_darken)]))
    assert "tensors" not in second.engine.kind_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCacheableWarning)
        live = _dataset(tiny, None, _val(extra=[A.Lambda(name="tone", image=_darken)]))
    for got, want in zip(_images(second), _images(live), strict=True):
        assert np.array_equal(got, want)


def test_a_versioned_lambda_is_cached_under_its_version():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotCacheableWarning)
        one = _fp(_val(extra=[A.Lambda(name="tone", image=_brighten)]), version="tone-1")
        two = _fp(_val(extra=[A.Lambda(name="tone", image=_brighten)]), version="tone-2")
    assert one is not None and two is not None and one != two


class Posterize2(A.ImageOnlyTransform):
    """A user's own transform class: its code is not albumentations'."""

    def apply(self, img, **params):
        return (img & 0xC0).astype(np.uint8)


def test_a_custom_transform_class_needs_a_version():
    with pytest.warns(NotCacheableWarning, match="Posterize2"):
        stage = transform_stage(_val(extra=[Posterize2(p=1.0)]))
    assert not stage.cacheable and stage.fingerprint() is None
    assert StagePipeline(convention="origin", transform=_val(extra=[Posterize2(p=1.0)]),
                         transform_version="p2").cacheable_kinds() >= {"tensors"}


def test_the_opencv_version_versions_every_stage_that_calls_opencv(monkeypatch):
    import cv2

    compose = _fp(_val())
    callable_ = _fp(_brighten, version="b1")
    origin = get_convention("origin")
    builtin = (fingerprint(origin.transform.fingerprint()), fingerprint(origin.maps.fingerprint()))
    monkeypatch.setattr(cv2, "__version__", "0.0.0-other")
    assert _fp(_val()) != compose
    assert _fp(_brighten, version="b1") != callable_  # (a user's callable may call OpenCV)
    assert fingerprint(origin.transform.fingerprint()) != builtin[0]
    assert fingerprint(origin.maps.fingerprint()) != builtin[1]


# -- values a Compose built by Hydra holds ----------------------------------------------------
def test_omegaconf_tuples_and_numpy_values_are_plain_values():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"mean": [0.5, 0.25], "inner": {"k": [1, 2]}})
    plain = {"mean": [0.5, 0.25], "inner": {"k": [1, 2]}}
    assert fingerprint({"a": node}) == fingerprint({"a": plain})
    assert fingerprint({"a": node.mean}) == fingerprint({"a": (0.5, 0.25)})
    assert fingerprint({"a": np.array([0.5, 0.25])}) == fingerprint({"a": [0.5, 0.25]})
    assert fingerprint({"a": np.float32(0.5), "b": np.bool_(True)}) == fingerprint(
        {"a": 0.5, "b": True})


HYDRA_TRANSFORM = {
    "_target_": "albumentations.Compose",
    "transforms": [
        {"_target_": "albumentations.LongestMaxSize", "max_size": SIDE},
        {"_target_": "albumentations.PadIfNeeded", "min_width": SIDE, "min_height": SIDE,
         "border_mode": 0},
        {"_target_": "albumentations.Normalize", "mean": [0.5602, 0.5602, 0.5602],
         "std": [0.2539, 0.2539, 0.2539]},
    ],
    "keypoint_params": {"_target_": "albumentations.KeypointParams", "format": "xy",
                        "remove_invisible": False},
}


def test_a_compose_built_by_hydra_is_cached_and_equals_its_uncached_self(tiny, tmp_path):
    """``instantiate`` leaves ``mean``/``std`` as ``ListConfig``: the fingerprint raised
    ``TypeError: fingerprint: value at ...mean has type ListConfig``."""
    from hydra.utils import instantiate
    from omegaconf import ListConfig, OmegaConf

    compose = instantiate(OmegaConf.create(HYDRA_TRANSFORM))
    assert isinstance(compose.transforms[-1].mean, ListConfig)
    cache = tmp_path / "cache"
    ds = _dataset(tiny, cache, compose)
    assert {"tensors", "maps"} <= set(ds.engine.kind_versions())
    cold = _images(ds)
    warm = _images(_dataset(tiny, cache, instantiate(OmegaConf.create(HYDRA_TRANSFORM))))
    same = A.Compose([A.LongestMaxSize(SIDE), A.PadIfNeeded(SIDE, SIDE, border_mode=0),
                      A.Normalize((0.5602,) * 3, (0.2539,) * 3)], keypoint_params=_kp())
    assert _fp(compose) == _fp(same)
    plain = _dataset(tiny, None, same)
    for a, b, c in zip(cold, warm, _images(plain), strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, c)
    assert isinstance(ds[0]["image"], torch.Tensor)
