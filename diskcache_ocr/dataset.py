"""CachedOCRDataset: a map-style torch Dataset that reads through the cache.

For each item, by the preset's flags, it reads the decoded image, the transformed tensor and
the DBNet maps from the cache, or computes them and writes them back (read-through). A whole
batch (``__getitems__``) is read in one read transaction and written in one write
transaction. Cached and computed samples are identical bit for bit.

NOTE: nothing opens LMDB in ``__init__`` and stays open: the store opens lazily in the
process that reads (DataLoader workers included) and is closed before any fork.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diskcache_ocr.errors import CacheError, SourceError, TrainingSafetyError
from diskcache_ocr.keys import content_hash, derive_key
from diskcache_ocr.ocr.annotations import AnnotationSet, load_annotations, safe_source_path
from diskcache_ocr.ocr.maps import MAP_NAMES, MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig
from diskcache_ocr.presets import Preset, load_preset
from diskcache_ocr.store import CacheStore, IndexEntry, Policy, ReadTxn, WriteBatch

log = logging.getLogger("diskcache_ocr.dataset")

Sample = dict[str, Any]


def polygons_bytes(polygons: Sequence[np.ndarray], ignore: Sequence[bool]) -> bytes:
    """Canonical bytes of a word list, part of the ``maps`` key."""
    parts = [len(polygons).to_bytes(4, "little")]
    for poly, ign in zip(polygons, ignore, strict=True):
        pts = np.ascontiguousarray(poly, dtype="<f8")
        parts += [len(pts).to_bytes(4, "little"), b"\x01" if ign else b"\x00", pts.tobytes()]
    return b"".join(parts)


@dataclass
class _Item:
    """Work-in-progress for one sample of a batch."""

    index: int
    source: str
    stat: os.stat_result | None = None
    entry: IndexEntry | None = None  # the index entry, when it matches the file's stat
    content: bytes | None = None  # file bytes, when they had to be read
    content_hash: bytes | None = None
    image: np.ndarray | None = None  # decoded image, when needed and available
    tensor: dict[str, np.ndarray] | None = None  # a tensors-kind record (owned copy)
    maps: dict[str, np.ndarray] | None = None
    error: str | None = None
    hits: dict[str, bytes] = field(default_factory=dict)  # kind -> key found in the cache
    writes: list[tuple[str, bytes, dict[str, np.ndarray]]] = field(default_factory=list)


class CachedOCRDataset(Dataset[Sample]):
    """OCR detection samples, cached on disk in LMDB by the preset's rules.

    >>> ds = CachedOCRDataset("data/images/val", "data/jsons/val.json", "cache/",
    ...                       preset="validation_optimized", split="val")   # doctest: +SKIP
    >>> sample = ds[0]   # image, polygons, ignore, prob_map ... inverse_matrix, meta
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        annotations: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        preset: str | os.PathLike[str] | Mapping[str, Any] | Preset | None = None,
        split: str = "val",
        transform: TransformConfig | None = None,
        map_config: MapConfig | None = None,
        on_mismatch: Policy = "error",
        allow_random_tensor_cache: bool = False,
        readonly: bool = False,
        check_source: bool = True,
        store_options: Mapping[str, Any] | None = None,
        preload: bool | None = None,
    ) -> None:
        self.preset = load_preset(preset)
        self.split = split
        if transform is None:
            transform = TRAINING if split == "train" else VALIDATION
        self.pipeline = Pipeline(transform=transform, maps=map_config or MapConfig())
        self.check_source = check_source
        self.annotations: AnnotationSet = load_annotations(images_dir, annotations)
        self.images_dir = self.annotations.images_dir
        self._build_index(self.annotations)
        self.load_maps = self.preset.load_maps
        self._init_runtime()

        self.store: CacheStore | None = None
        if self.preset.caches_anything:
            if cache_dir is None:
                raise CacheError(
                    f"preset {self.preset.name!r} caches data but no cache_dir was given"
                )
            self._check_training_safety(allow_random_tensor_cache)
            options = {"readahead": self.preset.readahead, **(store_options or {})}
            self.store = CacheStore(cache_dir, readonly=readonly, **options)
            self.store.check_kinds(self._kind_versions(), on_mismatch)
            if not readonly:
                self.store.update_header(dataset_root=str(self.images_dir),
                                         preset=self.preset.name)
            if preload if preload is not None else (
                self.preset.preload_images or self.preset.preload_maps
            ):
                self.preload()
            self.store.close()  # workers open their own; nothing stays open across a fork

    # -- index held as flat numpy arrays (no per-item Python objects for workers to copy) --
    def _build_index(self, annotations: AnnotationSet) -> None:
        items = annotations.items
        self._files = np.array([it.file for it in items], dtype=np.str_)
        counts = np.array([len(it.polygons) for it in items], dtype=np.int64)
        self._word_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        polys = [p for it in items for p in it.polygons]
        sizes = np.array([len(p) for p in polys], dtype=np.int64)
        self._point_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._points = (np.concatenate(polys).astype(np.float64) if polys
                        else np.zeros((0, 2), np.float64))
        self._ignore = np.array([i for it in items for i in it.ignore], dtype=bool)

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self.write_seconds = 0.0  # time spent committing read-through writes, this process
        self._served = 0
        self._logged_errors: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_served", "_logged_errors", "write_seconds"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __len__(self) -> int:
        return len(self._files)

    def words(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The annotated polygons (original coordinates) and ignore flags of one image."""
        a, b = self._word_start[index], self._word_start[index + 1]
        polys = [self._points[self._point_start[w]:self._point_start[w + 1]] for w in range(a, b)]
        return polys, self._ignore[a:b]

    def source(self, index: int) -> str:
        return str(self._files[index])

    # -- policy -------------------------------------------------------------------------
    def _cached_kinds(self) -> list[str]:
        p = self.preset
        kinds = [k for k, on in (("images", p.cache_images), ("tensors", p.cache_tensors),
                                 ("maps", p.cache_maps)) if on]
        return kinds

    def _kind_versions(self) -> dict[str, Any]:
        versions = self.pipeline.kind_versions()
        return {k: versions[k] for k in self._cached_kinds()}

    def _check_training_safety(self, allow: bool) -> None:
        if self.preset.safe_for_training or self.pipeline.is_deterministic():
            return
        message = (
            f"preset {self.preset.name!r} caches tensors/maps, but the {self.split!r} split's "
            "transform is not deterministic (random augmentation): every epoch would see the "
            "same augmented sample. Use a training-safe preset (minimal, balanced), or pass "
            "allow_random_tensor_cache=True if this is really intended."
        )
        if not allow:
            raise TrainingSafetyError(message)
        warnings.warn(message, stacklevel=3)

    # -- reading ------------------------------------------------------------------------
    def __getitem__(self, index: int) -> Sample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """A batch of samples: one read transaction for the lookups, one write for misses."""
        items = self._process(indices, want_maps=self.load_maps)
        samples = [self._assemble(item) for item in items]
        self._log_progress(len(samples))
        return samples

    def build(self, indices: Sequence[int]) -> list[tuple[str, str | None, bool]]:
        """Make sure every kind the preset caches exists for ``indices`` (prebuild's unit of
        work). Returns (source, error or None, whether anything was computed) per index."""
        p = self.preset
        items = self._process(indices, want_maps=self.load_maps or p.cache_maps,
                              want_tensor=p.cache_tensors)
        return [(it.source, it.error, bool(it.writes)) for it in items]

    def _process(self, indices: Sequence[int], want_maps: bool, want_tensor: bool = True
                 ) -> list[_Item]:
        n = len(self)
        items = []
        for i in indices:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a dataset of {n} images")
            items.append(_Item(index=i % n, source=self.source(i % n)))
        for item in items:
            self._stat(item)
        if self.store is not None:
            with self.store.reader() as txn:
                for item in items:
                    self._lookup(txn, item, want_maps)
        for item in items:
            self._compute(item, want_maps, want_tensor)
        if self.store is not None and not self.store.readonly:
            self._write_back(items)
        return items

    def _stat(self, item: _Item) -> None:
        try:
            path = safe_source_path(self.images_dir, item.source)
            item.stat = os.stat(path)
        except (OSError, SourceError) as exc:
            item.error = f"cannot read source: {exc}"

    def _lookup(self, txn: ReadTxn, item: _Item, want_maps: bool) -> None:
        """Copy what the cache holds for ``item`` out of the read transaction."""
        if item.error is not None:
            return
        assert self.store is not None and item.stat is not None
        entry = txn.get_index(item.source)
        if entry is not None and self._matches(entry, item.stat):
            if not entry.ok:
                item.error = entry.status
                return
            item.entry = entry
            item.content_hash = entry.content_hash
        else:
            if not self._read_source(item):
                return
        h = item.content_hash
        assert h is not None
        p = self.preset
        if p.cache_tensors:
            item.tensor = self._get(txn, "tensors", self._tensor_key(h), item)
        if want_maps and p.cache_maps:
            item.maps = self._get(txn, "maps", self._maps_key(item, h), item)
        if p.cache_images and item.tensor is None:
            rec = self._get(txn, "images", h, item)
            item.image = None if rec is None else rec["image"]

    def _get(self, txn: ReadTxn, kind: str, key: bytes, item: _Item
             ) -> dict[str, np.ndarray] | None:
        assert self.store is not None
        try:
            rec = txn.get(kind, key)
        except CacheError as exc:  # damaged record: recompute (and overwrite) it
            log.warning("%s", exc)
            rec = None
        if rec is None:
            self.store.count(kind, misses=1)
            return None
        self.store.count(kind, hits=1, bytes_read=rec.nbytes)
        item.hits[kind] = key
        return rec.copy()

    def _matches(self, entry: IndexEntry, st: os.stat_result) -> bool:
        return not self.check_source or (entry.size == st.st_size
                                         and entry.mtime_ns == st.st_mtime_ns)

    def _read_source(self, item: _Item) -> bool:
        try:
            data = safe_source_path(self.images_dir, item.source).read_bytes()
        except (OSError, SourceError) as exc:
            item.error = f"cannot read source: {exc}"
            return False
        item.content = data
        item.content_hash = content_hash(data)
        return True

    def _tensor_key(self, h: bytes) -> bytes:
        return derive_key("tensors", h, self.pipeline.kind_versions()["tensors"].fingerprint)

    def _maps_key(self, item: _Item, h: bytes) -> bytes:
        polys, ignore = self.words(item.index)
        return derive_key("maps", h, polygons_bytes(polys, ignore),
                          self.pipeline.kind_versions()["maps"].fingerprint)

    def _compute(self, item: _Item, want_maps: bool, want_tensor: bool = True) -> None:
        """Fill in what the cache did not have, and note what to write back."""
        if item.error is not None:
            return
        need_maps = want_maps and item.maps is None
        need_tensor = item.tensor is None and (want_tensor or need_maps)
        need_image = item.image is None and item.tensor is None and (
            need_tensor or self.preset.cache_images)
        try:
            if need_image:
                if item.content is None and not self._read_source(item):
                    return
                assert item.content is not None
                item.image = self.pipeline.decode(item.content, item.source)
                if self.preset.cache_images:
                    item.writes.append(("images", item.content_hash, {"image": item.image}))
            if need_tensor:
                assert item.image is not None
                polys, _ = self.words(item.index)
                t = self.pipeline.apply_transform(item.image, polys)
                item.tensor = self.pipeline.tensor_record(t)
                if self.preset.cache_tensors:
                    item.writes.append(("tensors", self._tensor_key(item.content_hash),
                                        item.tensor))
            if need_maps:
                assert item.tensor is not None
                polys, ignore = self.words(item.index)
                moved = self.pipeline.transform_polygons(polys, item.tensor["matrix"])
                item.maps = self.pipeline.make_maps(moved, ignore)
                if self.preset.cache_maps:
                    item.writes.append(("maps", self._maps_key(item, item.content_hash),
                                        item.maps))
        except SourceError as exc:
            item.error = exc.reason

    def _write_back(self, items: list[_Item]) -> None:
        assert self.store is not None
        batch = WriteBatch()
        for item in items:
            for kind, key, arrays in item.writes:
                batch.put(kind, key, arrays)
            if item.stat is None or item.content_hash is None:
                continue
            if item.entry is not None and not item.writes:
                continue  # nothing new to say about this source
            if item.entry is None and not (item.writes or item.hits or item.error):
                continue  # nothing cached for it (e.g. only maps cached, maps not read)
            if not self._unchanged_since_stat(item):
                continue  # the file changed while we read it: serve, but do not index
            status = "ok" if item.error is None else f"failed: {item.error}"
            keys = dict(item.entry.keys) if item.entry is not None else {}
            keys.update(item.hits)  # records found by content (e.g. the file was touched)
            keys.update({kind: key for kind, key, _ in item.writes})
            batch.put_index(item.source, IndexEntry(
                size=item.stat.st_size, mtime_ns=item.stat.st_mtime_ns,
                content_hash=item.content_hash, status=status, keys=keys,
                updated_ns=time.time_ns(),
            ))
        if len(batch):
            started = time.perf_counter()
            try:
                self.store.commit(batch)
            except CacheError as exc:  # e.g. disk full: the sample is still served
                log.warning("not cached: %s", exc)
            self.write_seconds += time.perf_counter() - started

    def _unchanged_since_stat(self, item: _Item) -> bool:
        try:
            st = os.stat(safe_source_path(self.images_dir, item.source))
        except (OSError, SourceError):
            return False
        assert item.stat is not None
        return st.st_size == item.stat.st_size and st.st_mtime_ns == item.stat.st_mtime_ns

    def _assemble(self, item: _Item) -> Sample:
        size = self.pipeline.transform.size
        polys, ignore = self.words(item.index)
        if item.error is not None or item.tensor is None:
            self._log_error(item)
            return self._empty_sample(item, polys, ignore)
        tensor = item.tensor
        image = self.pipeline.finish_image(torch.from_numpy(tensor["image"]))
        sample: Sample = {
            "image": image,
            "polygons": list(self.pipeline.transform_polygons(polys, tensor["matrix"])),
            "ignore": np.array(ignore, dtype=bool),
            "inverse_matrix": torch.from_numpy(tensor["inverse_matrix"]),
            "meta": {"index": item.index, "file": item.source,
                     "orig_size": tuple(int(v) for v in tensor["orig_size"]), "error": None},
        }
        if self.load_maps:
            assert item.maps is not None
            for name in MAP_NAMES:
                sample[name] = torch.from_numpy(item.maps[name])
            assert sample["prob_map"].shape == (1, size, size)
        return sample

    def _empty_sample(self, item: _Item, polys: list[np.ndarray], ignore: np.ndarray) -> Sample:
        """What a bad source yields: the right shapes, all-zero masks, and the reason."""
        size = self.pipeline.transform.size
        blank = torch.full((3, size, size), self.pipeline.transform.pad_value, dtype=torch.uint8)
        sample: Sample = {
            "image": self.pipeline.finish_image(blank),
            "polygons": [],
            "ignore": np.zeros(0, dtype=bool),
            "inverse_matrix": torch.eye(3, dtype=torch.float64),
            "meta": {"index": item.index, "file": item.source, "orig_size": (0, 0),
                     "error": item.error or "unknown error"},
        }
        if self.load_maps:
            for name in MAP_NAMES:
                sample[name] = torch.zeros((1, size, size), dtype=torch.float32)
        return sample

    def _log_error(self, item: _Item) -> None:
        with self._lock:
            if item.source in self._logged_errors:
                return
            self._logged_errors.add(item.source)
        log.error("%s: skipped (%s)", item.source, item.error)

    def _log_progress(self, n: int) -> None:
        every = self.preset.log_statistics_every_n
        if not every or self.store is None:
            return
        with self._lock:
            before, self._served = self._served, self._served + n
        if before // every != self._served // every:
            log.info("cache after %d samples (pid %d): %s", self._served, os.getpid(),
                     format_hit_rates(self.store.stats()))

    # -- maintenance --------------------------------------------------------------------
    def missing(self, indices: Sequence[int]) -> tuple[list[int], list[tuple[str, str]]]:
        """Which of ``indices`` lack a cached kind (to build), and which are known to fail
        (source unchanged since it failed: not retried). One read transaction."""
        todo: list[int] = []
        failed: list[tuple[str, str]] = []
        if self.store is None:
            return list(indices), failed
        p = self.preset
        with self.store.reader() as txn:
            for i in indices:
                item = _Item(index=int(i), source=self.source(int(i)))
                self._stat(item)
                entry = None if item.stat is None else txn.get_index(item.source)
                if entry is None or item.stat is None or not self._matches(entry, item.stat):
                    todo.append(item.index)
                    continue
                if not entry.ok:
                    failed.append((item.source, entry.status))
                    continue
                h = entry.content_hash
                needed = [("images", h)] if p.cache_images else []
                if p.cache_tensors:
                    needed.append(("tensors", self._tensor_key(h)))
                if p.cache_maps:
                    needed.append(("maps", self._maps_key(item, h)))
                if not all(txn.contains(kind, key) for kind, key in needed):
                    todo.append(item.index)
        return todo, failed


    def preload(self, batch_size: int = 8) -> None:
        """Build whatever is missing for every item, then warm the page cache."""
        for start in range(0, len(self), batch_size):
            self.__getitems__(range(start, min(start + batch_size, len(self))))
        if self.store is not None and self.preset.readahead:
            self.store.warm()

    def stats(self) -> dict[str, int]:
        return {} if self.store is None else self.store.stats()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def format_hit_rates(stats: Mapping[str, int]) -> str:
    parts = []
    for kind in ("images", "tensors", "maps"):
        hits, misses = stats.get(f"{kind}.hits", 0), stats.get(f"{kind}.misses", 0)
        if hits or misses:
            parts.append(f"{kind} {hits}/{hits + misses} hits ({100 * hits / (hits + misses):.0f}%)")
    return ", ".join(parts) or "no reads yet"


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack images, maps and matrices; keep polygons, ignore flags and metadata as lists."""
    out: dict[str, Any] = {}
    for name in ("image", *MAP_NAMES, "inverse_matrix"):
        if name in samples[0]:
            out[name] = torch.stack([s[name] for s in samples])
    for name in ("polygons", "ignore", "meta"):
        out[name] = [s[name] for s in samples]
    return out


__all__ = ["CachedOCRDataset", "collate", "format_hit_rates", "polygons_bytes"]
