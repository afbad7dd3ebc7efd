"""The rules one annotation entry is read by, and what reading it gives.

:class:`ImageAnnotation` (one image's words), :class:`AnnotationSet` (a split's),
:class:`Problem` (one skipped word or image); the checks of an image name
(:func:`safe_source_path`) and of one word under the two rule sets (see
:mod:`~diskcache_ocr.ocr.annotations`). Both readers of a JSON file use them: the per-word
one in :mod:`~diskcache_ocr.ocr.annotations` and the columnar one in
:mod:`~diskcache_ocr.ocr.columns`, so a word is refused with the same message either way.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from diskcache_ocr.errors import SourceError
from diskcache_ocr.ocr.maps import polygon_area, polygon_is_simple

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MAX_SYMLINK_HOPS = 40  # same bound the OS uses before ELOOP
# Far outside any image; larger values overflow float32 once transformed (inf polygons).
MAX_COORDINATE = float(2**31)
# The simplicity check compares every pair of edges (quadratic time and memory); a word
# outline of more points than this is no real annotation, and refusing it bounds that work.
MAX_POLYGON_POINTS = 1000
_BAD_NAMES = (
    (lambda r: "\0" in r, "contains a NUL character"),
    (lambda r: "\\" in r, "contains a backslash; use '/' separators"),
    (lambda r: r.startswith("/") or re.match(r"^[A-Za-z]:", r), "must be relative"),
    (lambda r: ".." in PurePosixPath(r).parts, "must not contain '..'"),
)


@dataclass(frozen=True)
class Problem:
    """One skipped word or image, with the file (and image / word) it concerns."""

    source: str
    word: str | None
    reason: str
    image: str | None = None  # the image entry inside `source`, when source is an annotation file

    def __str__(self) -> str:
        where = [self.source]
        if self.image is not None:
            where.append(self.image if self.word is None else f"{self.image} word {self.word}")
        elif self.word is not None:
            where.append(f"word {self.word}")
        return ": ".join([*where, self.reason])


@dataclass(frozen=True)
class ImageAnnotation:
    """One image's words; polygons are (k, 2) float64 read-only arrays, k >= 1 (the "db"
    rules load k >= 4)."""

    file: str
    polygons: tuple[np.ndarray, ...] = ()
    ignore: tuple[bool, ...] = ()
    word_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        polys = []
        for p in self.polygons:
            arr = np.array(p, dtype=np.float64)  # own copy: callers can't mutate ours
            if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
                raise ValueError(f"{self.file}: polygon must have shape (k>=1, 2), got {arr.shape}")
            arr.flags.writeable = False
            polys.append(arr)
        object.__setattr__(self, "polygons", tuple(polys))
        object.__setattr__(self, "ignore", tuple(bool(i) for i in self.ignore))
        object.__setattr__(self, "word_ids", tuple(self.word_ids))
        if not len(self.polygons) == len(self.ignore) == len(self.word_ids):
            raise ValueError(f"{self.file}: polygons, ignore and word_ids differ in length")

    # ndarray fields defeat the generated __eq__/__hash__, so compare by value explicitly.
    def _key(self) -> tuple[Any, ...]:
        polys = tuple((p.shape, p.tobytes()) for p in self.polygons)
        return (self.file, self.ignore, self.word_ids, polys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageAnnotation) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclass(frozen=True)
class AnnotationSet:
    """A split: resolved images_dir, items in the annotation file's order, and what was
    skipped."""

    images_dir: Path
    items: tuple[ImageAnnotation, ...]
    problems: tuple[Problem, ...]


def safe_source_path(images_dir: str | os.PathLike[str], relative: str) -> Path:
    """Resolve `relative` inside `images_dir`, following symlinks only while they stay inside.

    Raises SourceError for absolute names, `..`, backslashes, NUL, or anything (symlinks
    included) that leaves the root. Nothing outside the root is ever stat'ed or read.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise SourceError(repr(relative), "file name must be a non-empty string")
    for bad, why in _BAD_NAMES:
        if bad(relative):
            raise SourceError(repr(relative), f"file name {why}")
    root = Path(images_dir).resolve()
    current, pending, hops = root, list(PurePosixPath(relative).parts), 0
    try:
        # One component at a time (not Path.resolve) so a symlink pointing outside is
        # rejected before anything beyond the root is touched.
        while pending:
            step = current / pending.pop(0)
            if not step.is_symlink():
                current = step
                continue
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise SourceError(relative, "too many levels of symbolic links")
            # Lexical normalisation is safe: the result is re-walked from the root below.
            target = Path(os.path.normpath(os.path.join(current, os.readlink(step))))
            if not target.is_relative_to(root):
                raise SourceError(relative, "symlink points outside the images directory")
            current, pending = root, [*target.relative_to(root).parts, *pending]
    except OSError as e:  # e.g. name too long, permission denied
        raise SourceError(relative, f"cannot access: {e.strerror or e}") from e
    if current == root:
        raise SourceError(relative, "names the images directory itself")
    return current


Rules = Literal["db", "origin"]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # unreadable counts as missing; the Problem says "not found"
        return False


def _check_image(root: Path, source: str, name: Any, problems: list[Problem]) -> str | None:
    """Return the normalised relative name if the image is usable, else record a Problem."""
    try:
        path = safe_source_path(root, name)
    except SourceError as e:
        problems.append(Problem(source, None, e.reason, image=str(name)))
        return None
    if not _is_file(path):
        problems.append(Problem(source, None, "image file not found", image=name))
        return None
    return PurePosixPath(name).as_posix()


def _polygon(points: Any) -> np.ndarray | str:
    """Validate raw points; return a (k, 2) array or the reason they are unusable."""
    if not isinstance(points, (list, tuple)):
        return f"points must be a list of [x, y] pairs, got {type(points).__name__}"
    if len(points) > MAX_POLYGON_POINTS:
        return f"has {len(points)} points; at most {MAX_POLYGON_POINTS} are allowed"
    coords: list[float] = []
    for i, pt in enumerate(points):
        if not isinstance(pt, (list, tuple)) or len(pt) != 2:
            return f"point {i} is not an [x, y] pair"
        for v in pt:
            # bool is an int subclass, but true/false as a coordinate is certainly a mistake
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"point {i} has a non-numeric coordinate ({type(v).__name__})"
            try:
                coords.append(float(v))
            except OverflowError:
                return f"point {i} has a coordinate too large for float64"
    if len(points) < 4:
        return f"needs at least 4 points, got {len(points)}"
    if not all(math.isfinite(c) for c in coords):
        return "coordinates must be finite (NaN or infinity found)"
    if any(c < 0 for c in coords):
        return "coordinates must not be negative"
    if any(c > MAX_COORDINATE for c in coords):
        return f"coordinates must not exceed {MAX_COORDINATE:.0f} (far outside any image)"
    return np.array(coords, dtype=np.float64).reshape(-1, 2)


def _collect_origin(file: str, src: str, words: Mapping[str, Any], problems: list[Problem]
                    ) -> ImageAnnotation:
    """The origin project's reading of one image's words: every word whose ``points`` is a
    non-empty list becomes a polygon, whatever its count or sign; nothing is a don't-care
    word. Points that are not finite ``[x, y]`` numbers are a Problem (the origin would fail
    on them)."""
    polys, ids = [], []
    for wid, word in words.items():
        points = word.get("points") if isinstance(word, Mapping) else None
        if not isinstance(points, list) or not points:
            continue  # the origin skips such a word without a word
        poly = _finite_points(points)
        if isinstance(poly, str):
            problems.append(Problem(src, wid, poly, image=file))
            continue
        polys.append(poly)
        ids.append(wid)
    return ImageAnnotation(file, tuple(polys), (False,) * len(polys), tuple(ids))


def _finite_points(points: list[Any]) -> np.ndarray | str:
    if len(points) > MAX_POLYGON_POINTS:
        return f"has {len(points)} points; at most {MAX_POLYGON_POINTS} are allowed"
    try:
        arr = np.array(points, dtype=np.float64)
    except (TypeError, ValueError):
        return "points must be a list of [x, y] number pairs"
    if arr.ndim != 2 or arr.shape[1] != 2 or any(isinstance(v, bool) for pt in points
                                                 for v in (pt if isinstance(pt, list) else ())):
        return "points must be a list of [x, y] number pairs"
    if not np.isfinite(arr).all():
        return "coordinates must be finite (NaN or infinity found)"
    if np.abs(arr).max() > MAX_COORDINATE:
        return f"coordinates must not exceed {MAX_COORDINATE:.0f} (far outside any image)"
    return arr


def _json_word(word: Any) -> tuple[np.ndarray, bool] | str:
    if not isinstance(word, Mapping):
        return "word must be an object"
    flag = word.get("ignore", False)
    if not isinstance(flag, bool):
        return '"ignore" must be true or false'
    poly = _polygon(word.get("points"))
    return poly if isinstance(poly, str) else (poly, flag or word.get("transcription") == "###")


def _collect(
    file: str,
    src: str,
    words: Iterable[tuple[str, tuple[np.ndarray, bool] | str]],
    problems: list[Problem],
) -> ImageAnnotation:
    """Keep the valid words; each invalid one becomes a Problem naming file and word."""
    polys, ignore, ids = [], [], []
    for wid, parsed in words:
        if isinstance(parsed, str):
            problems.append(Problem(src, wid, parsed, image=file))
            continue
        shape_problem = _degenerate(parsed[0])
        if shape_problem:
            # Valid numbers, unusable shape: kept as a don't-care word (masked in the maps,
            # as DBNet treats such words), and said once here.
            problems.append(Problem(src, wid, f"{shape_problem}; kept as a don't-care word",
                                    image=file))
        polys.append(parsed[0])
        ignore.append(parsed[1] or bool(shape_problem))
        ids.append(wid)
    return ImageAnnotation(file, tuple(polys), tuple(ignore), tuple(ids))


def _degenerate(points: np.ndarray) -> str | None:
    if not polygon_is_simple(points):
        return "self-intersecting polygon"
    if abs(polygon_area(points)) < 1e-9:
        return "zero-area polygon"
    return None


__all__ = ["IMAGE_SUFFIXES", "MAX_COORDINATE", "MAX_POLYGON_POINTS", "AnnotationSet",
           "ImageAnnotation", "Problem", "Rules", "safe_source_path"]
