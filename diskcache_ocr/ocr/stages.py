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
import contextlib
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from diskcache_ocr.errors import CacheError
from diskcache_ocr.ocr.conventions import TransformResult, get_convention

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


def probe_input(large: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image and polygon the probes run a transform on: small, or large (for a
    transform that needs more pixels, a fixed crop of a receipt-sized image)."""
    rng = np.random.default_rng(0)
    scale = 10 if large else 1
    image = rng.integers(0, 256, (97 * scale + 3, 131 * scale + 1, 3), dtype=np.uint8)
    word = np.array([[10.0, 12.0], [80.0, 12.0], [80.0, 40.0], [10.0, 40.0]]) * scale
    return image, [word]


_T = TypeVar("_T")


def on_probe_input(run: Callable[[np.ndarray, list[np.ndarray]], _T]) -> _T:
    """``run(image, polygons)`` on the small probe input, or on the large one when it fails
    on the small one (its error propagates when it fails on both)."""
    try:
        return run(*probe_input())
    except Exception:  # noqa: BLE001 - e.g. a crop larger than the small image
        return run(*probe_input(large=True))


class _ProbeAbort(Exception):
    """A run under a constant ``random.random()`` that keeps drawing (a rejection loop)."""


# The two values Python's ``random.random()`` is pinned to in the probe's last two runs: a
# check like ``random.random() < 0.05`` takes both branches, an ``< 1.0`` (albumentations'
# ``p=1``) one; the same for ``uniform(lo, hi)`` (``lo`` and nearly ``hi``).
_EXTREMES = (0.0, 1.0 - 2.0 ** -53)
_MAX_CONSTANT_DRAWS = 100_000
# Runs of a transform that read the OS's entropy: a 5 % event is missed once in 10^5.
ENTROPY_TRIALS = 224


def probe_randomness(run: Callable[[], TransformResult],
                     reseed: Callable[[int], None] | None = None,
                     trials: int = 8) -> str | None:
    """Why ``run()`` is random, or None when it is deterministic as far as can be seen.

    ``run`` goes ``trials`` times, each under another seed of every generator a transform
    may use: Python's ``random``, NumPy's global generator, torch's, the OS entropy that
    seeds a generator made without a seed (``np.random.default_rng()``, ``SystemRandom``;
    the probe feeds it seeded bytes), and ``reseed(seed)`` (e.g. an albumentations 2
    Compose's own generators). It is random when its output changes, or when it draws
    from NumPy's or torch's global generator at all: a rare event (``np.random.rand() <
    0.05``) shows in the generator's state, not in 8 outputs. Deterministic code draws from
    Python's ``random`` too (albumentations 1.x checks ``random.random() < p`` even for
    ``p=1``), so a run that drew from it goes twice more with ``random.random()`` pinned to 0
    and to just below 1, where a ``random.random() < 0.05`` takes its rare branch. A run that
    read entropy goes :data:`ENTROPY_TRIALS` times, with other entropy each time (a seeded
    generator, ``RandomState(42)``, reads it too, then ignores it). Every generator's state is
    restored afterwards. Not seen: a generator seeded from the OS inside C code
    (``random.Random()`` without a seed), or one the transform made before the probe.
    """
    saved = _rng_snapshot()
    try:
        with _entropy_feed() as entropy:
            first: TransformResult | None = None
            drew_python = False
            for seed in range(trials):
                _seed_all(seed, reseed, entropy)
                before = _rng_snapshot()
                out = run()
                after = _rng_snapshot()
                if not _same_np_state(before[1], after[1]):
                    return "it draws from NumPy's global random generator"
                if not _same_torch_state(before[2], after[2]):
                    return "it draws from torch's random generator"
                drew_python = drew_python or before[0] != after[0]
                if first is None:
                    first = out
                elif not _same_result(first, out):
                    return "its output changes with the random seed"
            assert first is not None or trials < 1
            if first is None:
                return None
            if drew_python:
                for value in _EXTREMES:
                    _seed_all(0, reseed, entropy)
                    try:
                        with _constant_random(value):
                            out = run()
                    except Exception:  # noqa: BLE001 - e.g. a rejection loop that never ends
                        return ("it draws from Python's random (fails when its draws are "
                                f"pinned to the {'high' if value >= 0.5 else 'low'} end)")
                    if not _same_result(first, out):
                        return ("its output depends on Python's random (draws pinned to the "
                                f"{'high' if value >= 0.5 else 'low'} end change it)")
            if entropy.reads:
                for seed in range(trials, max(trials, ENTROPY_TRIALS)):
                    _seed_all(0, reseed, entropy, entropy_seed=seed)
                    if not _same_result(first, run()):
                        return "its output changes with the OS's entropy (an unseeded generator)"
        return None
    finally:
        _restore(saved)


def _seed_all(seed: int, reseed: Callable[[int], None] | None, entropy: _EntropyFeed,
              entropy_seed: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    entropy.seed(seed if entropy_seed is None else entropy_seed)
    if reseed is not None:
        reseed(seed)


def _rng_snapshot() -> tuple[Any, Any, Any]:
    torch = sys.modules.get("torch")
    return (random.getstate(), np.random.get_state(),
            None if torch is None else torch.random.get_rng_state())


def _restore(state: tuple[Any, Any, Any]) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch = sys.modules.get("torch")
    if torch is not None and state[2] is not None:
        torch.random.set_rng_state(state[2])


def _same_np_state(a: Any, b: Any) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def _same_torch_state(a: Any, b: Any) -> bool:
    return a is None or b is None or bool((a == b).all())


class _EntropyFeed:
    """Seeded bytes in place of the OS's entropy for the probing thread, and whether it read
    any. Other threads keep reading the OS's (a token made meanwhile stays unpredictable)."""

    def __init__(self, urandom: Callable[[int], bytes],
                 randbits: Callable[[int], int] | None) -> None:
        self.reads = 0
        self._stream = random.Random(0)
        self._thread = threading.get_ident()
        self._urandom = urandom
        self._randbits = randbits

    def seed(self, seed: int) -> None:
        self._stream = random.Random(seed)

    def urandom(self, n: int) -> bytes:
        if threading.get_ident() != self._thread:
            return self._urandom(n)
        self.reads += 1
        return self._stream.randbytes(n)

    def randbits(self, k: int) -> int:
        if threading.get_ident() != self._thread and self._randbits is not None:
            return self._randbits(k)
        self.reads += 1
        return self._stream.getrandbits(k)


@contextlib.contextmanager
def _entropy_feed() -> Iterator[_EntropyFeed]:
    """Python's ``random`` module (``SystemRandom``, ``secrets``' generator) and NumPy's seed
    sequences (``default_rng()``, ``RandomState()``, a bit generator made without a seed)
    read their entropy from an :class:`_EntropyFeed` meanwhile."""
    import numpy.random.bit_generator as bit_generator

    urandom = random._urandom  # type: ignore[attr-defined]
    randbits = getattr(bit_generator, "randbits", None)
    feed = _EntropyFeed(urandom, randbits)
    random._urandom = feed.urandom  # type: ignore[attr-defined]
    if randbits is not None:
        bit_generator.randbits = feed.randbits
    try:
        yield feed
    finally:
        random._urandom = urandom  # type: ignore[attr-defined]
        if randbits is not None:
            bit_generator.randbits = randbits


@contextlib.contextmanager
def _constant_random(value: float) -> Iterator[None]:
    """``random.random()`` returns ``value`` in this thread, also inside ``uniform``,
    ``gauss``, ``choices`` (the module's shared generator), and the integer draws behind
    ``randint``, ``randrange``, ``choice``, ``shuffle`` and ``sample`` (``_randbelow``) and
    ``getrandbits`` go to the same end of their range; a run that keeps drawing is
    stopped."""
    inst = random._inst  # type: ignore[attr-defined]
    module_random, module_bits = random.random, random.getrandbits
    below, bits = inst._randbelow, inst.getrandbits
    thread = threading.get_ident()
    calls = 0
    high = value >= 0.5

    def counted() -> bool:
        nonlocal calls
        if threading.get_ident() != thread:  # (another thread draws as before)
            return False
        calls += 1
        if calls > _MAX_CONSTANT_DRAWS:
            raise _ProbeAbort
        return True

    def constant() -> float:
        return value if counted() else module_random()

    def constant_below(n: int) -> int:
        return (n - 1 if high else 0) if counted() else below(n)

    def constant_bits(k: int) -> int:
        return ((1 << k) - 1 if high else 0) if counted() else bits(k)

    random.random, random.getrandbits = constant, constant_bits
    inst.random, inst._randbelow, inst.getrandbits = constant, constant_below, constant_bits
    try:
        yield
    finally:
        random.random, random.getrandbits = module_random, module_bits
        del inst.random, inst._randbelow, inst.getrandbits


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
