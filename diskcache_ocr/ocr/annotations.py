"""Load text-detection annotations (JSON or ICDAR-2015 txt) into validated, read-only polygons.

A bad word or image never sinks the dataset: it is skipped and recorded as a `Problem`
(also logged as a warning). Only whole-file failures raise.

Items keep the annotation file's order (a JSON file's image order; an ICDAR directory or a
plain image listing is sorted by name), so index ``i`` is the ``i``-th image of the file.
Two rule sets read a JSON file's words (``rules``):

* ``"db"``: a word is at least 4 finite, non-negative points; a self-intersecting or
  zero-area word is kept as a don't-care word;
* ``"origin"``: the origin project's reading: any non-empty list of finite ``[x, y]`` points
  is a word (the transform step drops words of fewer than 3 points later, as the origin does);
  coordinates may be negative (they are clamped into the image before its transform).

An image listed twice keeps its last entry, at the place of its first (what a JSON object
means), and the log says so once per file and name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from diskcache_ocr.errors import AnnotationError, SourceError
from diskcache_ocr.ocr.wordrules import (  # (the records and rules; importable from here too)
    IMAGE_SUFFIXES,
    MAX_COORDINATE,
    MAX_POLYGON_POINTS,
    AnnotationSet,
    ImageAnnotation,
    Problem,
    Rules,
    _collect,
    _is_file,
    _polygon,
    safe_source_path,
)

log = logging.getLogger("diskcache_ocr.annotations")









def load_annotations(
    images_dir: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None = None,
    rules: Rules = "db",
) -> AnnotationSet:
    """Load a split: no annotations (image listing), a JSON file, or an ICDAR-2015 gt dir.
    ``rules`` says how a JSON file's words are read (see the module docstring)."""
    if rules not in ("db", "origin"):
        raise ValueError(f"rules must be 'db' or 'origin', got {rules!r}")
    root = Path(images_dir)
    if not root.is_dir():
        raise SourceError(str(root), "images directory does not exist or is not a directory")
    root = root.resolve()
    problems: list[Problem] = []
    if annotations is None:
        items = [ImageAnnotation(f) for f in _list_images(root, problems)]
    else:
        if not str(annotations).strip():
            raise AnnotationError(repr(str(annotations)), "annotation path is empty; pass None "
                                  "(or leave it out) for a split without annotations")
        ann = Path(annotations)
        if ann.is_dir():
            items = _load_icdar(root, ann, problems)
        elif not ann.exists():
            raise AnnotationError(str(ann), "annotation file does not exist")
        elif ann.suffix.lower() == ".json":
            items = _load_json(root, ann, problems, rules)
        else:
            why = "expected a .json file or a directory of ICDAR-2015 .txt files"
            raise AnnotationError(str(ann), why)
    for p in problems:
        log.warning("skipped: %s", p)
    return AnnotationSet(root, tuple(items), tuple(problems))




def _list_images(root: Path, problems: list[Problem]) -> list[str]:
    try:
        listing = sorted(os.listdir(root))
    except OSError as e:
        raise SourceError(str(root), f"cannot list directory: {e.strerror or e}") from e
    names = []
    for name in listing:
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            if _is_file(safe_source_path(root, name)):
                names.append(name)
        except SourceError as e:
            problems.append(Problem(name, None, e.reason))
    return names




def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: tolerate a leading BOM
    except UnicodeDecodeError as e:
        why = f"not valid UTF-8 text ({e.reason} at byte {e.start})"
        raise AnnotationError(str(path), why) from e
    except OSError as e:
        raise AnnotationError(str(path), f"cannot read: {e.strerror or e}") from e




def _load_json(root: Path, path: Path, problems: list[Problem], rules: Rules = "db"
               ) -> list[ImageAnnotation]:
    from diskcache_ocr.ocr import columns  # (it reads words with this module's rules)

    src = str(path)
    cols = columns.parse_json(columns.read_source(path), src, rules)
    for note in cols.notes:
        log.warning("%s", note)
    chosen = columns.select(cols, root, src)
    problems.extend(chosen.problems)
    return column_items(cols, chosen)


def column_items(cols: Any, chosen: Any) -> list[ImageAnnotation]:
    """The selected entries of parsed columns as items (polygons copied out)."""
    rows = range(len(cols)) if chosen.rows is None else chosen.rows.tolist()
    items = []
    for i, e in enumerate(rows):
        a, b = int(cols.word_start[e]), int(cols.word_start[e + 1])
        starts = cols.point_start[a:b + 1].tolist()
        polys = tuple(cols.points[x:y] for x, y in zip(starts, starts[1:], strict=False))
        file = cols.name(e) if chosen.files is None else chosen.files[i]
        items.append(ImageAnnotation(file, polys, tuple(cols.ignore[a:b].tolist()),
                                     tuple(cols.word_ids_of(e))))
    return items












def _load_icdar(root: Path, gt_dir: Path, problems: list[Problem]) -> list[ImageAnnotation]:
    by_stem: dict[str, list[str]] = {}
    for name in _list_images(root, problems):
        by_stem.setdefault(Path(name).stem, []).append(name)
    items: dict[str, ImageAnnotation] = {}
    claimed: set[str] = set()  # images with a gt file, even a broken one: never default them
    try:
        gt_files = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".txt" and _is_file(p))
    except OSError as e:
        raise AnnotationError(str(gt_dir), f"cannot list directory: {e.strerror or e}") from e
    if not gt_files:
        raise AnnotationError(str(gt_dir), "directory holds no ground-truth .txt files "
                              "(gt_<image>.txt); pass the annotation JSON file itself, or None "
                              "for a split without annotations")
    # `gt_<stem>.txt` before `<stem>.txt`, so the canonical name wins a clash.
    gt_files.sort(key=lambda p: not p.name.startswith("gt_"))
    for gt in gt_files:
        src = str(gt)
        stems = [gt.stem[3:], gt.stem] if gt.stem.startswith("gt_") else [gt.stem]
        matches = next((by_stem[s] for s in stems if s in by_stem), [])
        claimed.update(matches)
        if len(matches) != 1:
            why = "no matching image" if not matches else f"several images match: {matches}"
            problems.append(Problem(src, None, why))
            continue
        file = matches[0]
        if file in items:
            problems.append(Problem(src, None, "image already has a ground-truth file", file))
            continue
        try:
            text = _read_text(gt)
        except AnnotationError as e:
            problems.append(Problem(src, None, e.reason, image=file))
            continue
        items[file] = _collect(file, src, _icdar_words(text), problems)
    # Images without any ground truth: included with no text, not a problem.
    unlabelled = [n for names in by_stem.values() for n in names if n not in claimed]
    found = [*items.values(), *(ImageAnnotation(n) for n in unlabelled)]
    return sorted(found, key=lambda i: i.file)


def _icdar_words(text: str) -> Iterable[tuple[str, tuple[np.ndarray, bool] | str]]:
    """Parse `x1,y1,...,x4,y4,transcription` lines; ids are 1-based line numbers."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(",", 8)  # the transcription may itself contain commas
        try:
            if len(fields) < 8:
                raise ValueError
            points = [[float(fields[i]), float(fields[i + 1])] for i in range(0, 8, 2)]
        except ValueError:
            yield f"{n:04d}", "line is not x1,y1,x2,y2,x3,y3,x4,y4,transcription"
            continue
        poly = _polygon(points)
        text_ = fields[8].strip() if len(fields) > 8 else ""
        yield f"{n:04d}", poly if isinstance(poly, str) else (poly, text_ == "###")


__all__ = ["IMAGE_SUFFIXES", "MAX_COORDINATE", "MAX_POLYGON_POINTS", "AnnotationSet",
           "ImageAnnotation", "Problem", "Rules", "column_items", "load_annotations",
           "safe_source_path"]
