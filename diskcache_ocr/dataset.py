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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from diskcache_ocr import batchmem
from diskcache_ocr.batchmem import Spec
from diskcache_ocr.errors import CacheError, CacheFullError, SourceError, TrainingSafetyError
from diskcache_ocr.keys import content_hash, derive_key
from diskcache_ocr.ocr.annotations import (
    AnnotationSet,
    ImageAnnotation,
    load_annotations,
    safe_source_path,
)
from diskcache_ocr.ocr.maps import MAP_NAMES, MapConfig
from diskcache_ocr.ocr.pipeline import BINARY_MAPS, Pipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig, map_points
from diskcache_ocr.presets import Preset, load_preset
from diskcache_ocr.store import CacheStore, IndexEntry, Policy, ReadTxn, Record, WriteBatch

log = logging.getLogger("diskcache_ocr.dataset")

Sample = dict[str, Any]


class Polygons(list):  # type: ignore[type-arg]
    """A sample's polygons: a plain list of (k, 2) float32 arrays, all views of one array.

    Pickled (a DataLoader worker sending its batch) as that one array and the split points,
    which the other side turns back into views: a batch of 8 receipts otherwise pickles ~1,000
    small arrays, 2.1 ms to dump in the worker and 1.4 ms to load in the main process. A list
    that was changed (an item replaced, added or removed) pickles as a plain list.
    """

    __slots__ = ("_flat", "_views")
    _flat: np.ndarray
    _views: tuple[np.ndarray, ...]

    @classmethod
    def split(cls, flat: np.ndarray, ends: Sequence[int]) -> Polygons:
        out = cls(flat[a:b] for a, b in zip([0, *ends], ends, strict=False))
        out._flat = flat
        out._views = tuple(out)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        views = getattr(self, "_views", None)
        if views is None or len(views) != len(self) or any(
                a is not b for a, b in zip(self, views, strict=True)):
            return (list, (list(self),))
        ends = np.cumsum([len(v) for v in views], dtype=np.int64)
        return (_polygons_from_flat, (self._flat, ends))


def _polygons_from_flat(flat: np.ndarray, ends: np.ndarray) -> Polygons:
    return Polygons.split(flat, ends.tolist())


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


_GEOMETRY = ("matrix", "inverse_matrix", "orig_size")


class BatchBuffers:
    """Where one batch's arrays land: image (B,3,S,S), each map (B,1,S,S), inverse (B,3,3).

    The memory is reused once nothing of its last use is alive (:mod:`batchmem`). Inside a
    DataLoader worker it is a shared-memory slab, so sending the batch to the main process
    moves a reference, not the bytes; the batched loader keeps a few pinned sets of its own.
    ``raw_image`` keeps a compact record's uint8 image unfinished, and ``raw_maps`` the binary
    maps as their stored uint8 0/1 (the batched loader moves those bytes to the device and
    finishes there: a third of a sample's bytes).
    """

    def __init__(self, n: int, size: int, with_maps: bool, *, shared: bool = False,
                 pin: bool = False, raw_image: bool = False, raw_maps: bool = False,
                 reuse: bool = True) -> None:
        specs = [Spec("image", (n, 3, size, size), np.dtype(np.uint8 if raw_image
                                                           else np.float32)),
                 Spec("inverse_matrix", (n, 3, 3), np.dtype(np.float64))]
        specs += [Spec(name, (n, 1, size, size),
                       np.dtype(np.uint8 if raw_maps and name in BINARY_MAPS else np.float32))
                  for name in (MAP_NAMES if with_maps else ())]
        block = None
        if reuse and not pin:
            block = batchmem.shared_block(specs) if shared else batchmem.local_block(specs)
        if block is None:  # pinned, not reused, or every slab busy: memory of its own
            tensors = {s.name: _empty(s.shape, _TORCH_DTYPES[s.dtype], shared, pin) for s in specs}
            arrays = {name: t.numpy() for name, t in tensors.items()}
        else:
            tensors, arrays = block.tensors, block.arrays
        self.image_t = tensors["image"]
        self.inverse_t = tensors["inverse_matrix"]
        self.maps_t = {name: tensors[name] for name in MAP_NAMES if name in tensors}
        self.image = arrays["image"]
        self.inverse = arrays["inverse_matrix"]
        self.maps = {name: arrays[name] for name in self.maps_t}
        self.raw_image = raw_image
        # (fn, args) copies gathered inside a read transaction, run before it ends
        self.copies: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool, pin: bool = False
           ) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    numel = 1
    for d in shape:
        numel *= d
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(numel, device="cpu")
    out = proto.new(storage).resize_(shape)
    batchmem.address_populate(out.data_ptr(), out.numel() * out.element_size())
    return out


@dataclass
class _Item:
    """Work-in-progress for one sample of a batch."""

    index: int
    source: str
    slot: int = 0  # position in the batch buffers
    stat: os.stat_result | None = None
    entry: IndexEntry | None = None  # the index entry, when it matches the file's stat
    content: bytes | None = None  # file bytes, when they had to be read
    content_hash: bytes | None = None
    image: np.ndarray | None = None  # decoded image, when needed and available
    geometry: dict[str, np.ndarray] | None = None  # matrix, inverse_matrix, orig_size
    tensor: dict[str, np.ndarray] | None = None  # a computed tensors-kind record
    maps: dict[str, np.ndarray] | None = None  # a computed maps-kind record
    image_done: bool = False  # the image already sits in the batch buffer
    maps_done: bool = False  # the maps were found (and, when reading, copied)
    error: str | None = None
    not_cached: CacheError | None = None  # why the write-back failed (the sample is fine)
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
        preset: str | Path | Mapping[str, Any] | Preset | None = None,
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
        self._fingerprints = {k: v.fingerprint for k, v in self.pipeline.kind_versions().items()}
        self.check_source = check_source
        loaded = load_annotations(images_dir, annotations)
        self.images_dir = loaded.images_dir
        self.problems = loaded.problems  # what was skipped while loading, and why
        self._build_index(loaded)
        self.load_maps = self.preset.load_maps
        self._init_runtime()

        self.store: CacheStore | None = None
        if self.preset.caches_anything:
            if cache_dir is None:
                raise CacheError(
                    f"preset {self.preset.name!r} caches data but no cache_dir was given"
                )
            self._check_training_safety(allow_random_tensor_cache)
            # NOTE: read-through commits skip fsync (a killed process loses nothing; the
            # header's boot id flags an OS crash since); one fsync at close.
            options = {"readahead": self.preset.readahead, "sync": False, **(store_options or {})}
            self.store = CacheStore(cache_dir, readonly=readonly, **options)
            self.store.check_kinds(self._kind_versions(), on_mismatch)
            if self.store.unsynced_reboot():
                log.warning("%s: written without fsync before the last reboot; if the machine "
                            "crashed, run `diskcache-ocr verify` (or rebuild)", cache_dir)
            if not readonly:
                self.store.update_header(
                    dataset_root=str(self.images_dir), preset=self.preset.name,
                    pipeline={"transform": self.pipeline.transform.to_dict(),
                              "maps": self.pipeline.maps.to_dict()})
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
        self._word_ids = np.array([w for it in items for w in it.word_ids], dtype=np.str_)

    @property
    def annotations(self) -> AnnotationSet:
        """The loaded annotations, rebuilt from the flat arrays (held only as arrays, so
        DataLoader workers share them instead of copying Python objects on touch)."""
        items = []
        for i in range(len(self)):
            polys, ignore = self.words(i)
            a, b = self._word_start[i], self._word_start[i + 1]
            items.append(ImageAnnotation(self.source(i), tuple(polys),
                                         tuple(bool(x) for x in ignore),
                                         tuple(str(w) for w in self._word_ids[a:b])))
        return AnnotationSet(self.images_dir, tuple(items), self.problems)

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self.write_seconds = 0.0  # time spent committing read-through writes, this process
        self._served = 0
        self._logged_errors: set[str] = set()
        self._paths: dict[int, Path] = {}  # index -> checked path (checking walks the path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_served", "_logged_errors", "write_seconds", "_paths"):
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

    def flat_words(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's words as views: all points (P, 2), points per word, ignore flags."""
        a, b = self._word_start[index], self._word_start[index + 1]
        starts = self._point_start[a:b + 1]
        return self._points[starts[0]:starts[-1]], np.diff(starts), self._ignore[a:b]

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
        """A batch of samples: one read transaction for the lookups, one write for misses.

        Each cached array is copied once, from LMDB's map straight into a batch buffer (in
        shared memory inside a DataLoader worker); :func:`collate` hands that buffer on
        without copying again.
        """
        batch = BatchBuffers(len(indices), self.pipeline.transform.size, self.load_maps,
                             shared=get_worker_info() is not None,
                             reuse=self.preset.reuse_batch_memory)
        items = self._process(indices, want_maps=self.load_maps, batch=batch)
        samples = [self._assemble(item, batch) for item in items]
        self._log_progress(len(samples))
        return samples

    def build(self, indices: Sequence[int]) -> list[tuple[str, str | None, bool]]:
        """Make sure every kind the preset caches exists for ``indices`` (prebuild's unit of
        work). Returns (source, error or None, whether anything was computed) per index."""
        p = self.preset
        items = self._process(indices, want_maps=self.load_maps or p.cache_maps,
                              want_tensor=p.cache_tensors)
        for it in items:
            if isinstance(it.not_cached, CacheFullError):
                raise it.not_cached  # nothing more can be stored: stop the build, cache intact
        return [(it.source, it.error or (f"not cached: {it.not_cached}" if it.not_cached else None),
                 bool(it.writes)) for it in items]

    def _process(self, indices: Sequence[int], want_maps: bool, want_tensor: bool = True,
                 batch: BatchBuffers | None = None,
                 run_copies: Callable[[list[tuple[Callable[..., Any], tuple[Any, ...]]]], None]
                 | None = None) -> list[_Item]:
        n = len(self)
        items = []
        for slot, i in enumerate(indices):
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a dataset of {n} images")
            items.append(_Item(index=i % n, source=self.source(i % n), slot=slot))
        for item in items:
            self._stat(item)
        if self.store is not None:
            with self.store.reader() as txn:
                for item in items:
                    self._lookup(txn, item, want_maps, batch)
                if batch is not None and batch.copies:
                    # NOTE: the copies read views on the map: they must finish inside the block.
                    (run_copies or _run_inline)(batch.copies)
                    batch.copies = []
        for item in items:
            self._compute(item, want_maps, want_tensor)
        if self.store is not None and not self.store.readonly:
            self._write_back(items)
        return items

    def _path(self, item: _Item) -> Path:
        path = self._paths.get(item.index)
        if path is None:
            path = self._paths[item.index] = safe_source_path(self.images_dir, item.source)
        return path

    def _stat(self, item: _Item) -> None:
        try:
            item.stat = os.stat(self._path(item))
        except (OSError, SourceError) as exc:
            item.error = f"cannot read source: {exc}"

    def _lookup(self, txn: ReadTxn, item: _Item, want_maps: bool,
                batch: BatchBuffers | None) -> None:
        """Take what the cache holds for ``item``: copied straight into the batch buffers
        while the read transaction (and so the views) is alive."""
        if item.error is not None:
            return
        assert self.store is not None and item.stat is not None
        entry = _index_entry(txn, item.source)
        if entry is not None and self._matches(entry, item.stat):
            if not entry.ok:
                item.error = entry.status
                return
            item.entry = entry
            item.content_hash = entry.content_hash
        elif not self._read_source(item):
            return
        h = item.content_hash
        assert h is not None
        p = self.preset
        if p.cache_tensors:
            rec = self._get(txn, "tensors", self._tensor_key(h), item)
            if rec is not None:
                item.geometry = {k: np.array(rec[k]) for k in _GEOMETRY}
                if batch is not None:
                    batch.copies.append((self._put_image, (rec["image"], batch, item.slot)))
                    item.image_done = True
        if want_maps and p.cache_maps:
            rec = self._get(txn, "maps", self._maps_key(item, h), item)
            if rec is not None:
                if batch is not None:
                    for name in MAP_NAMES:
                        batch.copies.append((np.copyto, (batch.maps[name][item.slot], rec[name])))
                item.maps_done = True
        if p.cache_images and item.geometry is None:
            rec = self._get(txn, "images", h, item)
            if rec is not None:
                item.image = np.array(rec["image"])  # the transform needs it after the block
        elif p.cache_images and item.entry is None and txn.contains("images", h):
            # Not needed now, but the new index entry must name it, or invalidating this
            # source later would leave the image record behind.
            item.hits["images"] = h

    def _put_image(self, stored: np.ndarray, batch: BatchBuffers, slot: int) -> None:
        if batch.raw_image:
            np.copyto(batch.image[slot], stored)  # compact uint8, finished later on a device
        else:
            self.pipeline.finish_into(stored, batch.image[slot])

    def _get(self, txn: ReadTxn, kind: str, key: bytes, item: _Item) -> Record | None:
        assert self.store is not None
        try:
            rec = txn.get(kind, key)
        except CacheError as exc:  # a damaged record: recompute (and overwrite) it
            log.warning("%s", exc)
            rec = None
        if rec is None:
            self.store.count(kind, misses=1)
            return None
        self.store.count(kind, hits=1, bytes_read=rec.nbytes)
        item.hits[kind] = key
        return rec

    def _matches(self, entry: IndexEntry, st: os.stat_result) -> bool:
        return not self.check_source or (entry.size == st.st_size
                                         and entry.mtime_ns == st.st_mtime_ns)

    def _read_source(self, item: _Item) -> bool:
        try:
            data = self._path(item).read_bytes()
        except (OSError, SourceError) as exc:
            item.error = f"cannot read source: {exc}"
            return False
        item.content = data
        item.content_hash = content_hash(data)
        return True

    def _tensor_key(self, h: bytes) -> bytes:
        return derive_key("tensors", h, self._fingerprints["tensors"])

    def _maps_key(self, item: _Item, h: bytes) -> bytes:
        points, sizes, ignore = self.flat_words(item.index)
        return derive_key("maps", h, flat_polygons_bytes(points, sizes, ignore),
                          self._fingerprints["maps"])

    def _compute(self, item: _Item, want_maps: bool, want_tensor: bool = True) -> None:
        """Compute what the cache did not have, and note what to write back."""
        if item.error is not None:
            return
        need_maps = want_maps and not item.maps_done
        need_tensor = item.geometry is None and (want_tensor or need_maps)
        need_image = item.image is None and item.geometry is None and (
            need_tensor or self.preset.cache_images)
        try:
            if need_image:
                if item.content is None and not self._read_source(item):
                    return
                assert item.content is not None and item.content_hash is not None
                item.image = self.pipeline.decode(item.content, item.source)
                if self.preset.cache_images:
                    item.writes.append(("images", item.content_hash, {"image": item.image}))
            if need_tensor:
                assert item.image is not None and item.content_hash is not None
                polys, _ = self.words(item.index)
                t = self.pipeline.apply_transform(item.image, polys)
                item.tensor = self.pipeline.tensor_record(t)
                item.geometry = {k: item.tensor[k] for k in _GEOMETRY}
                if self.preset.cache_tensors:
                    item.writes.append(("tensors", self._tensor_key(item.content_hash),
                                        item.tensor))
            if need_maps:
                assert item.geometry is not None and item.content_hash is not None
                polys, ignore = self.words(item.index)
                moved = self.pipeline.transform_polygons(polys, item.geometry["matrix"])
                item.maps = self.pipeline.maps_record(self.pipeline.make_maps(moved, ignore))
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
            if len(item.source.encode()) > self.store.max_key_size():
                self._log_once(f"{item.source}: name too long to index; its records are found "
                               "by content, at the cost of reading the file on every access")
                continue  # (one such key would fail the whole write)
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
            if get_worker_info() is not None:
                batchmem.keep_freed_memory()  # a DataLoader worker that writes
            started = time.perf_counter()
            try:
                self.store.commit(batch)
            except CacheError as exc:  # e.g. disk full: the sample is still served
                log.warning("not cached: %s", exc)
                for item in items:
                    item.not_cached = exc
            self.write_seconds += time.perf_counter() - started

    def _unchanged_since_stat(self, item: _Item) -> bool:
        try:
            st = os.stat(self._path(item))
        except (OSError, SourceError):
            return False
        assert item.stat is not None
        return st.st_size == item.stat.st_size and st.st_mtime_ns == item.stat.st_mtime_ns

    def _assemble(self, item: _Item, batch: BatchBuffers) -> Sample:
        if item.error is not None or item.geometry is None:
            self._log_error(item)
            return self._empty_sample(item, batch)
        slot = item.slot
        if not item.image_done:
            assert item.tensor is not None
            self._put_image(item.tensor["image"], batch, slot)
        geometry = item.geometry
        np.copyto(batch.inverse[slot], geometry["inverse_matrix"])
        sample: Sample = {
            "image": batch.image_t[slot],
            "polygons": self._moved_polygons(item.index, geometry["matrix"]),
            "ignore": np.array(self.flat_words(item.index)[2], dtype=bool),
            "inverse_matrix": batch.inverse_t[slot],
            "meta": {"index": item.index, "file": item.source,
                     "orig_size": tuple(int(v) for v in geometry["orig_size"]), "error": None},
        }
        if self.load_maps:
            if not item.maps_done:
                assert item.maps is not None
                for name in MAP_NAMES:
                    np.copyto(batch.maps[name][slot], item.maps[name])
            for name in MAP_NAMES:
                sample[name] = batch.maps_t[name][slot]
        return sample

    def _moved_polygons(self, index: int, matrix: np.ndarray) -> Polygons:
        """The image's polygons in the transformed image's coordinates, in one pass."""
        points, sizes, _ = self.flat_words(index)
        return Polygons.split(map_points(points, matrix), np.cumsum(sizes).tolist())

    def _empty_sample(self, item: _Item, batch: BatchBuffers) -> Sample:
        """What a bad source yields: the right shapes, all-zero masks, and the reason."""
        slot = item.slot
        blank = np.full(batch.image[slot].shape, self.pipeline.transform.pad_value, np.uint8)
        self._put_image(blank, batch, slot)
        batch.inverse[slot] = np.eye(3)
        sample: Sample = {
            "image": batch.image_t[slot],
            "polygons": [],
            "ignore": np.zeros(0, dtype=bool),
            "inverse_matrix": batch.inverse_t[slot],
            "meta": {"index": item.index, "file": item.source, "orig_size": (0, 0),
                     "error": item.error or "unknown error"},
        }
        if self.load_maps:
            for name in MAP_NAMES:
                batch.maps[name][slot] = 0
                sample[name] = batch.maps_t[name][slot]
        return sample

    def _log_once(self, message: str) -> None:
        with self._lock:
            if message in self._logged_errors:
                return
            self._logged_errors.add(message)
        log.warning("%s", message)

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
                entry = None if item.stat is None else _index_entry(txn, item.source)
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
        todo, _failed = self.missing(range(len(self)))
        for start in range(0, len(todo), batch_size):
            self.build(todo[start:start + batch_size])
        if self.store is not None and self.preset.readahead:
            self.store.warm()

    def stats(self) -> dict[str, int]:
        return {} if self.store is None else self.store.stats()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _index_entry(txn: ReadTxn, source: str) -> IndexEntry | None:
    """The source's index entry; a damaged one counts as absent (recomputed, rewritten)."""
    try:
        return txn.get_index(source)
    except CacheError as exc:
        log.warning("%s", exc)
        return None


def _run_inline(copies: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in copies:
        fn(*args)


def format_hit_rates(stats: Mapping[str, int]) -> str:
    parts = []
    for kind in ("images", "tensors", "maps"):
        hits, misses = stats.get(f"{kind}.hits", 0), stats.get(f"{kind}.misses", 0)
        if hits or misses:
            rate = 100 * hits / (hits + misses)
            parts.append(f"{kind} {hits}/{hits + misses} hits ({rate:.0f}%)")
    return ", ".join(parts) or "no reads yet"


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack images, maps and matrices; keep polygons, ignore flags and metadata as lists."""
    out: dict[str, Any] = {}
    for name in ("image", *MAP_NAMES, "inverse_matrix"):
        if name in samples[0]:
            tensors = [s[name] for s in samples]
            out[name] = _whole_buffer(tensors)
            if out[name] is None:
                out[name] = torch.stack(tensors)
    for name in ("polygons", "ignore", "meta"):
        out[name] = [s[name] for s in samples]
    return out


def _whole_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The batch buffer the tensors are consecutive rows of, if they are exactly that."""
    base = tensors[0]._base
    if base is None or base.dim() != tensors[0].dim() + 1 or base.shape[0] != len(tensors):
        return None
    if not base.is_contiguous():
        return None
    row = base[0].numel()
    for i, t in enumerate(tensors):
        if t._base is not base or t.storage_offset() != base.storage_offset() + i * row:
            return None
    return base


__all__ = ["BatchBuffers", "CachedOCRDataset", "Polygons", "collate", "flat_polygons_bytes",
           "format_hit_rates", "polygons_bytes"]
