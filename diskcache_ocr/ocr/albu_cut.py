"""Cutting an albumentations ``Compose`` into a cacheable deterministic prefix and a live
rest, and taking a final ``Normalize`` off as plain numbers the library reproduces.

The rest, run after the cached prefix's output, gives what the whole Compose gives under the
same random state, bit for bit (see :class:`PrefixCut`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from diskcache_ocr.ocr.albu import (
    AlbumentationsTransform,
    keypoint_params,
    load_albumentations,
    probe_compose,
    random_by_parameters,
    run_compose,
)
from diskcache_ocr.ocr.conventions import TransformResult
from diskcache_ocr.ocr.stages import on_probe_input
from diskcache_ocr.ocr.transform import normalize_channels_last


class PrefixCut:
    """A Compose cut into a deterministic, cacheable ``prefix`` and a live ``rest``.

    ``run_rest(prefix_output)`` gives what the whole Compose gives under the same random
    state, bit for bit. albumentations 1.x draws from the global ``random`` once per transform
    (and per Compose) even when ``p=1``, so the rest first consumes the draws the prefix would
    have. albumentations 2.x keeps generators in each transform; the rest runs the user's own
    transform objects, so seeding the whole Compose (``set_random_seed``) seeds the rest too.
    """

    def __init__(self, compose: Any, prefix_len: int, draws: int) -> None:
        A = load_albumentations()
        params = keypoint_params(compose)
        transforms = list(compose.transforms)
        self.prefix = (AlbumentationsTransform(_new_compose(A, transforms[:prefix_len], params))
                       if prefix_len else None)
        if prefix_len == 0:
            self.rest_compose = compose
        elif prefix_len < len(transforms):
            # The rest shares the user's transform objects, hence (on albumentations 2,
            # where each transform owns its generators) their random state.
            self.rest_compose = _new_compose(A, transforms[prefix_len:], params)
        else:
            self.rest_compose = None
        self.whole = compose
        self.draws = draws
        self.global_draws = not _owns_generators(compose)

    def run_rest(self, prefix_output: TransformResult) -> TransformResult:
        image, polygons, inverse = prefix_output
        for _ in range(self.draws):
            random.random()
        if self.rest_compose is None:
            if self.global_draws:
                random.random()  # the whole Compose's own draw
            return image, list(polygons), inverse
        out_image, out_polys, rest_inverse = run_compose(self.rest_compose, image, polygons)
        return out_image, out_polys, inverse @ rest_inverse

    def run_prefix(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        """The cacheable part; leaves the global random state as it found it."""
        if self.prefix is None:
            raise ValueError("this transform has no deterministic prefix")
        state = random.getstate()
        try:
            return self.prefix(image, polygons)
        finally:
            random.setstate(state)


def cut_deterministic_prefix(compose: Any, trials: int = 8) -> PrefixCut:
    """Cut ``compose`` after its longest prefix of transforms that the probe finds
    deterministic (``p == 1`` or always applied, same output under different seeds, and no
    use of numpy's global generator); an empty prefix when none is or when the Compose itself
    has ``p < 1``."""
    A = load_albumentations()
    params = keypoint_params(compose)
    transforms = list(compose.transforms)
    if compose.p < 1:
        return PrefixCut(compose, 0, 0)
    n = 0
    while n < len(transforms) and _transform_deterministic(A, transforms[n], params, trials):
        n += 1
    if n == 0:
        return PrefixCut(compose, 0, 0)
    if _owns_generators(compose):
        return PrefixCut(compose, n, 0)
    draws = _draws_of(_new_compose(A, transforms[:n], params))
    if draws is None:
        return PrefixCut(compose, 0, 0)
    return PrefixCut(compose, n, draws - 1)  # minus the prefix Compose's own draw


def _owns_generators(compose: Any) -> bool:
    """albumentations 2.x: the Compose and its transforms carry their own generators."""
    return hasattr(compose, "random_generator") and hasattr(compose, "py_random")


def _new_compose(A: Any, transforms: list[Any], params: Any) -> Any:
    """A Compose of (some of) the user's transforms that leaves their random state alone
    (albumentations 2's Compose reseeds the transforms it is given)."""
    saved = [(t, t.random_generator, t.py_random) for t in transforms
             if hasattr(t, "random_generator") and hasattr(t, "py_random")]
    out = A.Compose(transforms, keypoint_params=params)
    for t, generator, py_random in saved:
        t.set_random_state(generator, py_random)
    return out


def _transform_deterministic(A: Any, t: Any, params: Any, trials: int) -> bool:
    if random_by_parameters(t) is not None:
        return False
    if isinstance(t, A.BaseCompose):
        return False  # nested Compose/Sequential: kept out of a prefix
    try:
        return probe_compose(A.Compose([copy.deepcopy(t)], keypoint_params=params),
                              trials) is None
    except Exception:  # noqa: BLE001 - a transform that fails on the probe is not
        return False  # known to be deterministic


def _draws_of(prefix: Any, limit: int = 256) -> int | None:
    """How many ``random.random()`` calls running ``prefix`` amounts to (None if it is not a
    whole number of them)."""
    saved = random.getstate()
    try:
        random.seed(12345)
        start = random.getstate()

        def run(image: np.ndarray, polygons: list[np.ndarray]) -> None:
            random.setstate(start)
            run_compose(prefix, image, polygons)

        on_probe_input(run)
        after = random.getstate()
        random.setstate(start)
        for k in range(limit + 1):
            if random.getstate() == after:
                return k
            random.random()
        return None
    finally:
        random.setstate(saved)


class NormalizeTail:
    """A Compose's final ``Normalize`` as plain numbers the library reproduces exactly:
    ``(x - shift) * scale`` per channel, in float32 (see ``transform.normalize_channels_last``).
    """

    def __init__(self, shift: np.ndarray, scale: np.ndarray) -> None:
        self.shift = np.array(shift, np.float32)  # (own, writable copies)
        self.scale = np.array(scale, np.float32)

    def apply(self, image: np.ndarray) -> np.ndarray:
        return normalize_channels_last(image, self.shift, self.scale,
                                       np.empty(image.shape, np.float32))

    def spec(self) -> dict[str, Any]:
        """The finishing spec of a compact sample (plain data: it travels with batches)."""
        return {"op": "sub_mul", "shift": self.shift.tolist(), "scale": self.scale.tolist(),
                "image_key": "image"}


def cut_normalize_tail(compose: Any, version: object = None
                         ) -> tuple[AlbumentationsTransform, NormalizeTail] | None:
    """``compose`` as its head (everything but a final ``Normalize``) and that Normalize, when
    the library can reproduce it exactly; else None.

    Reproducible means: always applied, the standard (mean, std) normalization, and equal
    to :meth:`NormalizeTail.apply`, bit for bit, for every uint8 value of every channel
    (the operation is per element and per channel, so that covers every image), with the
    head returning uint8 images of three channels (what is then stored).
    """
    A = load_albumentations()
    transforms = list(compose.transforms)
    if not transforms or type(transforms[-1]) is not A.Normalize:
        return None
    last = transforms[-1]
    if not (getattr(last, "always_apply", False) or getattr(last, "p", 0.0) >= 1.0):
        return None
    if getattr(last, "normalization", "standard") != "standard":
        return None
    try:
        # albumentations' own float32 constants: mean and std scaled by the maximum pixel
        # value, and the reciprocal of the scaled std
        mean = np.array(last.mean, np.float32)
        mean *= last.max_pixel_value
        std = np.array(last.std, np.float32)
        std *= last.max_pixel_value
        scale = np.reciprocal(std, dtype=np.float32)
        shift, scale = np.broadcast_to(mean, (3,)), np.broadcast_to(scale, (3,))
    except (TypeError, ValueError, AttributeError):
        return None
    tail = NormalizeTail(shift, scale)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
    saved = random.getstate(), np.random.get_state()
    try:  # (the probes leave the user's global random state as they found it)
        theirs = np.asarray(last(image=ramp)["image"])
        ours = tail.apply(ramp)
        if theirs.dtype != np.float32 or theirs.shape != ours.shape or not np.array_equal(
                theirs.view(np.uint32), ours.view(np.uint32)):
            return None
        head = AlbumentationsTransform(
            _new_compose(A, transforms[:-1], keypoint_params(compose)), version=version)
        out, _, _ = on_probe_input(head)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[-1] != 3:
        return None
    return head, tail


class CompactRest:
    """A cut random Compose whose live rest stops before its final Normalize: ``run_rest``
    returns the uint8 image the Normalize would take (the polygons and inverse as the whole
    rest gives them) and leaves the random state where the whole rest leaves it, so the
    Normalize, applied later (:class:`NormalizeTail`), gives the user's output bit for bit."""

    def __init__(self, cut: PrefixCut, rest: Any, burn: int) -> None:
        self.cut = cut
        self.rest = rest  # the rest without its Normalize
        self.burn = burn  # global draws the skipped Normalize would have made

    def run_rest(self, prefix_output: TransformResult) -> TransformResult:
        image, polygons, inverse = prefix_output
        for _ in range(self.cut.draws):
            random.random()
        out_image, out_polys, rest_inverse = run_compose(self.rest, image, polygons)
        for _ in range(self.burn):
            random.random()
        return out_image, out_polys, inverse @ rest_inverse


def compact_rest(cut: PrefixCut, tail: NormalizeTail, trials: int = 4
                 ) -> CompactRest | None:
    """``cut``'s rest without its final Normalize (``tail``), when running that and then
    ``tail`` is proven to give what the whole rest gives: same image bits, polygons, inverse
    and random state afterwards, for ``trials`` seeds on a probe image. Else None."""
    A = load_albumentations()
    rest = cut.rest_compose
    if rest is None or rest is cut.whole or cut.prefix is None or not cut.global_draws:
        # (albumentations 2's transforms carry their own generators: not done for them yet)
        return None
    transforms = list(rest.transforms)
    params = keypoint_params(cut.whole)
    shorter = _new_compose(A, transforms[:-1], params)
    whole, part = _draws_of(rest), _draws_of(shorter)
    if whole is None or part is None or whole < part:
        return None
    candidate = CompactRest(cut, shorter, whole - part)
    front = on_probe_input(cut.run_prefix)
    saved = random.getstate(), np.random.get_state()
    try:
        for seed in range(trials):
            expected = _seeded(seed, lambda: cut.run_rest(front))
            got = _seeded(seed, lambda: candidate.run_rest(front))
            (img_a, polys_a, inv_a), state_a = expected
            (img_b, polys_b, inv_b), state_b = got
            if img_b.dtype != np.uint8 or img_a.dtype != np.float32:
                return None
            finished = tail.apply(img_b)
            if (finished.shape != img_a.shape
                    or not np.array_equal(finished.view(np.uint32), img_a.view(np.uint32))
                    or len(polys_a) != len(polys_b)
                    or not all(np.array_equal(a, b) for a, b in zip(polys_a, polys_b,
                                                                   strict=True))
                    or not np.array_equal(inv_a, inv_b, equal_nan=True)
                    or state_a != state_b):
                return None
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return candidate


def _seeded(seed: int, run: Any) -> tuple[TransformResult, Any]:
    """``run()`` under ``seed`` (the global generators) and the ``random`` state it leaves."""
    random.seed(seed)
    np.random.seed(seed)
    out = run()
    return out, random.getstate()


# The earlier names (a prefix/rest cut was called a split).
SplitTransform = PrefixCut
split_deterministic_prefix = cut_deterministic_prefix
split_normalize_tail = cut_normalize_tail

__all__ = ["CompactRest", "NormalizeTail", "PrefixCut", "SplitTransform", "compact_rest",
           "cut_deterministic_prefix", "cut_normalize_tail", "split_deterministic_prefix",
           "split_normalize_tail"]
