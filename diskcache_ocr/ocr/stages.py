"""Pluggable transform and map stages, each with a fingerprint that versions what it makes.

A stage is what the cache stores the output of, so it must say what it is without pickling
or hashing code: an ``albumentations.Compose`` by what its transforms hold plus the
albumentations and OpenCV versions (:mod:`diskcache_ocr.ocr.albu`); a plain callable by the
``version`` its owner gives (a string, or a dict such as the Hydra config node that built
it) and the OpenCV version; a built-in by its parameters. A callable
without a version is computed live and never cached (``cacheable`` is False, and one
:class:`NotCacheableWarning` says so).

Call shapes (the DBNet-codebase ones):

* transform: ``stage(image HWC uint8, [(N, 2) polygons]) -> (image, polygons, inverse_matrix)``
  where ``inverse_matrix`` (3×3 float64) maps output pixels back to the input frame; a
  transform that drops words (a crop) adds ``kept``, the input index of each polygon it
  returns, so each word's don't-care flag follows it;
* maps: ``stage(polygons, height, width, ignore=None) -> {name: float32 array}``.

Stages hold no open resources and pickle for DataLoader workers (pickling a *stage* for
transport only; nothing pickled is ever stored).
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from diskcache_ocr.errors import CacheError
from diskcache_ocr.ocr.conventions import TransformResult, get_convention
from diskcache_ocr.ocr.probe import (  # noqa: F401 - the probe's home before it had its own
    ENTROPY_TRIALS,
    on_probe_input,
    probe_input,
    probe_randomness,
)

MapsResult = dict[str, np.ndarray]


class NotCacheableWarning(UserWarning):
    """A stage cannot be fingerprinted, so its output is computed live and never cached."""


class TransformError(CacheError, ValueError):
    """A transform's output the library cannot use as it stands (names the file and the
    transform)."""


class Words(list):  # type: ignore[type-arg]
    """The polygons a transform returned, with the input word each one is: ``index[i]`` is
    the position in the transform's input of polygon ``i``, or ``index`` is None when the
    transform changed the number of polygons without saying which it kept. This is how a
    word's don't-care flag follows it through a transform that drops words (a crop)."""

    def __init__(self, polygons: Sequence[np.ndarray], index: Any) -> None:
        super().__init__(polygons)
        self.index: np.ndarray | None = (
            None if index is None else np.asarray(index, np.int64).reshape(-1))


def kept_words(polygons: Sequence[np.ndarray], n_input: int) -> np.ndarray | None:
    """The input word of each of ``polygons`` (a transform's output for ``n_input`` words):
    what a :class:`Words` says, else one for one when the count is unchanged, else None."""
    if isinstance(polygons, Words):
        return polygons.index
    return np.arange(n_input, dtype=np.int64) if len(polygons) == n_input else None


def follow(first: np.ndarray | None, then: np.ndarray | None) -> np.ndarray | None:
    """The input words after two transforms in a row (None when either does not say)."""
    if first is None or then is None:
        return None
    return first[then]


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


def opencv_version() -> str:
    """The OpenCV version, part of the fingerprint of every stage that may call OpenCV (a
    user's callable usually does, and its owner's version does not say which OpenCV)."""
    import cv2

    return str(cv2.__version__)


def _not_cacheable(what: str) -> None:
    warnings.warn(f"{what} has no version, so its output cannot be fingerprinted: it is "
                  "computed live on every read and never cached. Pass version=... (a str, or "
                  "the config dict that built it) to cache it.",
                  NotCacheableWarning, stacklevel=3)


# --------------------------------------------------------------------------- transforms

class TransformStage(abc.ABC):
    """Base of the transform stages; built by :func:`diskcache_ocr.ocr.staged.transform_stage`.

    A stage may drop words (a crop): it then returns its polygons as :class:`Words`, saying
    which input word each one is.
    """

    cacheable: bool = True
    name: str = "transform"

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any] | None:
        """What versions this stage's output; None when it cannot be cached."""

    @abc.abstractmethod
    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        """(image, polygons) -> (image, moved polygons, inverse matrix)."""

    def is_deterministic(self, trials: int = 8) -> bool:
        """Whether the same input always gives the same output (see :meth:`random_reason`)."""
        return self.random_reason(trials) is None

    def random_reason(self, trials: int = 8) -> str | None:
        """Why this stage is random (None: deterministic as far as :func:`probe_randomness`
        can tell), from a probe on a small image."""
        return on_probe_input(lambda image, polygons: probe_randomness(
            lambda: self(image, polygons), trials=trials))


class BuiltinTransform(TransformStage):
    def __init__(self, convention: str) -> None:
        self.convention = convention
        self.name = f"the {convention!r} convention's built-in transform"
        self._fn = get_convention(convention).transform

    def fingerprint(self) -> dict[str, Any]:
        return {"stage": "builtin", "convention": self.convention, **self._fn.fingerprint()}

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        return self._fn(image, polygons)


class CallableTransform(TransformStage):
    """Any callable with the DBNet transform call shape, versioned by its owner.

    A callable that drops words (a random crop) says which it kept with a fourth value:
    ``(image, polygons, inverse_matrix, kept)``, ``kept[i]`` the input index of polygon
    ``i``; without it, a changed count leaves the don't-care flags without their words.
    """

    def __init__(self, fn: Callable[..., Any], version: object = None) -> None:
        if not callable(fn):
            raise TypeError(f"transform must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = f"transform {_callable_name(fn)}"
        self.version = None if version is None else plain_version(version, "transform_version")
        self.cacheable = self.version is not None
        if not self.cacheable:
            _not_cacheable(f"transform {_callable_name(fn)}")

    def fingerprint(self) -> dict[str, Any] | None:
        if self.version is None:
            return None
        return {"stage": "callable", "name": _callable_name(self.fn), "version": self.version,
                "opencv": opencv_version()}

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        out = self.fn(image, polygons)
        if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
            raise TypeError(f"{self.name} must return (image, polygons, inverse_matrix) or "
                            f"(image, polygons, inverse_matrix, kept), got "
                            f"{type(out).__name__}")
        img, polys, inverse = out[:3]
        moved = [np.asarray(p) for p in polys]
        if len(out) == 4:
            kept = np.asarray(out[3])
            if (kept.ndim != 1 or len(kept) != len(moved) or kept.dtype.kind not in "iu"
                    or (len(kept) and (kept.min() < 0 or kept.max() >= len(polygons)))):
                raise TypeError(f"{self.name}: kept must hold, for each of the {len(moved)} "
                                f"polygons returned, its index among the {len(polygons)} "
                                f"given; got {out[3]!r}")
            index: np.ndarray | None = kept
        else:
            index = kept_words(moved, len(polygons))
        return _to_numpy(img), Words(moved, index), np.asarray(inverse, np.float64)


def _to_numpy(image: Any) -> np.ndarray:
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor
        image = image.detach().cpu().numpy()
    return np.ascontiguousarray(image)


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
        fp = {"stage": "callable", "name": _callable_name(fn), "opencv": opencv_version(),
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
    "TransformError", "TransformStage", "Words", "follow", "kept_words", "maps_stage",
    "on_probe_input", "opencv_version", "plain_version", "probe_input", "probe_randomness",
]
