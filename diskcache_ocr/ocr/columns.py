"""An annotation JSON file as columns: one pass over the file, one vectorized check of all words.

:func:`parse_json` reads ``{"images": {name: {"words": {id: {"points": ...}}}}}`` into
:class:`Columns`: every image entry of the file in order (its name as written, and whether the
entry itself is usable), and the kept words of all entries as flat arrays (points, points per
word, ignore flags, word ids), with the skipped words' reasons. Nothing here looks at the
images directory: which entries name a usable image is decided by :func:`select`, so the
columns depend on the file's bytes and the rules only, and can be stored and shared.

The rules and messages are those of :mod:`diskcache_ocr.ocr.annotations`. The fast reading
decodes the top level with msgspec, keeping each image's value as raw bytes, and each image
with a strict schema (``points`` a list of ``[number, number]``, ``ignore`` a bool); an image
the schema refuses is read by the general code, one image at a time, and a file the fast
decoder refuses (NaN literals, invalid JSON, a repeated key) is read entirely by the general
code, so its error names the line and column, and a repeated name is said.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from diskcache_ocr.errors import AnnotationError
from diskcache_ocr.ocr.wordrules import (
    MAX_COORDINATE,
    MAX_POLYGON_POINTS,
    Problem,
    _check_image,
    _collect,
    _collect_origin,
    _json_word,
)

# Bump when what the parser produces for the same bytes changes: stored indexes are rebuilt.
PARSER_VERSION = 1

ENTRY_OK, ENTRY_NOT_OBJECT, ENTRY_WORDS_NOT_OBJECT = 0, 1, 2
ENTRY_REASONS = {ENTRY_NOT_OBJECT: "image entry must be an object",
                 ENTRY_WORDS_NOT_OBJECT: '"words" must be an object'}
_BAD_PLAIN = re.compile(r'[/\\\0]|^[A-Za-z]:|^\s*$|^\.{1,2}$')
_WS_KEY = re.compile(rb'"[ \t\r\n]+:')
_CHUNK = 1 << 18  # words checked together for their shape


@dataclass
class Columns:
    """A parsed annotation file. Entry ``e``'s kept words are ``word_start[e]:word_start[e+1]``;
    word ``w``'s points are ``points[point_start[w]:point_start[w+1]]``. Arrays may be views of
    a read-only memory map (:mod:`diskcache_ocr.ocr.annindex`)."""

    names: np.ndarray  # uint8: the entries' names, UTF-8, back to back
    name_off: np.ndarray  # int64 (E + 1)
    entry_state: np.ndarray  # int8 (E): ENTRY_OK or why the entry is unusable
    word_start: np.ndarray  # int64 (E + 1)
    point_start: np.ndarray  # int64 (W + 1)
    points: np.ndarray  # float64 (P, 2)
    ignore: np.ndarray  # bool (W)
    word_ids: np.ndarray  # uint8: the kept words' ids, UTF-8, back to back
    word_id_off: np.ndarray  # int64 (W + 1)
    # (entry, word id, reason) of each skipped or don't-care word, in file order
    word_problems: list[tuple[int, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings said while parsing
    plain: bool = False  # every name is a unique plain file name and every entry usable

    ARRAYS = ("names", "name_off", "entry_state", "word_start", "point_start", "points",
              "ignore", "word_ids", "word_id_off")

    def __len__(self) -> int:
        return len(self.entry_state)

    def name(self, entry: int) -> str:
        a, b = self.name_off[entry], self.name_off[entry + 1]
        return self.names[a:b].tobytes().decode("utf-8", "surrogatepass")

    def all_names(self) -> list[str]:
        blob = self.names.tobytes()
        off = self.name_off.tolist()
        return [blob[a:b].decode("utf-8", "surrogatepass")
                for a, b in zip(off, off[1:], strict=False)]

    def word_ids_of(self, entry: int) -> list[str]:
        a, b = int(self.word_start[entry]), int(self.word_start[entry + 1])
        off = self.word_id_off[a:b + 1].tolist()
        blob = self.word_ids[off[0]:off[-1]].tobytes()
        return [blob[x - off[0]:y - off[0]].decode("utf-8", "surrogatepass")
                for x, y in zip(off, off[1:], strict=False)]


# -- the fast reading ---------------------------------------------------------------------
class _Top(msgspec.Struct, forbid_unknown_fields=True):
    images: dict[str, msgspec.Raw]


class _Word(msgspec.Struct, forbid_unknown_fields=True):
    points: list[tuple[float, float]]
    ignore: bool | msgspec.UnsetType = msgspec.UNSET
    transcription: Any = msgspec.UNSET


class _Entry(msgspec.Struct, forbid_unknown_fields=True):
    words: dict[str, _Word] | msgspec.UnsetType = msgspec.UNSET


_TOP = msgspec.json.Decoder(_Top)
_ENTRY = msgspec.json.Decoder(_Entry)


class _Builder:
    """Collects entries and words; the fast words are checked together at the end."""

    def __init__(self, rules: str) -> None:
        self.rules = rules
        self.names: list[bytes] = []
        self.state: list[int] = []
        self.words_per_entry: list[int] = []
        self.chunks: list[np.ndarray] = []  # (k, 2) float64 per entry
        self.counts: list[np.ndarray] = []  # points per word
        self.flags: list[np.ndarray] = []
        self.checked: list[np.ndarray] = []  # True: checked already (the general code)
        self.ids: list[bytes] = []  # word ids, UTF-8, one blob per entry
        self.id_lengths: list[np.ndarray] = []
        self.problems: list[tuple[int, int, str, str]] = []  # (entry, order, word id, reason)
        self.keys = 0  # object keys decoded (to detect a repeated key the fast decoder hid)

    def entry(self, name: str, state: int) -> int:
        self.names.append(name.encode("utf-8", "surrogatepass"))
        self.state.append(state)
        if state != ENTRY_OK:
            self.words_per_entry.append(0)
        return len(self.names) - 1

    def fast_words(self, words: Mapping[str, _Word]) -> None:
        ws = list(words.values())
        pts = [w.points for w in ws]
        counts = np.fromiter(map(len, pts), np.int64, len(pts))
        pairs = chain.from_iterable(pts)
        coords = np.fromiter(chain.from_iterable(pairs), np.float64,
                             2 * int(counts.sum())).reshape(-1, 2)
        if self.rules == "origin":
            flags = np.zeros(len(ws), bool)
        else:
            flags = np.fromiter((w.ignore is True or w.transcription == "###" for w in ws),
                                bool, len(ws))
        self.keys += 2 * len(ws) + sum(  # the word's id and its "points"
            1 for w in ws if w.ignore is not msgspec.UNSET) \
            + sum(1 for w in ws if w.transcription is not msgspec.UNSET)
        self._ids(list(words))
        self._add(coords, counts, flags, np.zeros(len(ws), bool))

    def checked_words(self, entry: int, polygons: Sequence[np.ndarray], flags: Sequence[bool],
                      ids: Sequence[str], problems: Sequence[tuple[str, str]]) -> None:
        counts = np.fromiter(map(len, polygons), np.int64, len(polygons))
        coords = (np.concatenate(polygons).astype(np.float64) if polygons
                  else np.zeros((0, 2), np.float64))
        self._ids(ids)
        self._add(coords, counts, np.array(flags, bool), np.ones(len(polygons), bool))
        self.problems.extend((entry, i, wid, why) for i, (wid, why) in enumerate(problems))

    def _ids(self, ids: Sequence[str]) -> None:
        encoded = [w.encode("utf-8", "surrogatepass") for w in ids]
        self.ids.append(b"".join(encoded))
        self.id_lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def _add(self, coords: np.ndarray, counts: np.ndarray, flags: np.ndarray,
             checked: np.ndarray) -> None:
        self.chunks.append(coords)
        self.counts.append(counts)
        self.flags.append(flags)
        self.checked.append(checked)
        self.words_per_entry.append(len(counts))

    def finish(self, notes: list[str]) -> Columns:
        n_entries = len(self.names)
        counts = _cat(self.counts, np.int64)
        points = np.concatenate(self.chunks) if self.chunks else np.zeros((0, 2), np.float64)
        self.chunks.clear()
        flags = _cat(self.flags, bool)
        checked = _cat(self.checked, bool)
        per_entry = np.array(self.words_per_entry, np.int64)
        entry_of_word = np.repeat(np.arange(n_entries, dtype=np.int64), per_entry)
        order = np.arange(len(counts), dtype=np.int64) - np.repeat(
            np.cumsum(per_entry) - per_entry, per_entry)
        keep, ignore, found = _check_words(points, counts, flags, checked, self.rules)
        id_blob = np.frombuffer(b"".join(self.ids), np.uint8)
        id_lengths = _cat(self.id_lengths, np.int64)
        id_off = np.concatenate([[0], np.cumsum(id_lengths)]).astype(np.int64)
        problems = list(self.problems)
        for w, why in found:
            wid = id_blob[id_off[w]:id_off[w + 1]].tobytes().decode("utf-8", "surrogatepass")
            problems.append((int(entry_of_word[w]), int(order[w]), wid, why))
        problems.sort(key=lambda p: (p[0], p[1]))
        # the kept words only
        if keep.all():
            kept_points, kept_counts = points, counts
        else:
            sel = np.repeat(keep, counts)
            kept_points, kept_counts = points[sel], counts[keep]
        kept_per_entry = np.bincount(entry_of_word[keep], minlength=n_entries).astype(np.int64)
        if not keep.all():
            id_blob = id_blob[np.repeat(keep, id_lengths)]
            id_lengths = id_lengths[keep]
        names_ok = all(not _BAD_PLAIN.search(n.decode("utf-8", "surrogatepass"))
                       for n in self.names)
        cols = Columns(
            names=np.frombuffer(b"".join(self.names), np.uint8).copy(),
            name_off=_offsets(self.names),
            entry_state=np.array(self.state, np.int8),
            word_start=np.concatenate([[0], np.cumsum(kept_per_entry)]).astype(np.int64),
            point_start=np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64),
            points=np.ascontiguousarray(kept_points, np.float64).reshape(-1, 2),
            ignore=np.ascontiguousarray(ignore[keep], bool),
            word_ids=id_blob.copy(),
            word_id_off=np.concatenate([[0], np.cumsum(id_lengths)]).astype(np.int64),
            word_problems=[(e, wid, why) for e, _, wid, why in problems],
            notes=notes,
        )
        cols.plain = bool(names_ok and len(set(self.names)) == n_entries
                          and not (cols.entry_state != ENTRY_OK).any())
        return cols


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _offsets(blobs: list[bytes]) -> np.ndarray:
    lengths = np.fromiter(map(len, blobs), np.int64, len(blobs))
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


# -- the checks, all words at once ----------------------------------------------------------
def _check_words(points: np.ndarray, counts: np.ndarray, flags: np.ndarray, checked: np.ndarray,
                 rules: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Which words are kept, their ignore flags, and (word, reason) of each problem; words
    marked ``checked`` were checked word by word already and are kept as they are."""

    n = len(counts)
    ends = np.cumsum(counts)
    starts = ends - counts

    def per_word(bad_point: Any) -> Any:
        """Words with a point for which ``bad_point(points)`` holds (None: no such point in
        the file, the usual case, found without a pass per word)."""
        bad = bad_point(points)
        if not bad.any():
            return None
        cs = np.concatenate([[0], np.cumsum(bad, dtype=np.int64)])
        return cs[ends] > cs[starts]

    unchecked = ~checked
    too_many = (counts > MAX_POLYGON_POINTS,
                lambda w: f"has {counts[w]} points; at most {MAX_POLYGON_POINTS} are allowed")
    not_finite = (per_word(lambda p: ~np.isfinite(p).all(axis=1)),
                  "coordinates must be finite (NaN or infinity found)")
    beyond = f"coordinates must not exceed {MAX_COORDINATE:.0f} (far outside any image)"
    reasons: list[tuple[Any, Any]]
    if rules == "origin":
        skip = unchecked & (counts == 0)  # the origin skips such a word without a word
        reasons = [too_many, not_finite,
                   (per_word(lambda p: np.abs(p).max(axis=1, initial=0) > MAX_COORDINATE),
                    beyond)]
    else:
        skip = np.zeros(n, bool)
        reasons = [too_many,
                   (counts < 4, lambda w: f"needs at least 4 points, got {counts[w]}"),
                   not_finite,
                   (per_word(lambda p: (p < 0).any(axis=1)), "coordinates must not be negative"),
                   (per_word(lambda p: (p > MAX_COORDINATE).any(axis=1)), beyond)]
    reasons = [(bad, why) for bad, why in reasons if bad is not None and bad.any()]
    refused = np.zeros(n, bool)
    problems: list[tuple[int, str]] = []
    for bad, why in reasons:
        hit = bad & unchecked & ~refused & ~skip
        for w in np.flatnonzero(hit).tolist():
            problems.append((w, why(w) if callable(why) else why))
        refused |= hit
    keep = ~refused & ~skip
    ignore = flags.copy()
    if rules != "origin":
        test = keep & unchecked
        for w, why in _degenerate_words(points, counts, starts, test):
            problems.append((w, f"{why}; kept as a don't-care word"))
            ignore[w] = True
    return keep, ignore, problems


def _degenerate_words(points: np.ndarray, counts: np.ndarray, starts: np.ndarray,
                      test: np.ndarray) -> list[tuple[int, str]]:
    """(word, reason) of each tested word that is self-intersecting or of zero area. A word
    whose turns are all strictly one way and wind once, and whose area is far from zero, is
    settled here for all words of its size at once; any other goes to the exact checks of
    :mod:`diskcache_ocr.ocr.maps`."""
    from diskcache_ocr.ocr.maps import polygon_area, polygon_is_simple

    unsure: list[int] = []
    for k in np.unique(counts[test]).tolist():
        words = np.flatnonzero(test & (counts == k))
        whole = len(words) * k == len(points)  # these words hold every point: views
        for a in range(0, len(words), _CHUNK):  # (bounded temporaries)
            part = words[a:a + _CHUNK]
            if whole:
                q = points.reshape(-1, k, 2)[a:a + _CHUNK]
            else:
                q = points[starts[part][:, None] + np.arange(k)[None, :]]  # (m, k, 2)
            unsure.extend(part[~_surely_fine(q)].tolist())
    found = []
    for w in sorted(unsure):
        poly = points[starts[w]:starts[w] + counts[w]]
        if not polygon_is_simple(poly):
            found.append((w, "self-intersecting polygon"))
        elif abs(polygon_area(poly)) < 1e-9:
            found.append((w, "zero-area polygon"))
    return found


def _surely_fine(q: np.ndarray) -> np.ndarray:
    """Of words ``q`` (m, k, 2): those whose turns are all strictly one way and wind once, as
    the exact simplicity check's own fast path decides, and whose area is far from zero."""
    k = q.shape[1]
    nxt = np.roll(np.arange(k), -1)
    e = q - q[:, np.roll(np.arange(k), 1)]  # the edge into each vertex, as the exact check
    en = e[:, nxt]  # and the edge out of it
    c = e[..., 0] * en[..., 1] - e[..., 1] * en[..., 0]
    simple = (c > 0).all(axis=1) | (c < 0).all(axis=1)
    if k > 4:
        dot = e[..., 0] * en[..., 0] + e[..., 1] * en[..., 1]
        # |turning| is a multiple of 2*pi up to rounding: a margin of pi settles it
        simple &= np.abs(np.arctan2(c, dot).sum(axis=1)) < 3 * math.pi
    # (up to 4 turns all one way, each less than pi, add up to 2 pi: simple and convex)
    del e, en, c
    qn = q[:, nxt]
    a, b = q[..., 0] * qn[..., 1], qn[..., 0] * q[..., 1]
    area = 0.5 * (a - b).sum(axis=1)
    # far from zero even allowing for this sum's rounding (the exact one is an fsum)
    slack = 1e-6 + 8 * k * np.finfo(np.float64).eps * (np.abs(a) + np.abs(b)).sum(axis=1)
    return simple & (np.abs(area) > slack)


# -- reading a file -------------------------------------------------------------------------
def parse_json(data: bytes, source: str, rules: str) -> Columns:
    """The columns of an annotation file's bytes; ``source`` names it in errors and notes.
    Raises AnnotationError when the file as a whole is unusable."""
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        top = _TOP.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _parse_general(data, source, rules)
    b = _Builder(rules)
    b.keys = 1 + len(top.images)
    for name, raw in top.images.items():
        try:
            entry = _ENTRY.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            counter = _PairCounter(source, [])
            value = json.loads(bytes(raw), parse_constant=float, object_pairs_hook=counter)
            b.keys += counter.pairs
            if counter.notes:  # a repeated key inside: said by the general reading
                return _parse_general(data, source, rules)
            _general_entry(b, name, value, rules)
            continue
        b.entry(name, ENTRY_OK)
        if entry.words is msgspec.UNSET:
            b._add(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, bool),
                   np.zeros(0, bool))
        else:
            b.keys += 1
            b.fast_words(entry.words)
    written = body.count(b'":') + len(_WS_KEY.findall(body))
    if written != b.keys:  # a key is repeated somewhere (or a string holds '":')
        return _parse_general(data, source, rules)
    return b.finish([])


class _PairCounter:
    """A JSON object hook: a dict where a repeated key keeps its last value at the place of
    its first (as ``json.loads`` does), noting each repeated key; counts the keys."""

    def __init__(self, source: str, notes: list[str]) -> None:
        self.source, self.notes, self.pairs = source, notes, 0

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        self.pairs += len(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.notes.append(f"{self.source}: {key!r} is listed more than once; "
                                      "its last entry is used")
                seen.add(key)
        return out


def _parse_general(data: bytes, source: str, rules: str) -> Columns:
    """The whole file through the standard library: exact error positions, repeated keys."""
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a leading BOM
    except UnicodeDecodeError as e:
        why = f"not valid UTF-8 text ({e.reason} at byte {e.start})"
        raise AnnotationError(source, why) from e
    notes: list[str] = []
    try:
        # NaN / Infinity literals become floats here and are then rejected per word.
        hook = _PairCounter(source, notes)
        doc = json.loads(text, parse_constant=float, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        why = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise AnnotationError(source, why) from e
    except (ValueError, RecursionError) as e:  # e.g. int too long, nesting too deep
        raise AnnotationError(source, f"invalid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
        raise AnnotationError(source, 'top level must be an object with an "images" object')
    b = _Builder(rules)
    for name, value in doc["images"].items():
        _general_entry(b, name, value, rules)
    return b.finish(list(dict.fromkeys(notes)))


def _general_entry(b: _Builder, name: str, value: Any, rules: str) -> None:
    """One image entry, word by word (the rules of :mod:`diskcache_ocr.ocr.annotations`)."""

    if not isinstance(value, dict):
        b.entry(name, ENTRY_NOT_OBJECT)
        return
    words = value.get("words", {})
    if not isinstance(words, dict):
        b.entry(name, ENTRY_WORDS_NOT_OBJECT)
        return
    e = b.entry(name, ENTRY_OK)
    found: list[Problem] = []
    if rules == "origin":
        item = _collect_origin(name, "", words, found)
    else:
        item = _collect(name, "", ((k, _json_word(w)) for k, w in words.items()), found)
    b.checked_words(e, item.polygons, item.ignore, item.word_ids,
                    [(str(p.word), p.reason) for p in found])


def read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise AnnotationError(str(path), f"cannot read: {e.strerror or e}") from e


# -- which entries name a usable image -------------------------------------------------------
@dataclass
class Selection:
    """The entries that are the split's images, in order (None: all of them), their file
    names where they differ from the names as written, and what was skipped."""

    rows: np.ndarray | None
    files: list[str] | None
    problems: list[Any]


def select(cols: Columns, root: Path, source: str) -> Selection:
    """Check every entry's image (inside ``root``, a file, named once) as
    :func:`diskcache_ocr.ocr.annotations.load_annotations` does, in the file's order."""

    if cols.plain:
        present = _plain_files(root)
        names = cols.all_names()
        if present is not None and all(n in present for n in names):
            problems = [Problem(source, wid, why, image=names[e])
                        for e, wid, why in cols.word_problems]
            return Selection(None, None, problems)
    by_entry: dict[int, list[tuple[str, str]]] = {}
    for e, wid, why in cols.word_problems:
        by_entry.setdefault(e, []).append((wid, why))
    rows, files, problems, seen = [], [], [], set()
    for e in range(len(cols)):
        name = cols.name(e)
        file = _check_image(root, source, name, problems)
        if file is None:
            continue
        if file in seen:
            problems.append(Problem(source, None, "duplicate image entry", image=name))
            continue
        state = int(cols.entry_state[e])
        if state != ENTRY_OK:
            problems.append(Problem(source, None, ENTRY_REASONS[state], image=name))
            continue
        seen.add(file)
        rows.append(e)
        files.append(file)
        problems += [Problem(source, wid, why, image=file) for wid, why in by_entry.get(e, ())]
    if len(rows) == len(cols) and all(f == cols.name(e) for e, f in zip(rows, files, strict=True)):
        return Selection(None, None, problems)
    return Selection(np.array(rows, np.int64), files, problems)


def _plain_files(root: Path) -> set[str] | None:
    """Names of the regular files (not links) directly in ``root``, or None if unlistable."""
    import os

    try:
        with os.scandir(root) as it:
            return {d.name for d in it if d.is_file(follow_symlinks=False)}
    except OSError:
        return None


__all__ = ["PARSER_VERSION", "Columns", "Selection", "parse_json", "read_source", "select"]
