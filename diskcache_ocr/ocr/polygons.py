"""A sample's polygons: views of one array, pickled as that array and its split points."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class Polygons(list):  # type: ignore[type-arg]
    """A sample's polygons: a plain list of (k, 2) float32 arrays, all views of one array.

    Pickled (a DataLoader worker sending its batch) as that one array and the split points,
    which the other side turns back into views, instead of one small array per word. A list
    that was changed (an item replaced, added or removed) pickles as a plain list.
    """

    __slots__ = ("_flat", "_views")
    _flat: np.ndarray
    _views: tuple[np.ndarray, ...]

    @classmethod
    def from_flat(cls, flat: np.ndarray, ends: Sequence[int]) -> Polygons:
        """The polygons ``flat[0:ends[0]]``, ``flat[ends[0]:ends[1]]``, ... as views."""
        out = cls(flat[a:b] for a, b in zip([0, *ends], ends, strict=False))
        out._flat = flat
        out._views = tuple(out)
        return out

    split = from_flat  # the former name, kept for callers

    def __reduce__(self) -> tuple[Any, ...]:
        views = getattr(self, "_views", None)
        if views is None or len(views) != len(self) or any(
                a is not b for a, b in zip(self, views, strict=True)):
            return (list, (list(self),))
        ends = np.cumsum([len(v) for v in views], dtype=np.int64)
        return (_polygons_from_flat, (self._flat, ends))


def _polygons_from_flat(flat: np.ndarray, ends: np.ndarray) -> Polygons:
    return Polygons.from_flat(flat, ends.tolist())


__all__ = ["Polygons"]
