"""Randomness is never frozen into the cache: a rare augmentation (``p=0.05``) or a callable
drawing ``random.random() < 0.05`` from any generator (Python's, NumPy's global, an unseeded
``default_rng()``, torch's) makes the transform random, so ``validation_optimized`` on the
training split is refused, while deterministic transforms are still cached."""

from __future__ import annotations

import random
import secrets
import threading
import warnings

import numpy as np
import pytest
import torch

from diskcache_ocr import CachedOCRDataset
from diskcache_ocr.errors import TrainingSafetyError
from diskcache_ocr.ocr.albu_cut import cut_deterministic_prefix as split_deterministic_prefix
from diskcache_ocr.ocr.staged import transform_stage

A = pytest.importorskip("albumentations")

SIDE = 96


def _kp():
    return A.KeypointParams(format="xy", remove_invisible=False)


def _compose(*extra):
    return A.Compose([A.LongestMaxSize(SIDE), A.PadIfNeeded(SIDE, SIDE, border_mode=0, value=0),
                      *extra, A.Normalize((0.5,) * 3, (0.25,) * 3)], keypoint_params=_kp())


def _flipping_when(rare):
    """A user's callable: resize to SIDE × SIDE, flipped when ``rare()`` says so."""
    def transform(image, polygons):
        h, w = image.shape[:2]
        ys = np.arange(SIDE) * h // SIDE
        xs = np.arange(SIDE) * w // SIDE
        out = image[ys][:, xs]
        if rare():
            out = np.ascontiguousarray(out[:, ::-1])
        moved = [np.asarray(p, np.float64) * [SIDE / w, SIDE / h] for p in polygons]
        return out, moved, np.diag([w / SIDE, h / SIDE, 1.0])
    return transform


RARE_CALLABLES = {
    "python-random": lambda: random.random() < 0.05,
    "python-uniform": lambda: random.uniform(0.0, 1.0) < 0.05,
    "numpy-global": lambda: np.random.rand() < 0.05,
    "numpy-default-rng": lambda: np.random.default_rng().random() < 0.05,
    "torch": lambda: bool(torch.rand(1) < 0.05),
}


def _train(tiny, tmp_path, transform, **kw):
    return CachedOCRDataset(tiny.images, tiny.annotations, tmp_path / "cache",
                            preset="validation_optimized", split="train",
                            transform=transform, **kw)


@pytest.mark.parametrize("rare", [lambda: A.ToGray(p=0.05), lambda: A.GaussNoise(p=0.05)],
                         ids=["ToGray", "GaussNoise"])
def test_a_rare_augmentation_is_random_without_probing(tiny, tmp_path, rare):
    """The whole-Compose probe ran 8 fixed seeds, under which a 5 % augmentation never
    fired: the training split was accepted and each image kept one outcome forever."""
    with pytest.raises(TrainingSafetyError):
        _train(tiny, tmp_path, _compose(rare()), convention="origin")
    assert "p=0.05" in transform_stage(_compose(rare())).random_reason()


@pytest.mark.parametrize("name", list(RARE_CALLABLES))
def test_a_callable_with_a_rare_random_branch_is_refused(tiny, tmp_path, name):
    transform = _flipping_when(RARE_CALLABLES[name])
    with pytest.raises(TrainingSafetyError):
        _train(tiny, tmp_path, transform, transform_version="v1")
    assert not transform_stage(transform, version="v1").is_deterministic()


def test_the_probe_leaves_every_generator_as_it_found_it():
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    for name in RARE_CALLABLES:
        transform_stage(_flipping_when(RARE_CALLABLES[name]), version="v1").random_reason()
    transform_stage(_compose(A.HorizontalFlip(p=0.5))).random_reason()
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


@pytest.mark.parametrize("kind", ["compose", "callable", "seeded-generator", "p0"])
def test_deterministic_transforms_are_still_cached_on_train(tiny, tmp_path, kind):
    if kind == "compose":
        args = {"transform": _compose(A.HorizontalFlip(p=1.0)), "convention": "origin"}
    elif kind == "p0":
        args = {"transform": _compose(A.ToGray(p=0.0)), "convention": "origin"}
    elif kind == "callable":
        args = {"transform": _flipping_when(lambda: False), "transform_version": "v1"}
    else:  # its own seeded generator: the same draws every call
        args = {"transform": _flipping_when(lambda: np.random.RandomState(7).rand() < 0.5),
                "transform_version": "v1"}
    ds = _train(tiny, tmp_path, **args)
    assert {"tensors", "maps"} <= set(ds.engine.kind_versions())
    ds[0]


def test_a_random_range_is_random_by_its_parameters():
    from diskcache_ocr.ocr.albu import random_by_parameters

    assert "draws from a range" in random_by_parameters(
        _compose(A.RandomBrightnessContrast(brightness_limit=(-0.2, 0.2), p=1.0)))
    assert "picks among" in random_by_parameters(
        _compose(A.OneOf([A.HorizontalFlip(p=1.0)], p=1.0)))
    assert random_by_parameters(_compose(A.HorizontalFlip(p=1.0))) is None


def test_a_rare_augmentation_stays_out_of_the_cached_prefix():
    split = split_deterministic_prefix(A.Compose(
        [A.LongestMaxSize(SIDE), A.ToGray(p=0.05), A.PadIfNeeded(SIDE, SIDE, border_mode=0)],
        keypoint_params=_kp()))
    assert split.prefix is not None
    assert len(split.prefix.compose.transforms) == 1


def test_a_rare_random_branch_of_a_transform_inside_a_compose_is_seen():
    """A Lambda (versioned) whose function draws ``random.random() < 0.05``: pinning
    ``random.random()`` shows the other branch, whichever seeds the probe runs."""
    def rare_gray(image, **_):
        return image if random.random() >= 0.05 else np.repeat(image.mean(2, keepdims=True)
                                                               .astype(np.uint8), 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = transform_stage(_compose(A.Lambda(name="g", image=rare_gray)), version="g1")
    assert not stage.is_deterministic()


def test_another_thread_keeps_the_os_entropy_while_a_transform_is_probed():
    """The probe feeds seeded bytes in place of the OS's entropy: only to the thread it
    probes in, so a token another thread makes meanwhile is not predictable."""
    tokens = []

    def transform(image, polygons):
        side = threading.Thread(target=lambda: tokens.append(secrets.randbits(128)))
        side.start()
        side.join()
        return image, [np.asarray(p, np.float64) for p in polygons], np.eye(3)

    assert transform_stage(transform, version="v1").random_reason() is None
    fed = {int.from_bytes(random.Random(seed).randbytes(16), "big") for seed in range(300)}
    assert len(tokens) >= 8 and not fed & set(tokens)
