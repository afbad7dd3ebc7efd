"""One sample on its way through the read-through engine, and its source file.

A :class:`Work` item carries what the engine learned of one image of a batch: its source
file's stat and bytes, the index entry, the records taken from the cache or computed, the
keys found, and the records to write back. Its methods are the source-file side of a batch:
the checked path, the stat, reading and hashing the bytes, and what its new index entry names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diskcache_ocr.errors import CacheError, ImageDecodeError, SourceError
from diskcache_ocr.keys import content_hash, derive_key
from diskcache_ocr.ocr.annotations import safe_source_path
from diskcache_ocr.ocr.decode import read_image_file
from diskcache_ocr.schema import MAX_NAMES, IndexEntry

# A copy that reads a record's views on the cache's map: run before the read block ends.
Copy = tuple[Callable[..., Any], tuple[Any, ...]]


@dataclass
class Work:
    """One sample of a batch on its way through the engine."""

    index: int
    source: str
    slot: int = 0  # row in the batch buffers
    path: Path | None = None  # the checked path, resolved afresh for every batch
    stat: os.stat_result | None = None
    entry: IndexEntry | None = None  # the index entry, when it matches the file's stat
    content: bytes | None = None  # file bytes, when they had to be read
    content_hash: bytes | None = None
    image: np.ndarray | None = None  # decoded image, when needed and available
    # What the sample needs of its ``tensors`` record, owned (None: not known yet).
    tensor: dict[str, np.ndarray] | None = None
    maps: dict[str, np.ndarray] | None = None  # a maps record, owned (when not in its row)
    image_done: bool = False  # the image already sits in the batch buffer
    maps_done: bool = False  # the maps were found (and, when reading, taken)
    error: str | None = None
    not_cached: CacheError | None = None  # why the write-back failed (the sample is fine)
    hits: dict[str, bytes] = field(default_factory=dict)  # record name -> key found
    writes: list[tuple[str, bytes, dict[str, np.ndarray]]] = field(default_factory=list)

    # -- the source file ----------------------------------------------------------------------
    def path_in(self, images_dir: Path) -> Path:
        # NOTE: never kept beyond one batch: a symlink may be re-pointed at any time.
        if self.path is None:
            self.path = safe_source_path(images_dir, self.source)
        return self.path

    def stat_source(self, images_dir: Path) -> None:
        try:
            self.stat = os.stat(self.path_in(images_dir))
        except (OSError, SourceError) as exc:
            self.error = f"cannot read source: {exc}"

    def read_source(self, images_dir: Path, max_pixels: int) -> bool:
        """Read and hash the file's bytes; False (with :attr:`error`) when it cannot be."""
        try:
            data = read_image_file(self.path_in(images_dir), self.source, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            # Refused from its first bytes or its size, unread: the failure is indexed
            # under a hash of the refusal (it is never a record key), so the unchanged file
            # is not retried.
            self.error = exc.reason
            self.content_hash = derive_key("refused", exc.reason)
            return False
        except (OSError, SourceError) as exc:
            self.error = f"cannot read source: {exc}"
            return False
        h = content_hash(data)
        if self.content_hash is not None and h != self.content_hash:
            # The file was replaced after its stat matched the index: what was taken from
            # the cache belongs to the old content. Every part comes from these bytes.
            self.forget_cached()
        self.content = data
        self.content_hash = h
        return True

    def forget_cached(self) -> None:
        self.entry, self.tensor, self.maps, self.image = None, None, None, None
        self.image_done = self.maps_done = False
        self.hits.clear()

    def unchanged_since_stat(self, images_dir: Path) -> bool:
        try:
            st = os.stat(self.path_in(images_dir))
        except (OSError, SourceError):
            return False
        assert self.stat is not None
        return IndexEntry.of_stat(self.stat, b"").matches(st)

    # -- its index entry ----------------------------------------------------------------------
    def has_news(self) -> bool:
        """Whether the index has something new to learn about this source."""
        if self.stat is None or self.content_hash is None:
            return False
        if self.entry is not None and not self.writes and (
                self.hits.items() <= self.entry.keys.items()):
            return False  # nothing new to say about this source
        # (no entry and nothing cached for it: e.g. only maps cached, maps not read)
        return self.entry is not None or bool(self.writes or self.hits or self.error)

    def index_keys(self, written: Mapping[str, bytes]) -> dict[str, bytes]:
        """The record names its new index entry holds: the old entry's, the records found by
        content (e.g. the file was touched) and ``written`` (name -> key), the oldest others
        dropped beyond :data:`~diskcache_ocr.schema.MAX_NAMES` (their records become
        orphans)."""
        keys = dict(self.entry.keys) if self.entry is not None else {}
        keys.update(self.hits)
        keys.update(written)
        others = [n for n in keys if n not in written and n not in self.hits]
        for name in others[:max(0, len(keys) - MAX_NAMES)]:
            del keys[name]
        return keys


__all__ = ["Copy", "Work"]
