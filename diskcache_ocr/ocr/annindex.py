"""The annotation index: an annotation file parsed once per content, shared by every process.

A JSON annotation file is parsed into :class:`~diskcache_ocr.ocr.columns.Columns` once, stored
in the cache directory as ``annotations/<id>.idx``, and from then on opened as a read-only
memory map: a warm start parses nothing and copies nothing, and every process on the node
(ranks, DataLoader workers) reads the same pages. The file is named by the blake3 hash of the
annotation file's bytes, the rules and the parser version, so an edited file gets a new index;
``annotations/<id>.src`` remembers the hash beside the file's size, mtime, ctime and inode, so
a warm start does not hash the file again (an edit that keeps the mtime changes the ctime).

Layout of an ``.idx`` file (little-endian)::

    MAGIC (8 bytes) | format version (u32) | header length (u32) | header (UTF-8 JSON) | pad
    columns, each starting at a multiple of 64 bytes

The header names the content hash, rules, parser version, the file's total size, each
column's dtype, shape, offset and length, the skipped words, and the blake3 checksum of the
columns and of those descriptions (JSON, never pickle). An index that fails any check
(magic, version, what it was made from, sizes, offsets, checksum) is rebuilt, with a
warning; it never serves a wrong polygon. The checksum is checked at every open (blake3
reads several GB/s, a small cost beside the parse it saves); a spawned worker re-opening
the file its parent checked (same inode, size, mtime) skips it.
Written to a temporary file, fsync'ed and renamed, so a crash leaves no partial index and
builders in several processes race harmlessly (the last rename wins; the contents are equal).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from diskcache_ocr.errors import CacheError
from diskcache_ocr.ocr.columns import PARSER_VERSION, Columns, parse_json, read_source

log = logging.getLogger("diskcache_ocr.annindex")

MAGIC = b"DCOANNIX"
FORMAT_VERSION = 1
INDEX_DIR = "annotations"
_PREFIX = struct.Struct("<8sII")
_ALIGN = 64
_MAX_HEADER = 1 << 30
# Each column's one allowed dtype and number of dimensions.
_COLUMNS = {"names": ("|u1", 1), "name_off": ("<i8", 1), "entry_state": ("|i1", 1),
            "word_start": ("<i8", 1), "point_start": ("<i8", 1), "points": ("<f8", 2),
            "ignore": ("|b1", 1), "word_ids": ("|u1", 1), "word_id_off": ("<i8", 1),
            "name_order": ("<i8", 1)}


class IndexDamaged(CacheError, ValueError):
    """An index file that cannot be trusted (it is rebuilt)."""


@dataclass
class Index:
    """Parsed columns, and the index file they are mapped from (None: held in this process)."""

    columns: Columns
    name_order: np.ndarray  # entries by name (bytewise), for lookups by name
    path: Path | None = None
    content: str = ""
    identity: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of the index file
    rules: str = "db"


def content_id(content: str, rules: str) -> str:
    """The index file's name for an annotation file's content hash and rules."""
    what = f"{content}|{rules}|parser {PARSER_VERSION}|format {FORMAT_VERSION}"
    return blake3.blake3(what.encode()).hexdigest()[:32]


def load_index(annotations: str | os.PathLike[str], rules: str,
               cache_dir: str | os.PathLike[str] | None, *, readonly: bool = False) -> Index:
    """The index of an annotation JSON file: mapped from ``cache_dir`` (made there first when
    missing or damaged), or parsed into this process when there is no cache directory or it
    cannot be written (said in the log)."""
    path = Path(annotations)
    source = str(path)
    if cache_dir is None:
        return in_process(read_source(path), source, rules)
    where = Path(cache_dir) / INDEX_DIR
    before = _stat(path)
    content = _remembered(where, path, rules, before)
    data = None
    if content is None:
        data = read_source(path)
        content = blake3.blake3(data).hexdigest()
    idx_path = where / f"{content_id(content, rules)}.idx"
    if idx_path.exists():
        try:
            index = open_index(idx_path, content, rules)
            if data is not None:
                _remember(where, path, rules, before, content, readonly)
            return index
        except IndexDamaged as exc:
            log.warning("%s: rebuilding the annotation index (%s)", idx_path, exc)
        except OSError as exc:
            log.warning("%s: cannot read the annotation index (%s); parsing %s",
                        idx_path, exc.strerror or exc, source)
    if data is None:
        data = read_source(path)
        if blake3.blake3(data).hexdigest() != content:  # changed since it was remembered
            content = blake3.blake3(data).hexdigest()
            idx_path = where / f"{content_id(content, rules)}.idx"
    index = in_process(data, source, rules)
    if readonly:
        log.info("%s: read-only cache: the annotations of %s are held in this process",
                 where.parent, source)
        return index
    try:
        _make_dir(where)
        write_index(idx_path, index, content, rules)
        mapped = open_index(idx_path, content, rules)
    except (OSError, IndexDamaged) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        log.info("%s: cannot store the annotation index (%s); the annotations of %s are "
                 "held in this process", where, why, source)
        return index
    _remember(where, path, rules, before, content, readonly)
    return mapped


def in_process(data: bytes, source: str, rules: str) -> Index:
    cols = parse_json(data, source, rules)
    return Index(cols, _name_order(cols), rules=rules)


def _name_order(cols: Columns) -> np.ndarray:
    names = [n.encode("utf-8", "surrogatepass") for n in cols.all_names()]
    return np.array(sorted(range(len(names)), key=names.__getitem__), np.int64)


# -- the content hash, remembered beside the file's stat ------------------------------------
def _stat(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}


def _src_path(where: Path, path: Path, rules: str) -> Path:
    key = blake3.blake3(f"{path.resolve()}|{rules}".encode(errors="surrogatepass"))
    return where / f"{key.hexdigest()[:32]}.src"


def _remembered(where: Path, path: Path, rules: str, now: dict[str, int] | None) -> str | None:
    if now is None:
        return None
    try:
        rec = json.loads(_src_path(where, path, rules).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("stat") != now:
        return None
    content = rec.get("content")
    return content if isinstance(content, str) and len(content) == 64 else None


def _remember(where: Path, path: Path, rules: str, before: dict[str, int] | None,
              content: str, readonly: bool) -> None:
    if readonly or before is None or _stat(path) != before:  # changed while it was read
        return
    rec = json.dumps({"path": str(path.resolve()), "stat": before, "content": content})
    try:
        _atomic_write(_src_path(where, path, rules), [rec.encode()])
    except OSError:
        pass  # only a shortcut: the next start hashes the file again


def _make_dir(where: Path) -> None:
    """The index directory, as private as the cache directory (made private when new)."""
    where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    where.mkdir(mode=where.parent.stat().st_mode & 0o777, exist_ok=True)


# -- the file -------------------------------------------------------------------------------
def write_index(idx_path: Path, index: Index, content: str, rules: str) -> None:
    arrays = {name: getattr(index.columns, name) for name in Columns.ARRAYS}
    arrays["name_order"] = index.name_order
    table, offset = {}, 0
    for name, arr in arrays.items():
        dtype, _ = _COLUMNS[name]
        arr = np.ascontiguousarray(arr, dtype=np.dtype(dtype))
        arrays[name] = arr
        table[name] = {"dtype": dtype, "shape": list(arr.shape), "offset": offset,
                       "nbytes": arr.nbytes}
        offset = _aligned(offset + arr.nbytes)
    data_len = offset
    checksum = blake3.blake3()
    parts: list[bytes | memoryview] = []
    pos = 0
    for name, arr in arrays.items():
        pad = table[name]["offset"] - pos
        if pad:
            parts.append(b"\0" * pad)
        if arr.nbytes:
            parts.append(memoryview(arr).cast("B"))
        pos = table[name]["offset"] + arr.nbytes
    parts.append(b"\0" * (data_len - pos))
    for p in parts:
        checksum.update(p)
    cols = index.columns
    header: dict[str, Any] = {
        "format": FORMAT_VERSION, "parser": PARSER_VERSION, "rules": rules, "content": content,
        "columns": table, "plain": cols.plain, "word_problems": cols.word_problems,
        "notes": cols.notes,
    }
    checksum.update(_described(header))
    header["checksum"] = checksum.hexdigest()
    # the header's length decides where the columns start: fix it with the total size
    for _ in range(3):
        raw = json.dumps(header, ensure_ascii=True).encode()
        start = _aligned(_PREFIX.size + len(raw))
        if header.get("size") == start + data_len:
            break
        header["size"] = start + data_len
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw
    _atomic_write(idx_path, [head, b"\0" * (start - len(head)), *parts])


def open_index(idx_path: Path, content: str, rules: str, *, verify: bool = True,
               identity: tuple[int, int, int] | None = None) -> Index:
    """Map an index file read-only and check it; ``verify=False`` skips the checksum (for a
    file this node already checked: same inode, size and mtime as ``identity``)."""
    with open(idx_path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size < _PREFIX.size:
            raise IndexDamaged(f"{idx_path}: {st.st_size} bytes, shorter than its prefix")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    ident = (st.st_ino, st.st_size, st.st_mtime_ns)
    magic, version, head_len = _PREFIX.unpack_from(mm, 0)
    if magic != MAGIC:
        raise IndexDamaged(f"{idx_path}: not an annotation index (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise IndexDamaged(f"{idx_path}: format {version}, expected {FORMAT_VERSION}")
    if head_len > min(_MAX_HEADER, st.st_size - _PREFIX.size):
        raise IndexDamaged(f"{idx_path}: header of {head_len} bytes in a file of {st.st_size}")
    try:
        header = json.loads(bytes(mm[_PREFIX.size:_PREFIX.size + head_len]))
    except ValueError as exc:
        raise IndexDamaged(f"{idx_path}: unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise IndexDamaged(f"{idx_path}: header is not an object")
    want = {"format": FORMAT_VERSION, "parser": PARSER_VERSION, "rules": rules,
            "content": content, "size": st.st_size}
    for key, value in want.items():
        if header.get(key) != value:
            raise IndexDamaged(f"{idx_path}: {key} is {header.get(key)!r}, expected {value!r}")
    start = _aligned(_PREFIX.size + head_len)
    if verify and identity != ident:
        got = blake3.blake3(memoryview(mm)[start:])
        got.update(_described(header))
        if got.hexdigest() != header.get("checksum"):
            raise IndexDamaged(f"{idx_path}: checksum mismatch")
    arrays = _columns(idx_path, mm, header.get("columns"), start)
    try:
        problems = [(int(e), str(w), str(r)) for e, w, r in header.get("word_problems", [])]
        notes = [str(n) for n in header.get("notes", [])]
    except (TypeError, ValueError) as exc:
        raise IndexDamaged(f"{idx_path}: unreadable problems ({exc})") from exc
    order = arrays.pop("name_order")
    cols = Columns(**arrays, word_problems=problems, notes=notes,
                   plain=bool(header.get("plain")))
    _check_shapes(idx_path, cols, order)
    return Index(cols, order, idx_path, content, ident, rules)


def _columns(idx_path: Path, mm: mmap.mmap, table: Any, start: int) -> dict[str, np.ndarray]:
    if not isinstance(table, dict) or set(table) != set(_COLUMNS):
        raise IndexDamaged(f"{idx_path}: column table lists {sorted(table or ())}")
    out = {}
    for name, (dtype, ndim) in _COLUMNS.items():
        spec = table[name]
        try:
            shape = tuple(int(n) for n in spec["shape"])
            offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
            ok = spec["dtype"] == dtype
        except (TypeError, KeyError, ValueError) as exc:
            raise IndexDamaged(f"{idx_path}: column {name}: {exc}") from exc
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 0
        if (not ok or len(shape) != ndim or min(shape, default=0) < 0
                or count * dt.itemsize != nbytes or offset % _ALIGN
                or offset < 0 or start + offset + nbytes > len(mm)
                or (ndim == 2 and shape[1] != 2)):
            raise IndexDamaged(f"{idx_path}: column {name} is {spec!r}")
        out[name] = np.frombuffer(mm, dt, count, start + offset).reshape(shape)
    return out


def _check_shapes(idx_path: Path, c: Columns, order: np.ndarray) -> None:
    e, w = len(c.entry_state), len(c.ignore)
    checks = [
        (len(c.name_off) == e + 1 and len(c.word_start) == e + 1 and len(order) == e,
         "entry columns differ in length"),
        (len(c.point_start) == w + 1 and len(c.word_id_off) == w + 1, "word columns differ"),
        (c.name_off[0] == 0 and c.name_off[-1] == len(c.names), "name offsets"),
        (c.word_start[0] == 0 and c.word_start[-1] == w, "word offsets"),
        (c.point_start[0] == 0 and c.point_start[-1] == len(c.points), "point offsets"),
        (c.word_id_off[0] == 0 and c.word_id_off[-1] == len(c.word_ids), "word id offsets"),
        (all(0 <= p[0] < e for p in c.word_problems), "problem entries"),
    ]
    for ok, what in checks:
        if not ok:
            raise IndexDamaged(f"{idx_path}: inconsistent {what}")


def _described(header: dict[str, Any]) -> bytes:
    """The header's fields that say what the columns mean (covered by the checksum)."""
    keys = ("columns", "plain", "word_problems", "notes")
    return json.dumps({k: header.get(k) for k in keys}, sort_keys=True).encode()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _atomic_write(path: Path, parts: list[Any]) -> None:
    """Write, fsync, rename: readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


__all__ = ["FORMAT_VERSION", "INDEX_DIR", "Index", "IndexDamaged", "content_id", "in_process",
           "load_index", "open_index", "write_index"]
