"""The split's images and their words, as flat arrays shared by every process.

A :class:`Catalog` is the annotation index's columns (:mod:`diskcache_ocr.ocr.annindex`: a
read-only memory map of a file in the cache directory, or arrays of this process) and which
of its entries are the split's images. It holds numpy arrays only, no Python object per image
or word, so a forked DataLoader worker that reads it dirties no copy-on-write page, and it
pickles (for spawned workers) as the index file's path, mapped again on the other side.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from diskcache_ocr.errors import AnnotationError, SourceError
from diskcache_ocr.ocr.annindex import Index, load_index, open_index
from diskcache_ocr.ocr.annotations import (
    AnnotationSet,
    ImageAnnotation,
    Rules,
    load_annotations,
)
from diskcache_ocr.ocr.columns import ENTRY_OK, Columns, select
from diskcache_ocr.ocr.polygons import Polygons
from diskcache_ocr.ocr.transform import map_points

log = logging.getLogger("diskcache_ocr.annotations")

_COLUMN_ATTRS = {"names": "_names", "name_off": "_name_off", "word_start": "_word_start",
                 "point_start": "_point_start", "points": "_points", "ignore": "_ignore",
                 "word_ids": "_word_ids", "word_id_off": "_word_id_off"}
_NO_BYTES = np.zeros(0, np.uint8)
_NO_OFFSETS = np.zeros(0, np.int64)


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
        if ann is None or not str(annotations).strip() or ann.suffix.lower() != ".json" \
                or not ann.is_file():
            return cls(load_annotations(images_dir, annotations, rules))
        if rules not in ("db", "origin"):
            raise ValueError(f"rules must be 'db' or 'origin', got {rules!r}")
        root = Path(images_dir)
        if not root.is_dir():
            raise SourceError(str(root), "images directory does not exist or is not a "
                              "directory")
        root = root.resolve()
        if cache_dir is None:
            log.info("%s: nothing is cached: the annotations are parsed and held in this "
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
        c = index.columns
        for name, attr in _COLUMN_ATTRS.items():
            setattr(self, attr, getattr(c, name))
        self._name_order = index.name_order
        # the entries that are images (all of them: 0..E-1), and their names where they
        # differ from the names as written (else empty)
        self._rows = np.arange(len(c), dtype=np.int64) if rows is None else rows
        if files is None:
            self._files, self._files_off, self._files_order = _NO_BYTES, _NO_OFFSETS, _NO_OFFSETS
        else:
            enc = [f.encode("utf-8", "surrogatepass") for f in files]
            self._files = np.frombuffer(b"".join(enc), np.uint8)
            self._files_off = np.concatenate(
                [[0], np.cumsum([len(e) for e in enc], dtype=np.int64)]).astype(np.int64)
            self._files_order = np.array(sorted(range(len(enc)), key=enc.__getitem__),
                                         np.int64)
        where = {} if index.path is None else {
            "path": str(index.path), "content": index.content, "rules": index.rules,
            "identity": index.identity}
        self._mapped = np.frombuffer(json.dumps(where).encode(), np.uint8)

    # -- pickling: a mapped index travels as its path ---------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if not json.loads(self._mapped.tobytes()):
            return dict(self.__dict__)
        mapped = set(_COLUMN_ATTRS.values()) | {"_name_order"}
        return {k: v for k, v in self.__dict__.items() if k not in mapped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        where = json.loads(self._mapped.tobytes())
        if not where:
            return
        path = Path(where["path"])
        ident = where["identity"]
        try:
            index = open_index(path, where["content"], where["rules"],
                               identity=None if ident is None else tuple(ident))
        except (OSError, ValueError) as exc:
            raise AnnotationError(str(path), f"the annotation index cannot be opened again "
                                  f"({exc})") from exc
        for name, attr in _COLUMN_ATTRS.items():
            setattr(self, attr, getattr(index.columns, name))
        self._name_order = index.name_order

    # -- one image --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def _pos(self, index: int) -> int:
        n = len(self._rows)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        return int(index) % n

    def _entry(self, index: int) -> int:
        return int(self._rows[self._pos(index)])

    def source(self, index: int) -> str:
        if len(self._files_off):
            i = self._pos(index)
            a, b = self._files_off[i], self._files_off[i + 1]
            return self._files[a:b].tobytes().decode("utf-8", "surrogatepass")
        e = self._entry(index)
        return self._names[self._name_off[e]:self._name_off[e + 1]].tobytes().decode(
            "utf-8", "surrogatepass")

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

    def moved_polygons(self, index: int, matrix: np.ndarray) -> Polygons:
        """The image's polygons in the transformed image's coordinates, in one pass."""
        points, sizes, _ = self.flat_words(index)
        return Polygons.from_flat(map_points(points, matrix), np.cumsum(sizes).tolist())

    def word_ids(self, index: int) -> list[str]:
        e = self._entry(index)
        a, b = int(self._word_start[e]), int(self._word_start[e + 1])
        off = self._word_id_off[a:b + 1].tolist()
        blob = self._word_ids[off[0]:off[-1]].tobytes() if off else b""
        return [blob[x - off[0]:y - off[0]].decode("utf-8", "surrogatepass")
                for x, y in zip(off, off[1:], strict=False)]

    def find(self, file: str) -> int | None:
        """The index of the image named ``file`` (a binary search by name), or None."""
        key = file.encode("utf-8", "surrogatepass")
        if len(self._files_off):
            order, blob, off = self._files_order, self._files, self._files_off
        else:
            order, blob, off = self._name_order, self._names, self._name_off

        def name(j: int) -> bytes:
            e = int(order[j])
            return blob[off[e]:off[e + 1]].tobytes()

        j = bisect.bisect_left(range(len(order)), key, key=name)
        if j == len(order) or name(j) != key:
            return None
        found = int(order[j])
        if len(self._files_off):
            return found
        i = int(np.searchsorted(self._rows, found))  # entry -> its place among the images
        return i if i < len(self._rows) and self._rows[i] == found else None

    def annotation_set(self, images_dir: Path | None = None) -> AnnotationSet:
        items = []
        for i in range(len(self)):
            polygons, ignore = self.words(i)
            items.append(ImageAnnotation(self.source(i), tuple(polygons),
                                         tuple(ignore.tolist()), tuple(self.word_ids(i))))
        return AnnotationSet(images_dir or self.images_dir, tuple(items), self.problems)


def _index_of(items: tuple[ImageAnnotation, ...]) -> Index:
    """Columns of given items (each one an image to serve)."""
    names = [it.file.encode("utf-8", "surrogatepass") for it in items]
    polys = [p for it in items for p in it.polygons]
    ids = [w.encode("utf-8", "surrogatepass") for it in items for w in it.word_ids]

    def offsets(lengths: Any) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)

    cols = Columns(
        names=np.frombuffer(b"".join(names), np.uint8), name_off=offsets([len(n) for n in names]),
        entry_state=np.full(len(items), ENTRY_OK, np.int8),
        word_start=offsets([len(it.polygons) for it in items]),
        point_start=offsets([len(p) for p in polys]),
        points=(np.concatenate(polys).astype(np.float64) if polys
                else np.zeros((0, 2), np.float64)),
        ignore=np.array([i for it in items for i in it.ignore], bool),
        word_ids=np.frombuffer(b"".join(ids), np.uint8), word_id_off=offsets([len(w) for w in ids]),
        plain=True)
    order = np.array(sorted(range(len(names)), key=names.__getitem__), np.int64)
    return Index(cols, order)


__all__ = ["Catalog"]
