"""Pluggable transform and map stages, each with a fingerprint that versions what it makes.

A stage is what the cache stores the output of, so it must say what it is without pickling
or hashing code: an ``albumentations.Compose`` by albumentations' own serialization plus the
albumentations version; a plain callable by the ``version`` its owner gives (a string, or a
dict such as the Hydra config node that built it); a built-in by its parameters. A callable
without a version is computed live and never cached (``cacheable`` is False, and one
:class:`NotCacheableWarning` says so).

Call shapes (the DBNet-codebase ones):

* transform: ``stage(image HWC uint8, [(N, 2) polygons]) -> (image, polygons, inverse_matrix)``
  where ``inverse_matrix`` (3×3 float64) maps output pixels back to the input frame;
* maps: ``stage(polygons, height, width, ignore=None) -> {name: float32 array}``.

Stages hold no open resources and pickle for DataLoader workers (pickling a *stage* for
transport only; nothing pickled is ever stored).
"""

from __future__ import annotations

import abc
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from diskcache_ocr.ocr.conventions import TransformResult, get_convention

MapsResult = dict[str, np.ndarray]


class NotCacheableWarning(UserWarning):
    """A stage cannot be fingerprinted, so its output is computed live and never cached."""


def plain_version(version: object, where: str = "version") -> str | dict[str, Any]:
    """``version`` as plain data: a non-empty str, or a mapping (a Hydra ``DictConfig``
    works) turned into nested dicts/lists of str, int, float, bool and None."""
    if isinstance(version, str):
        if not version:
            raise ValueError(f"{where}: expected a non-empty str or a mapping, got ''")
        return version
    if isinstance(version, Mapping):
        return _plain(version, where)  # type: ignore[return-value]
    raise TypeError(f"{where}: expected a str or a mapping (e.g. a Hydra config node), "
                    f"got {type(version).__name__}")


def _plain(value: object, where: str) -> object:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, Sequence):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{where}: {type(value).__name__} is not plain data (str, number, bool, "
                    "None, list or mapping)")


def _callable_name(fn: Callable[..., Any]) -> str:
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def _not_cacheable(what: str) -> None:
    warnings.warn(f"{what} has no version, so its output cannot be fingerprinted: it is "
                  "computed live on every read and never cached. Pass version=... (a str, or "
                  "the config dict that built it) to cache it.",
                  NotCacheableWarning, stacklevel=3)


# --------------------------------------------------------------------------- transforms

class TransformStage(abc.ABC):
    """Base of the transform stages; built by :func:`diskcache_ocr.ocr.staged.transform_stage`."""

    cacheable: bool = True

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any] | None:
        """What versions this stage's output; None when it cannot be cached."""

    @abc.abstractmethod
    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        """(image, polygons) -> (image, moved polygons, inverse matrix)."""

    def is_deterministic(self, trials: int = 8) -> bool:
        """Probe: the same input, under different random states, gives the same output."""
        return _probe_deterministic(self, trials)


class BuiltinTransform(TransformStage):
    def __init__(self, convention: str) -> None:
        self.convention = convention
        self._fn = get_convention(convention).transform

    def fingerprint(self) -> dict[str, Any]:
        return {"stage": "builtin", "convention": self.convention, **self._fn.fingerprint()}

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        return self._fn(image, polygons)


class CallableTransform(TransformStage):
    """Any callable with the DBNet transform call shape, versioned by its owner."""

    def __init__(self, fn: Callable[..., Any], version: object = None) -> None:
        if not callable(fn):
            raise TypeError(f"transform must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.version = None if version is None else plain_version(version, "transform_version")
        self.cacheable = self.version is not None
        if not self.cacheable:
            _not_cacheable(f"transform {_callable_name(fn)}")

    def fingerprint(self) -> dict[str, Any] | None:
        if self.version is None:
            return None
        return {"stage": "callable", "name": _callable_name(self.fn), "version": self.version}

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        out = self.fn(image, polygons)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise TypeError(f"transform {_callable_name(self.fn)} must return (image, polygons, "
                            f"inverse_matrix), got {type(out).__name__}")
        img, polys, inverse = out
        return (_to_numpy(img), [np.asarray(p) for p in polys],
                np.asarray(inverse, np.float64))


def _to_numpy(image: Any) -> np.ndarray:
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor
        image = image.detach().cpu().numpy()
    return np.ascontiguousarray(image)


def _probe_deterministic(stage: TransformStage, trials: int) -> bool:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    polygons = [np.array([[10.0, 12.0], [80.0, 12.0], [80.0, 40.0], [10.0, 40.0]])]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        first = None
        for seed in range(trials):
            random.seed(seed)
            np.random.seed(seed)
            out = stage(image, polygons)
            if first is None:
                first = out
            elif not _same_result(first, out):
                return False
        return True
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _same_result(a: TransformResult, b: TransformResult) -> bool:
    return (np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1])
            and all(np.array_equal(p, q) for p, q in zip(a[1], b[1], strict=True))
            and np.array_equal(a[2], b[2], equal_nan=True))


# --------------------------------------------------------------------------------- maps

class MapsStage:
    """DBNet map maker: the convention's built-in with its parameters, or a versioned
    callable ``fn(polygons, height, width, ignore=None) -> {name: array}``."""

    def __init__(self, fn: Callable[..., MapsResult], fingerprint: dict[str, Any] | None,
                 name: str) -> None:
        self.fn = fn
        self._fingerprint = fingerprint
        self.cacheable = fingerprint is not None
        self.name = name

    @classmethod
    def builtin(cls, convention: str = "db", **params: Any) -> MapsStage:
        """The built-in maker of ``convention``; ``params`` override its defaults
        (origin: shrink_ratio, thresh_min, thresh_max; db: also min_text_size)."""
        base = get_convention(convention).maps
        if params:
            config = type(base.config)(**{**base.config.__dict__, **params})
            base = type(base)(config)  # type: ignore[arg-type]
        fp = {"stage": "builtin", "convention": convention, **base.fingerprint()}
        return cls(base, fp, f"builtin:{convention}")

    @classmethod
    def from_callable(cls, fn: Callable[..., MapsResult], version: object = None) -> MapsStage:
        if not callable(fn):
            raise TypeError(f"maps must be callable, got {type(fn).__name__}")
        if version is None:
            _not_cacheable(f"maps {_callable_name(fn)}")
            return cls(fn, None, _callable_name(fn))
        fp = {"stage": "callable", "name": _callable_name(fn),
              "version": plain_version(version, "maps_version")}
        return cls(fn, fp, _callable_name(fn))

    def fingerprint(self) -> dict[str, Any] | None:
        return self._fingerprint

    def __call__(self, polygons: Sequence[np.ndarray], height: int, width: int,
                 ignore: Sequence[bool] | None = None) -> MapsResult:
        out = self.fn(polygons, height, width, ignore=ignore)
        if not isinstance(out, Mapping) or not out:
            raise TypeError(f"maps {self.name} must return a non-empty dict of arrays, "
                            f"got {type(out).__name__}")
        return {str(k): np.asarray(v) for k, v in out.items()}


def maps_stage(maps: object = None, *, version: object = None, convention: str = "db",
               **params: Any) -> MapsStage:
    """The maps stage for what a user passes (None: the convention's built-in maker)."""
    if maps is None:
        if version is not None:
            raise ValueError("maps_version is only for a maps callable you pass")
        return MapsStage.builtin(convention, **params)
    if isinstance(maps, MapsStage):
        return maps
    if params:
        raise ValueError(f"map parameters {sorted(params)} apply to the built-in maker only")
    return MapsStage.from_callable(maps, version)  # type: ignore[arg-type]


__all__ = [
    "BuiltinTransform", "CallableTransform", "MapsStage", "NotCacheableWarning",
    "TransformStage", "maps_stage", "plain_version",
]
