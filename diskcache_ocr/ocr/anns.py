"""``anns`` as the origin project's code reads it, made one image at a time.

The origin's dataset holds ``anns``, an ``OrderedDict`` of file name → that image's polygons
(rounded int32 ``(k, 2)`` arrays) or None; its evaluator, loggers and callbacks read it with
``keys()``, ``get()``, ``[]``, ``in`` and ``len``. :class:`OrderedDict` here answers all of that
from the catalog, building an image's arrays when it is asked for, so nothing per image is
held. It is a subclass of ``collections.OrderedDict``, named as theirs, so code that checks
the type (or its name) sees what it expects. Changing it (``anns[k] = v``, ``del``, ``pop``,
...) first copies every image into the dict itself, which from then on is a plain one.
"""

from __future__ import annotations

import collections
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import Any

import numpy as np

from diskcache_ocr.ocr.conventions import round_points

_MISSING = object()


class OrderedDict(collections.OrderedDict):  # type: ignore[type-arg]
    """File name → rounded int32 polygons or None, in the split's order, built on access."""

    def __init__(self, catalog: Any = None) -> None:
        super().__init__()
        self._catalog = catalog

    def _value(self, i: int) -> list[np.ndarray] | None:
        return _value_of(self._catalog, i)

    def _own(self) -> None:
        """Copy every image in: from now on a plain OrderedDict."""
        cat = self._catalog
        if cat is not None:
            self._catalog = None
            for i in range(len(cat)):
                super().__setitem__(cat.source(i), _value_of(cat, i))

    # -- reading ---------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if self._catalog is None:
            return super().__getitem__(key)
        i = self._catalog.find(key) if isinstance(key, str) else None
        if i is None:
            raise KeyError(key)
        return self._value(i)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        if self._catalog is None:
            return super().__contains__(key)
        return isinstance(key, str) and self._catalog.find(key) is not None

    def __iter__(self) -> Iterator[str]:
        if self._catalog is None:
            return super().__iter__()
        cat = self._catalog
        return (cat.source(i) for i in range(len(cat)))

    def __reversed__(self) -> Iterator[str]:
        if self._catalog is None:
            return super().__reversed__()
        cat = self._catalog
        return (cat.source(i) for i in reversed(range(len(cat))))

    def __len__(self) -> int:
        return super().__len__() if self._catalog is None else len(self._catalog)

    def keys(self) -> Any:
        return super().keys() if self._catalog is None else KeysView(self)

    def values(self) -> Any:
        return super().values() if self._catalog is None else ValuesView(self)

    def items(self) -> Any:
        return super().items() if self._catalog is None else ItemsView(self)

    def __eq__(self, other: object) -> bool:
        if self._catalog is None:
            return super().__eq__(other)
        return collections.OrderedDict(self.items()) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrderedDict({list(self.items())!r})"

    def copy(self) -> collections.OrderedDict:  # type: ignore[type-arg]
        return collections.OrderedDict(self.items())

    def __reduce__(self) -> Any:
        if self._catalog is None:
            return (collections.OrderedDict, (list(self.items()),))
        return (OrderedDict, (self._catalog,))

    def __or__(self, other: Any) -> Any:
        return collections.OrderedDict(self.items()) | other

    # -- changing it: copied in first ------------------------------------------------------
    def __setitem__(self, key: Any, value: Any) -> None:
        self._own()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._own()
        super().__delitem__(key)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        self._own()
        return super().pop(key) if default is _MISSING else super().pop(key, default)

    def popitem(self, last: bool = True) -> Any:
        self._own()
        return super().popitem(last)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._own()
        return super().setdefault(key, default)

    def move_to_end(self, key: Any, last: bool = True) -> None:
        self._own()
        super().move_to_end(key, last)

    def clear(self) -> None:
        self._catalog = None
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._own()
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> Any:
        self._own()
        return super().__ior__(other)


def _value_of(catalog: Any, i: int) -> list[np.ndarray] | None:
    polygons, _ = catalog.words(i)
    return [round_points(p) for p in polygons] or None


__all__ = ["OrderedDict"]
