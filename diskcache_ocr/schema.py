"""What a cache holds, as rules: kind versions, key recipes, index entries, the stale rule.

The bottom layer beside :mod:`keys` and :mod:`codec`: no LMDB, no torch. Every module that
needs one of these rules imports it from here, so each is written once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from diskcache_ocr.errors import CacheFormatError, SourceError
from diskcache_ocr.keys import derive_key

KINDS: tuple[str, ...] = ("images", "tensors", "maps")


@dataclass(frozen=True)
class KindVersion:
    """What produced a kind's records: a version string and a parameter fingerprint."""

    version: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"version": self.version, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KindVersion:
        return cls(version=str(d["version"]), fingerprint=str(d["fingerprint"]))

    def __str__(self) -> str:
        return f"{self.version}/{self.fingerprint}"


@dataclass(frozen=True)
class IndexEntry:
    """What the cache knows of one source file."""

    size: int
    mtime_ns: int
    content_hash: bytes
    status: str = "ok"  # "ok" or "failed: <reason>"
    # record name (see :func:`record_name`) -> record key: one per kind per pipeline version
    keys: Mapping[str, bytes] = field(default_factory=dict)
    updated_ns: int = 0
    # A file put in the source's place keeps neither its inode nor its ctime, whatever its
    # size and mtime (a copy with preserved times, an atomic replace, a retargeted symlink).
    ino: int = 0
    ctime_ns: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def records(self) -> list[tuple[str, bytes]]:
        """(kind, record key) of every record this entry names (any pipeline's)."""
        return [(name_kind(name), key) for name, key in self.keys.items()
                if name_kind(name) in KINDS]

    def matches(self, st: os.stat_result) -> bool:
        """The stale rule: an entry describes a file while its size, mtime, inode and ctime
        are the ones recorded (content is not re-hashed on every read). The ctime cannot be
        set by a user, so another file at this path never matches."""
        return (self.size == st.st_size and self.mtime_ns == st.st_mtime_ns
                and self.ino == st.st_ino and self.ctime_ns == st.st_ctime_ns)

    @classmethod
    def of_stat(cls, st: os.stat_result, content_hash: bytes, **fields: Any) -> IndexEntry:
        """An entry describing the file ``st`` was taken of."""
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino,
                   ctime_ns=st.st_ctime_ns, content_hash=content_hash, **fields)

    def pack(self) -> bytes:
        d = asdict(self)
        d["keys"] = dict(self.keys)
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> IndexEntry:
        try:
            # (one name per kind per pipeline version: several pipelines read one source)
            d = msgpack.unpackb(raw, raw=False, max_map_len=MAX_NAMES, max_array_len=16)
            entry = cls(
                size=_int(d["size"]), mtime_ns=_int(d["mtime_ns"]),
                content_hash=_bytes(d["content_hash"], HASH_BYTES), status=_str(d["status"]),
                keys={_str(k): _bytes(v) for k, v in d["keys"].items()},
                updated_ns=_int(d["updated_ns"]), ino=_int(d.get("ino", 0)),
                ctime_ns=_int(d.get("ctime_ns", 0)),
            )
        except Exception as exc:
            raise CacheFormatError(f"index entry {where}: unreadable ({exc})") from None
        return entry


HASH_BYTES = 32  # a content hash (blake3)
MAX_NAMES = 256  # record names one index entry may hold


def record_name(kind: str, fingerprint: str, *, plain: bool = False) -> str:
    """The name an index entry gives a record: its kind and the fingerprint of the version
    that made it (``tensors:1f0c...``), so the records of several pipelines reading one
    source are all named; ``plain`` (images of the library's own decode, keyed by content
    alone) is the kind alone."""
    return kind if plain else f"{kind}:{fingerprint[:16]}"


def name_kind(name: str) -> str:
    """The kind of a :func:`record_name`."""
    return name.partition(":")[0]


def pipeline_id(kinds: Mapping[str, KindVersion]) -> str:
    """A short id of a pipeline: a hash of its kinds' versions."""
    return derive_key("pipeline", *(f"{k}={kinds[k]}" for k in sorted(kinds))).hex()[:16]


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _bytes(v: Any, length: int | None = None) -> bytes:
    if not isinstance(v, bytes) or not v or (length is not None and len(v) != length):
        raise TypeError(f"expected {length or 'non-empty'} bytes, got {v!r:.40}")
    return v


def source_id(images_dir: str | os.PathLike[str], source: str) -> str:
    """A source's identity in the index: its name under the resolved images directory.

    Two datasets sharing a cache (train and val) may both hold ``img_1.png``: the root tells
    them apart. The name's last components are not resolved, so a retargeted symlink is the
    same source (its stat then tells that the content changed).
    """
    return os.path.join(os.path.realpath(images_dir), source)


def index_key(source: str) -> bytes:
    """The index key of a source id: its bytes as the file system has them (lossless for
    names that are not UTF-8)."""
    return os.fsencode(source)


def source_state(locate: Callable[[str], Path] | None, source: str, entry: IndexEntry
                 ) -> str | None:
    """None while ``source`` (a :func:`source_id`) still matches its entry, else
    ``"missing"`` or ``"changed"``.

    ``locate`` turns the id into a checked path (the annotations' safe resolver, which lives
    above this layer); it raises OSError or SourceError when it cannot. Without it the id,
    an absolute path, is stat'ed as it is.
    """
    if not os.path.isabs(source):
        return "missing"  # not an identity this format writes (nothing is stat'ed for it)
    try:
        st = os.stat(source if locate is None else locate(source))
    except (OSError, SourceError):
        return "missing"
    return None if entry.matches(st) else "changed"


def dataset_root(header: Mapping[str, Any],
                 images_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The images directory a cache's sources are relative to: the one given, else the one
    its header records, else None."""
    if images_dir:
        return Path(images_dir)
    root = header.get("dataset_root")
    return Path(root) if root else None


def reads(stats: Mapping[str, int], kind: str) -> tuple[int, int]:
    """(hits, lookups) of a kind from a store's counters."""
    hits, misses = stats.get(f"{kind}.hits", 0), stats.get(f"{kind}.misses", 0)
    return hits, hits + misses


def format_hit_rates(stats: Mapping[str, int]) -> str:
    """The hits of each kind read so far, as one line (``tensors 8/10 hits (80%), ...``)."""
    parts = []
    for kind in KINDS:
        hits, total = reads(stats, kind)
        if total:
            parts.append(f"{kind} {hits}/{total} hits ({100 * hits / total:.0f}%)")
    return ", ".join(parts) or "no reads yet"


# -- key recipes ------------------------------------------------------------------------
def image_key(content: bytes) -> bytes:
    """An ``images`` record is keyed by its source's content hash alone."""
    return content


def derived_image_key(content: bytes, decode_fingerprint: str) -> bytes:
    """An ``images`` record of a decode other than the library's own: its decode is in the
    key, so two decodes of one file never share a record."""
    return derive_key("images", content, decode_fingerprint)


def tensor_key(content: bytes, transform_fingerprint: str) -> bytes:
    return derive_key("tensors", content, transform_fingerprint)


def maps_key(content: bytes, words: bytes, maps_fingerprint: str) -> bytes:
    """``words`` is :func:`flat_polygons_bytes` of the image's annotation."""
    return derive_key("maps", content, words, maps_fingerprint)


def flat_polygons_bytes(points: np.ndarray, sizes: np.ndarray, ignore: np.ndarray) -> bytes:
    """Canonical bytes of a word list (all points, points per word, ignore flags), part of
    the ``maps`` key."""
    return b"".join([
        len(sizes).to_bytes(4, "little"), np.ascontiguousarray(sizes, "<u4").tobytes(),
        np.ascontiguousarray(ignore, np.uint8).tobytes(),
        np.ascontiguousarray(points, "<f8").tobytes(),
    ])


def polygons_bytes(polygons: Sequence[np.ndarray], ignore: Sequence[bool] | np.ndarray) -> bytes:
    """:func:`flat_polygons_bytes` of a list of (k, 2) polygons."""
    sizes = np.array([len(p) for p in polygons], np.int64)
    points = (np.concatenate([np.asarray(p, np.float64) for p in polygons]) if len(polygons)
              else np.zeros((0, 2)))
    return flat_polygons_bytes(points, sizes, np.asarray(ignore, bool))


__all__ = ["KINDS", "IndexEntry", "KindVersion", "dataset_root", "derived_image_key",
           "flat_polygons_bytes", "format_hit_rates", "image_key", "index_key", "maps_key",
           "name_kind", "pipeline_id", "polygons_bytes", "reads", "record_name", "source_id",
           "source_state", "tensor_key"]
