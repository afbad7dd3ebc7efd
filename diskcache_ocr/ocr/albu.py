"""albumentations ``Compose`` as a transform stage.

Polygons travel as ``xy`` keypoints, the way DBNet codebases feed them, and are regrouped
into polygons afterwards. The inverse matrix comes from four probe keypoints transformed with
them (three fix an affine map, the fourth checks it); a transform that is not affine gets an
all-NaN matrix. Works with albumentations 1.3.x and 2.x.

The fingerprint is :func:`~diskcache_ocr.ocr.albu_describe.describe` of the Compose plus the
albumentations and OpenCV versions; a Compose holding something without a stable description
is cached only under a version its owner gives, else computed live with a
:class:`NotCacheableWarning`. Cutting a Compose into a cacheable deterministic prefix and a
live rest lives in :mod:`~diskcache_ocr.ocr.albu_cut`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from diskcache_ocr.ocr.albu_describe import Undescribable, describe
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


def load_albumentations() -> Any:
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
    return isinstance(obj, load_albumentations().Compose)


def keypoint_params(compose: Any) -> Any:
    proc = getattr(compose, "processors", {}).get("keypoints")
    if proc is None:
        raise ValueError("the albumentations Compose needs keypoint_params="
                         "A.KeypointParams(format='xy') so polygons can travel with the image")
    if proc.params.format != "xy":
        raise ValueError(f"the Compose's KeypointParams format must be 'xy', got "
                         f"{proc.params.format!r}")
    return proc.params


def _summary(compose: Any) -> str:
    """The names of a Compose's transforms, for messages."""
    return "[" + ", ".join(type(t).__name__ for t in compose.transforms) + "]"


class AlbumentationsTransform(TransformStage):
    """An ``albumentations.Compose`` with ``KeypointParams(format="xy")``."""

    def __init__(self, compose: Any, version: object = None) -> None:
        A = load_albumentations()
        if not isinstance(compose, A.Compose):
            raise TypeError(f"expected an albumentations.Compose, got {type(compose).__name__}")
        keypoint_params(compose)
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
        return {"stage": "albumentations", "albumentations": load_albumentations().__version__,
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
        return probe_compose(copy.deepcopy(self.compose), trials)


def probe_compose(compose: Any, trials: int) -> str | None:
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
    A = load_albumentations()
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


__all__ = ["AlbumentationsTransform", "Undescribable", "describe", "is_compose", "keypoint_params",
           "load_albumentations", "probe_compose", "random_by_parameters", "run_compose"]
