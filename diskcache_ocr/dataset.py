"""CachedOCRDataset: a map-style torch Dataset that reads through the cache.

A thin face over the read-through engine (:mod:`diskcache_ocr.readthrough`): it loads the
annotations, resolves the preset into a cache plan, checks the store's versions once, and
hands every read to the engine. A whole batch (``__getitems__``) is read in one read
transaction and written in one write transaction. Cached and computed samples are identical
bit for bit.

NOTE: nothing opens LMDB in ``__init__`` and stays open: the store opens lazily in the
process that reads (DataLoader workers included) and is closed before any fork.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, get_worker_info

from diskcache_ocr.errors import CacheError, CacheFullError, TrainingSafetyError
from diskcache_ocr.ocr.annotations import AnnotationSet, load_annotations
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig
from diskcache_ocr.presets import Preset, cache_plan, load_preset
from diskcache_ocr.readthrough import ReadThrough, format_hit_rates
from diskcache_ocr.samples import BatchBuffers, Catalog, Polygons, Sample, collate
from diskcache_ocr.schema import flat_polygons_bytes, polygons_bytes
from diskcache_ocr.store import CacheStore, Policy

log = logging.getLogger("diskcache_ocr.dataset")


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
        self.plan = plan = cache_plan(self.preset)
        self.split = split
        if transform is None:
            transform = TRAINING if split == "train" else VALIDATION
        pipeline = Pipeline(transform=transform, maps=map_config or MapConfig())
        self.catalog = Catalog(load_annotations(images_dir, annotations))
        self.images_dir = self.catalog.images_dir
        self.problems = self.catalog.problems  # what was skipped while loading, and why
        store = None
        if plan.caches_anything:
            if cache_dir is None:
                raise CacheError(f"preset {plan.name!r} caches data but no cache_dir was given")
            _check_training_safety(plan.safe_for_training or pipeline.is_deterministic(),
                                   plan.name, split, allow_random_tensor_cache)
            # NOTE: read-through commits skip fsync (a killed process loses nothing; the
            # header's boot id flags an OS crash since); one fsync at close.
            options = {"readahead": plan.warm, "sync": False, **(store_options or {})}
            store = CacheStore(cache_dir, readonly=readonly, **options)
        self.engine = ReadThrough(self.catalog, pipeline, plan, store, check_source=check_source)
        if store is not None:
            try:
                store.check_kinds(self.engine.kind_versions(), on_mismatch)
                frozen = (self.engine.serve_stored(store.header().get("kinds", {}))
                          if on_mismatch == "ignore" else [])
                if store.unsynced_reboot():
                    log.warning("%s: written without fsync before the last reboot; if the "
                                "machine crashed, run `diskcache-ocr verify` (or rebuild)",
                                cache_dir)
                if not readonly:
                    # (the pipeline recorded is the one the stored records were made by)
                    store.update_header(
                        dataset_root=str(self.images_dir), preset=plan.name,
                        **({} if frozen else {"pipeline": {
                            "transform": pipeline.transform.to_dict(),
                            "maps": pipeline.maps.to_dict()}}))
                if plan.preload if preload is None else preload:
                    self.preload()
            except CacheFullError as exc:
                # Nothing can be stamped or stored: serve computed samples, as a cache that
                # fills up while reading does.
                log.warning("%s: the disk is full; samples are computed, not cached (%s)",
                            cache_dir, exc)
                self.engine.store = None
            store.close()  # workers open their own; nothing stays open across a fork

    # -- what the engine holds, by its old names -------------------------------------------
    @property
    def pipeline(self) -> Pipeline:
        return self.engine.pipeline

    @property
    def store(self) -> CacheStore | None:
        return self.engine.store

    @property
    def load_maps(self) -> bool:
        return self.plan.return_maps

    @property
    def check_source(self) -> bool:
        return self.engine.check_source

    @property
    def write_seconds(self) -> float:
        """Time spent committing read-through writes in this process."""
        return self.engine.write_seconds

    @property
    def annotations(self) -> AnnotationSet:
        """The loaded annotations, rebuilt from the flat arrays."""
        return self.catalog.annotation_set()

    def __len__(self) -> int:
        return len(self.catalog)

    def words(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The annotated polygons (original coordinates) and ignore flags of one image."""
        return self.catalog.words(index)

    def flat_words(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's words as views: all points (P, 2), points per word, ignore flags."""
        return self.catalog.flat_words(index)

    def source(self, index: int) -> str:
        return self.catalog.source(index)

    # -- reading ----------------------------------------------------------------------------
    def __getitem__(self, index: int) -> Sample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """A batch of samples: one read transaction for the lookups, one write for misses.

        Each cached array is copied once, from LMDB's map straight into a batch buffer (in
        shared memory inside a DataLoader worker); :func:`collate` hands that buffer on
        without copying again.
        """
        buffers = self.engine.buffers(len(indices), shared=get_worker_info() is not None)
        return self.engine.samples(indices, buffers)

    # -- maintenance ------------------------------------------------------------------------
    def build(self, indices: Sequence[int]) -> list[tuple[str, str | None, bool]]:
        """Make sure every kind the preset caches exists for ``indices`` (prebuild's unit of
        work). Returns (source, error or None, whether anything was computed) per index."""
        return [tuple(r) for r in self.engine.build(indices)]  # type: ignore[misc]

    def missing(self, indices: Sequence[int]) -> tuple[list[int], list[tuple[str, str]]]:
        """Which of ``indices`` lack a cached kind (to build), and which are known to fail
        (source unchanged since it failed: not retried). One read transaction."""
        return self.engine.missing(indices)

    def preload(self, batch_size: int = 8) -> None:
        """Build whatever is missing for every item, then warm the page cache."""
        todo, _failed = self.missing(range(len(self)))
        try:
            for start in range(0, len(todo), batch_size):
                self.build(todo[start:start + batch_size])
        except CacheFullError as exc:
            # As without preload: what is not cached is computed on read (and cached later,
            # once there is room).
            log.warning("preload stopped, the disk is full: samples not cached are computed "
                        "on read (%s)", exc)
            return
        if self.store is not None and self.plan.warm:
            self.store.warm()

    def stats(self) -> dict[str, int]:
        return {} if self.store is None else self.store.stats()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _check_training_safety(safe: bool, preset: str, split: str, allow: bool) -> None:
    if safe:
        return
    message = (
        f"preset {preset!r} caches tensors/maps, but the {split!r} split's "
        "transform is not deterministic (random augmentation): every epoch would see the "
        "same augmented sample. Use a training-safe preset (minimal, balanced), or pass "
        "allow_random_tensor_cache=True if this is really intended."
    )
    if not allow:
        raise TrainingSafetyError(message)
    warnings.warn(message, stacklevel=3)


__all__ = ["BatchBuffers", "CachedOCRDataset", "Polygons", "collate", "flat_polygons_bytes",
           "format_hit_rates", "polygons_bytes"]
