"""The split's images and their words, as flat arrays shared by every process.

A :class:`Catalog` is the annotation index's columns (:mod:`diskcache_ocr.annindex`; a
read-only memory map of a file in the cache directory, or arrays of this process) and the
entries of it that name usable images. It holds no Python object per image or word, so a
forked DataLoader worker touches no copy-on-write page by reading it, and it pickles (for
spawned workers) as the index file's path, mapped again on the other side.
"""

from __future__ import annotations

import bisect
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from diskcache_ocr.annindex import Index, load_index, open_index
from diskcache_ocr.errors import AnnotationError, SourceError
from diskcache_ocr.ocr.annotations import (
    AnnotationSet,
    ImageAnnotation,
    Rules,
    column_items,
    load_annotations,
)
from diskcache_ocr.ocr.columns import ENTRY_OK, Columns, Selection, select
from diskcache_ocr.ocr.transform import map_points

log = logging.getLogger("diskcache_ocr.annotations")


class Catalog:
    """The annotations as flat numpy arrays: no per-item Python objects, so DataLoader
    workers share them instead of copying them on touch.

    ``Catalog(annotation_set)`` holds given annotations; :meth:`load` reads a split (a JSON
    file through the annotation index in ``cache_dir``).
    """

    def __init__(self, annotations: AnnotationSet) -> None:
        self._set(_index_of(annotations.items), None, None)
        self.images_dir = annotations.images_dir
        self.problems = annotations.problems

    @classmethod
    def load(cls, images_dir: str | os.PathLike[str],
             annotations: str | os.PathLike[str] | None = None, rules: Rules = "db", *,
             cache_dir: str | os.PathLike[str] | None = None,
             readonly: bool = False) -> Catalog:
        """A split as :func:`~diskcache_ocr.ocr.annotations.load_annotations` reads it; a JSON
        file's columns come from the annotation index in ``cache_dir`` (made there once per
        content), or are parsed into this process when ``cache_dir`` is None."""
        ann = None if annotations is None else Path(annotations)
        if ann is None or ann.is_dir() or ann.suffix.lower() != ".json" or not ann.exists() \
                or not str(annotations).strip():
            return cls(load_annotations(images_dir, annotations, rules))
        root = Path(images_dir)
        if not root.is_dir():
            raise SourceError(str(root), "images directory does not exist or is not a "
                              "directory")
        root = root.resolve()
        if rules not in ("db", "origin"):
            raise ValueError(f"rules must be 'db' or 'origin', got {rules!r}")
        if cache_dir is None:
            log.info("%s: no cache directory: its annotations are parsed and held in this "
                     "process", ann)
        index = load_index(ann, rules, cache_dir, readonly=readonly)
        for note in index.columns.notes:
            log.warning("%s", note)
        chosen = select(index.columns, root, str(ann))
        for p in chosen.problems:
            log.warning("skipped: %s", p)
        out = cls.__new__(cls)
        out._set(index, chosen.rows, chosen.files)
        out.images_dir = root
        out.problems = tuple(chosen.problems)
        return out

    def _set(self, index: Index, rows: np.ndarray | None, files: list[str] | None) -> None:
        self._index = index
        c = index.columns
        self._cols = c
        self._rows = rows
        self._points, self._point_start, self._word_start = c.points, c.point_start, c.word_start
        self._ignore = c.ignore
        if files is None:
            self._files = self._files_off = None
        else:
            enc = [f.encode("utf-8", "surrogatepass") for f in files]
            self._files = np.frombuffer(b"".join(enc), np.uint8)
            self._files_off = np.concatenate(
                [[0], np.cumsum([len(e) for e in enc], dtype=np.int64)]).astype(np.int64)
        self._by_name: dict[str, int] | None = None

    # -- pickling: the index file's path, not its arrays ----------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in (
            "_index", "_cols", "_points", "_point_start", "_word_start", "_ignore", "_by_name")}
        ix = self._index
        if ix.path is None:
            state["_held"] = ix
        else:
            state["_mapped"] = (str(ix.path), ix.content, ix.rules, ix.identity)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held, mapped = state.pop("_held", None), state.pop("_mapped", None)
        rows, files, files_off = state["_rows"], state["_files"], state["_files_off"]
        if held is None:
            path, content, rules, identity = mapped
            try:
                held = open_index(Path(path), content, rules, identity=identity)
            except (OSError, ValueError) as exc:
                raise AnnotationError(path, f"the annotation index cannot be opened again "
                                      f"({exc})") from exc
        self.__dict__.update(state)
        self._set(held, rows, None)
        self._files, self._files_off = files, files_off

    # -- one image ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._cols) if self._rows is None else len(self._rows)

    def _pos(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        return int(index) % n

    def _entry(self, index: int) -> int:
        index = self._pos(index)
        return index if self._rows is None else int(self._rows[index])

    def source(self, index: int) -> str:
        if self._files is not None:
            index = self._pos(index)
            a, b = self._files_off[index], self._files_off[index + 1]
            return self._files[a:b].tobytes().decode("utf-8", "surrogatepass")
        return self._cols.name(self._entry(index))

    def words(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The annotated polygons (original coordinates) and ignore flags of one image."""
        e = self._entry(index)
        a, b = int(self._word_start[e]), int(self._word_start[e + 1])
        starts = self._point_start[a:b + 1].tolist()
        polys = [self._points[x:y] for x, y in zip(starts, starts[1:], strict=False)]
        return polys, self._ignore[a:b]

    def flat_words(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's words as views: all points (P, 2), points per word, ignore flags."""
        e = self._entry(index)
        a, b = int(self._word_start[e]), int(self._word_start[e + 1])
        starts = self._point_start[a:b + 1]
        return self._points[starts[0]:starts[-1]], np.diff(starts), self._ignore[a:b]

    def moved_polygons(self, index: int, matrix: np.ndarray) -> Any:
        """The image's polygons in the transformed image's coordinates, in one pass."""
        from diskcache_ocr.samples import Polygons

        points, sizes, _ = self.flat_words(index)
        return Polygons.split(map_points(points, matrix), np.cumsum(sizes).tolist())

    def find(self, file: str) -> int | None:
        """The index of the image named ``file``, or None."""
        if self._files is None and self._rows is None:
            c, order = self._cols, self._index.name_order
            key = file.encode("utf-8", "surrogatepass")
            i = bisect.bisect_left(range(len(order)), key, key=lambda j: _name_bytes(c, order, j))
            if i < len(order) and _name_bytes(c, order, i) == key:
                return int(order[i])
            return None
        if self._by_name is None:  # names rewritten or entries left out: a table of them
            self._by_name = {self.source(i): i for i in range(len(self))}
        return self._by_name.get(file)

    def annotation_set(self, images_dir: Path | None = None) -> AnnotationSet:
        rows = None if self._rows is None else self._rows
        files = None if self._files is None else [self.source(i) for i in range(len(self))]
        items = column_items(self._cols, Selection(rows, files, []))
        return AnnotationSet(images_dir or self.images_dir, tuple(items), self.problems)


def _name_bytes(c: Columns, order: np.ndarray, j: int) -> bytes:
    e = int(order[j])
    return c.names[c.name_off[e]:c.name_off[e + 1]].tobytes()


def _index_of(items: tuple[ImageAnnotation, ...]) -> Index:
    """Columns of given items (each one an image to serve)."""
    names = [it.file.encode("utf-8", "surrogatepass") for it in items]
    polys = [p for it in items for p in it.polygons]
    ids = [w.encode("utf-8", "surrogatepass") for it in items for w in it.word_ids]
    counts = np.array([len(it.polygons) for it in items], np.int64)
    sizes = np.array([len(p) for p in polys], np.int64)

    def offsets(lengths: Any) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)

    cols = Columns(
        names=np.frombuffer(b"".join(names), np.uint8), name_off=offsets([len(n) for n in names]),
        entry_state=np.full(len(items), ENTRY_OK, np.int8), word_start=offsets(counts),
        point_start=offsets(sizes),
        points=(np.concatenate(polys).astype(np.float64) if polys
                else np.zeros((0, 2), np.float64)),
        ignore=np.array([i for it in items for i in it.ignore], bool),
        word_ids=np.frombuffer(b"".join(ids), np.uint8), word_id_off=offsets([len(w) for w in ids]),
        plain=True)
    order = np.array(sorted(range(len(names)), key=names.__getitem__), np.int64)
    return Index(cols, order)


__all__ = ["Catalog"]
