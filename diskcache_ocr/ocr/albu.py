"""albumentations ``Compose`` as a transform stage, and its cacheable deterministic prefix.

Polygons travel as ``xy`` keypoints, the way DBNet codebases feed them, and are split back
into polygons afterwards. The inverse matrix comes from four probe keypoints transformed with
them (three fix an affine map, the fourth checks it); a transform that is not affine gets an
all-NaN matrix. Works with albumentations 1.3.x and 2.x.

The fingerprint describes what the Compose does: the class of every transform (nested
Composes, ``OneOf``... included) with everything it holds — its constructor arguments
(``get_transform_init_args``) and its whole instance state, which ``A.to_dict`` does not
always cover (albumentations 1.3.1 leaves out ``PadIfNeeded(position=...)``) — the
keypoint/bbox parameters and additional targets, plus the albumentations and OpenCV versions.
A value that is not plain data nor albumentations' own (a ``Lambda``'s function, a custom
transform class) has no stable description: such a Compose is cached only under a version
its owner gives, else computed live with a :class:`NotCacheableWarning`.
"""

from __future__ import annotations

import copy
import enum
import functools
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diskcache_ocr.ocr.conventions import TransformResult
from diskcache_ocr.ocr.stages import (
    TransformStage,
    Words,
    _not_cacheable,
    _to_numpy,
    on_probe_input,
    opencv_version,
    plain_version,
    probe_randomness,
)
from diskcache_ocr.ocr.transform import normalize_channels_last


def _albumentations() -> Any:
    try:
        import albumentations
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("an albumentations transform needs the albumentations package: "
                          "pip install 'diskcache-ocr[albumentations]'") from e
    return albumentations


def is_compose(obj: object) -> bool:
    """True for an ``albumentations.Compose`` (without importing albumentations otherwise)."""
    module = type(obj).__module__ or ""
    if not module.startswith("albumentations"):
        return False
    return isinstance(obj, _albumentations().Compose)


def _keypoint_params(compose: Any) -> Any:
    proc = getattr(compose, "processors", {}).get("keypoints")
    if proc is None:
        raise ValueError("the albumentations Compose needs keypoint_params="
                         "A.KeypointParams(format='xy') so polygons can travel with the image")
    if proc.params.format != "xy":
        raise ValueError(f"the Compose's KeypointParams format must be 'xy', got "
                         f"{proc.params.format!r}")
    return proc.params


class Undescribable(ValueError):
    """A value inside a transform that has no stable description (see :func:`describe`)."""

    def __init__(self, path: str, value: object) -> None:
        super().__init__(f"{path} is {_qualname(value)}, which has no stable description")
        self.path = path


# Instance attributes that are run-time state, not what a transform does: the replay
# record of the last call (a dict named ``params``; a processor's ``params`` are its
# KeypointParams and count), and (albumentations 2) the transform's own generators.
_RUNTIME_STATE = frozenset({"applied_in_replay", "random_generator", "py_random"})


def _runtime_state(name: str, value: object) -> bool:
    return name in _RUNTIME_STATE or (name == "params" and isinstance(value, dict))


# Code whose behaviour the fingerprint's versions pin down (albumentations and OpenCV), or
# that does not change: a function or class of these is described by its qualified name.
_VERSIONED_CODE = ("albumentations", "cv2", "numpy", "builtins", "math", "operator")
_MAX_DEPTH = 64


def _qualname(value: object) -> str:
    target = value if isinstance(value, type) or callable(value) and hasattr(
        value, "__qualname__") else type(value)
    kind = "" if target is value else "a "
    return (f"{kind}{getattr(target, '__module__', '?')}."
            f"{getattr(target, '__qualname__', type(target).__name__)}")


def _versioned_code(value: object) -> bool:
    module = getattr(value, "__module__", None) or ""
    return module.split(".")[0] in _VERSIONED_CODE


def describe(value: object, path: str = "compose", *, lenient: bool = False,
             _depth: int = 0) -> Any:
    """Plain data that says what ``value`` (a Compose, a transform, or anything one holds)
    does: plain values as they are (OmegaConf containers, tuples and numpy values as plain
    lists and numbers), an albumentations object as its class with its constructor arguments
    and instance state, a function or class of albumentations/OpenCV/numpy by name.

    Anything else raises :class:`Undescribable` naming where it sits; with ``lenient`` it is
    described by its type's name only (for a Compose its owner versions explicitly)."""
    if _depth > _MAX_DEPTH:
        raise Undescribable(path, value)
    deeper = functools.partial(_describe_child, lenient=lenient, depth=_depth + 1)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, enum.Enum):
        return {"enum": _qualname(type(value)), "value": deeper(value.value, f"{path}.value")}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise Undescribable(path, value)
        return {"ndarray": value.dtype.str, "shape": list(value.shape),
                "values": value.tolist()}
    if isinstance(value, Mapping):
        pairs = [[deeper(k, f"{path}.<key>"), deeper(v, f"{path}.{k}")]
                 for k, v in value.items()]
        return {"mapping": sorted(pairs, key=lambda kv: repr(kv[0]))}
    if isinstance(value, (set, frozenset)):
        items = [deeper(v, f"{path}.<item>") for v in value]
        return {"set": sorted(items, key=repr)}
    if isinstance(value, Sequence):
        return [deeper(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, functools.partial):
        return {"partial": deeper(value.func, f"{path}.func"),
                "args": deeper(value.args, f"{path}.args"),
                "keywords": deeper(value.keywords, f"{path}.keywords")}
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__") or (
            callable(value) and hasattr(value, "__qualname__")):
        # a class, a function, a builtin or a bound method: code, known only by its name
        owner = getattr(value, "__self__", None)
        if _versioned_code(value) and (owner is None or isinstance(owner, type)
                                       or _versioned_code(type(owner))):
            return {"code": _qualname(value)}
        if lenient:
            return {"opaque": _qualname(value)}
        raise Undescribable(path, value)
    if _versioned_code(type(value)) and hasattr(value, "__dict__"):
        out: dict[str, Any] = {"class": _qualname(type(value))}
        init_args = getattr(value, "get_transform_init_args", None)
        if callable(init_args):
            try:
                args = init_args()
            except Exception:  # noqa: BLE001 - an accessor that fails: the state still says it
                args = None
            if isinstance(args, Mapping):
                out["init"] = deeper(args, f"{path}.init")
        state = {k: v for k, v in vars(value).items() if not _runtime_state(k, v)}
        out["state"] = deeper(state, path)
        return out
    if lenient:
        return {"opaque": _qualname(type(value))}
    raise Undescribable(path, value)


def _describe_child(value: object, path: str, *, lenient: bool, depth: int) -> Any:
    return describe(value, path, lenient=lenient, _depth=depth)


def _summary(compose: Any) -> str:
    """The names of a Compose's transforms, for messages."""
    return "[" + ", ".join(type(t).__name__ for t in compose.transforms) + "]"


class AlbumentationsTransform(TransformStage):
    """An ``albumentations.Compose`` with ``KeypointParams(format="xy")``."""

    def __init__(self, compose: Any, version: object = None) -> None:
        A = _albumentations()
        if not isinstance(compose, A.Compose):
            raise TypeError(f"expected an albumentations.Compose, got {type(compose).__name__}")
        _keypoint_params(compose)
        self.compose = compose
        self.name = f"the albumentations Compose {_summary(compose)}"
        self.version = None if version is None else plain_version(version, "transform_version")
        self.undescribable: str | None = None  # where the Compose holds something opaque
        try:
            self.description: Any = describe(compose)
        except Undescribable as e:
            # e.g. A.Lambda's function, a custom transform class: only its owner's explicit
            # version can name what it does.
            self.undescribable = str(e)
            self.description = describe(compose, lenient=True)
        self.cacheable = self.undescribable is None or self.version is not None
        if not self.cacheable:
            _not_cacheable(f"albumentations transform ({self.undescribable})")

    def fingerprint(self) -> dict[str, Any] | None:
        if not self.cacheable:
            return None
        return {"stage": "albumentations", "albumentations": _albumentations().__version__,
                "opencv": opencv_version(), "compose": self.description,
                "version": self.version}

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        return run_compose(self.compose, image, polygons)

    def random_reason(self, trials: int = 8) -> str | None:
        """Why the Compose is random: by its parameters (:func:`random_by_parameters`)
        without running it, else by the probe (run on a copy, so the user's transforms keep
        their random state)."""
        reason = random_by_parameters(self.compose)
        if reason is not None:
            return reason
        return _probe_compose(copy.deepcopy(self.compose), trials)


def _probe_compose(compose: Any, trials: int) -> str | None:
    reseed = getattr(compose, "set_random_seed", None)  # albumentations 2's own generators
    return on_probe_input(lambda image, polygons: probe_randomness(
        lambda: run_compose(compose, image, polygons), reseed, trials))


def _applied(t: Any) -> float:
    """The probability that ``t`` (a transform or a Compose) is applied."""
    if getattr(t, "always_apply", False) is True:
        return 1.0
    return float(getattr(t, "p", 1.0))


def _is_range(value: object) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and value[0] != value[1])


def _draws_parameters(A: Any, t: Any) -> bool:
    """Whether ``t``'s class draws parameters per call (overrides albumentations' own)."""
    return any(getattr(type(t), name, None) is not getattr(A.BasicTransform, name, None)
               for name in ("get_params", "get_params_dependent_on_targets",
                            "get_params_dependent_on_data"))


def random_by_parameters(t: Any, path: str = "compose") -> str | None:
    """Why ``t`` is random by what its parameters say, without running it: applied with a
    probability strictly between 0 and 1; a ``OneOf``/``SomeOf``/``OneOrOther`` (anything
    that picks among its transforms); a transform that draws its parameters from a range
    ``(lo, hi)`` with ``lo != hi``. None when its parameters say nothing random (the probe
    then decides)."""
    A = _albumentations()
    name = type(t).__name__
    p = _applied(t)
    if p <= 0:
        return None  # never applied
    if p < 1:
        return f"{path}: {name}(p={p:g}) is applied at random"
    if isinstance(t, A.BaseCompose):
        if not isinstance(t, (A.Compose, A.Sequential)):
            return f"{path}: {name} picks among its transforms at random"
        for i, child in enumerate(t.transforms):
            reason = random_by_parameters(child, f"{path}.transforms[{i}]")
            if reason is not None:
                return reason
        return None
    if _draws_parameters(A, t):
        try:
            args = t.get_transform_init_args()
        except Exception:  # noqa: BLE001 - then the probe decides
            args = {}
        for key, value in args.items():
            if _is_range(value):
                return f"{path}: {name}({key}={tuple(value)}) draws from a range at random"
    return None


def _probes(width: int, height: int) -> np.ndarray:
    # Inside the image (so remove_invisible keeps them under crops of the centre as long as
    # possible), not collinear; the fourth checks the affine fit.
    x0, x1 = (width - 1) * 0.25, (width - 1) * 0.75
    y0, y1 = (height - 1) * 0.25, (height - 1) * 0.75
    if x1 == x0:
        x0, x1 = 0.0, 0.5
    if y1 == y0:
        y0, y1 = 0.0, 0.5
    return np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])


def run_compose(compose: Any, image: np.ndarray, polygons: Sequence[np.ndarray]
                ) -> TransformResult:
    """Run ``compose`` on the image with the polygons (and four probes) as keypoints.

    Each keypoint carries its word and vertex number after ``x, y`` (albumentations keeps
    such extra values with a keypoint), so when the Compose drops keypoints
    (``KeypointParams(remove_invisible=True)`` and a crop) the words that come back whole
    are known: they are returned, as :class:`Words` saying which input word each is, and
    the others are dropped. Without all four probes the inverse matrix is all NaN.
    """
    polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in polygons]
    sizes = np.array([len(p) for p in polys] + [4], np.int64)
    probes = _probes(image.shape[1], image.shape[0])
    points = np.concatenate(polys + [probes]) if polys else probes
    word = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    word[-4:] = -1  # the probes
    vertex = np.arange(len(points), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    out = compose(image=image, keypoints=list(zip(*points.T.tolist(), word.tolist(),
                                                  vertex.tolist(), strict=True)))
    got = [tuple(k) for k in out["keypoints"]]
    moved = np.array([k[:2] for k in got], np.float64).reshape(-1, 2)
    tags = np.array([k[2:4] for k in got], np.int64).reshape(-1, 2)
    is_probe = tags[:, 0] < 0
    counts = np.bincount(tags[~is_probe, 0], minlength=len(polys))[:len(polys)]
    whole = np.flatnonzero(counts == sizes[:-1])
    rows = ~is_probe & np.isin(tags[:, 0], whole)
    kept_sizes = sizes[whole]
    expected = np.stack([np.repeat(whole, kept_sizes), np.arange(kept_sizes.sum())
                         - np.repeat(np.cumsum(kept_sizes) - kept_sizes, kept_sizes)], 1)
    if not np.array_equal(tags[rows], expected):
        raise ValueError("the transform reordered the keypoints of a polygon, so polygons "
                         "cannot be rebuilt")
    ends = np.cumsum(kept_sizes)[:-1]
    moved_polys = Words(np.split(moved[rows], ends) if len(whole) else [], whole)
    probe_rows = np.flatnonzero(is_probe)
    if len(probe_rows) == 4 and np.array_equal(tags[probe_rows, 1], np.arange(4)):
        inverse = _inverse_from_probes(probes, moved[probe_rows])
    else:
        inverse = np.full((3, 3), np.nan)
    return _to_numpy(out["image"]), moved_polys, inverse


def _inverse_from_probes(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Inverse of the affine map the probes went through (all NaN if it is not affine).

    The probes are the corners of an axis-aligned rectangle, so the map's columns are plain
    differences; closed forms keep an exact scale-and-shift exact (no solver noise).
    """
    (x0, y0), (x1, _), (_, y1) = src[:3]
    col_x = (dst[1] - dst[0]) / (x1 - x0)
    col_y = (dst[2] - dst[0]) / (y1 - y0)
    shift = dst[0] - col_x * x0 - col_y * y0
    predicted = col_x * src[3, 0] + col_y * src[3, 1] + shift
    scale = max(1.0, float(np.abs(dst).max()))
    if not np.allclose(predicted, dst[3], rtol=0, atol=1e-6 * scale):
        return np.full((3, 3), np.nan)
    a, b, c, d = col_x[0], col_y[0], col_x[1], col_y[1]
    if b == 0 and c == 0 and a != 0 and d != 0:
        inv = np.array([[1.0 / a, 0.0], [0.0, 1.0 / d]])
    else:
        det = a * d - b * c
        if det == 0:
            return np.full((3, 3), np.nan)
        inv = np.array([[d, -b], [-c, a]]) / det
    out = np.eye(3)
    out[:2, :2] = inv
    out[:2, 2] = 0.0 - inv @ shift  # (0.0 - : no negative zeros)
    return out


# ------------------------------------------------------------------ deterministic prefix

class SplitTransform:
    """A Compose cut into a deterministic, cacheable ``prefix`` and a live ``rest``.

    ``run_rest(prefix_output)`` gives what the whole Compose gives under the same random
    state, bit for bit. albumentations 1.x draws from the global ``random`` once per transform
    (and per Compose) even when ``p=1``, so the rest first consumes the draws the prefix would
    have. albumentations 2.x keeps generators in each transform; the rest runs the user's own
    transform objects, so seeding the whole Compose (``set_random_seed``) seeds the rest too.
    """

    def __init__(self, compose: Any, prefix_len: int, draws: int) -> None:
        A = _albumentations()
        params = _keypoint_params(compose)
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


def split_deterministic_prefix(compose: Any, trials: int = 8) -> SplitTransform:
    """Cut ``compose`` after its longest prefix of transforms that the probe finds
    deterministic (``p == 1`` or always applied, same output under different seeds, and no
    use of numpy's global generator); an empty prefix when none is or when the Compose itself
    has ``p < 1``."""
    A = _albumentations()
    params = _keypoint_params(compose)
    transforms = list(compose.transforms)
    if compose.p < 1:
        return SplitTransform(compose, 0, 0)
    n = 0
    while n < len(transforms) and _transform_deterministic(A, transforms[n], params, trials):
        n += 1
    if n == 0:
        return SplitTransform(compose, 0, 0)
    if _owns_generators(compose):
        return SplitTransform(compose, n, 0)
    draws = _draws_of(_new_compose(A, transforms[:n], params))
    if draws is None:
        return SplitTransform(compose, 0, 0)
    return SplitTransform(compose, n, draws - 1)  # minus the prefix Compose's own draw


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
        return _probe_compose(A.Compose([copy.deepcopy(t)], keypoint_params=params),
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


def split_normalize_tail(compose: Any, version: object = None
                         ) -> tuple[AlbumentationsTransform, NormalizeTail] | None:
    """``compose`` as its head (everything but a final ``Normalize``) and that Normalize, when
    the library can reproduce it exactly; else None.

    Reproducible means: always applied, the standard (mean, std) normalization, and equal
    to :meth:`NormalizeTail.apply`, bit for bit, for every uint8 value of every channel
    (the operation is per element and per channel, so that covers every image), with the
    head returning uint8 images of three channels (what is then stored).
    """
    A = _albumentations()
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
            _new_compose(A, transforms[:-1], _keypoint_params(compose)), version=version)
        out, _, _ = on_probe_input(head)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[-1] != 3:
        return None
    return head, tail


class CompactRest:
    """A split random Compose whose live rest stops before its final Normalize: ``run_rest``
    returns the uint8 image the Normalize would take (the polygons and inverse as the whole
    rest gives them) and leaves the random state where the whole rest leaves it, so the
    Normalize, applied later (:class:`NormalizeTail`), gives the user's output bit for bit."""

    def __init__(self, split: SplitTransform, rest: Any, burn: int) -> None:
        self.split = split
        self.rest = rest  # the rest without its Normalize
        self.burn = burn  # global draws the skipped Normalize would have made

    def run_rest(self, prefix_output: TransformResult) -> TransformResult:
        image, polygons, inverse = prefix_output
        for _ in range(self.split.draws):
            random.random()
        out_image, out_polys, rest_inverse = run_compose(self.rest, image, polygons)
        for _ in range(self.burn):
            random.random()
        return out_image, out_polys, inverse @ rest_inverse


def compact_rest(split: SplitTransform, tail: NormalizeTail, trials: int = 4
                 ) -> CompactRest | None:
    """``split``'s rest without its final Normalize (``tail``), when running that and then
    ``tail`` is proven to give what the whole rest gives: same image bits, polygons, inverse
    and random state afterwards, for ``trials`` seeds on a probe image. Else None."""
    A = _albumentations()
    rest = split.rest_compose
    if rest is None or rest is split.whole or split.prefix is None or not split.global_draws:
        # (albumentations 2's transforms carry their own generators: not done for them yet)
        return None
    transforms = list(rest.transforms)
    params = _keypoint_params(split.whole)
    shorter = _new_compose(A, transforms[:-1], params)
    whole, part = _draws_of(rest), _draws_of(shorter)
    if whole is None or part is None or whole < part:
        return None
    candidate = CompactRest(split, shorter, whole - part)
    front = on_probe_input(split.run_prefix)
    saved = random.getstate(), np.random.get_state()
    try:
        for seed in range(trials):
            expected = _seeded(seed, lambda: split.run_rest(front))
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


__all__ = ["AlbumentationsTransform", "CompactRest", "NormalizeTail", "SplitTransform",
           "compact_rest", "describe", "is_compose", "random_by_parameters", "run_compose",
           "split_deterministic_prefix",
           "split_normalize_tail"]
