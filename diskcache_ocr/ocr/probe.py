"""Whether a transform is random, found by running it: the probe the stages use.

A transform's randomness is never taken from its name or its declared parameters alone. The
probe runs it on a small fixed input (:func:`probe_input`) under seeded generators, with
Python's ``random`` pinned to both ends of its range and the OS's entropy fed from a seeded
stream, and calls it random when any two runs differ (:func:`probe_randomness`).
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from diskcache_ocr.ocr.conventions import TransformResult


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



__all__ = ["ENTROPY_TRIALS", "on_probe_input", "probe_input", "probe_randomness"]
