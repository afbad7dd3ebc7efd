"""CachedOCRDataset: a map-style torch Dataset that reads through the cache.

A thin face over the read-through engine (:mod:`diskcache_ocr.readthrough`): it loads the
annotations and has :mod:`diskcache_ocr.engine_setup` make every other decision (the plan,
the pipeline, the safety check, the store's versions, the header) and the engine; then it
hands every read to that engine. A whole batch (``__getitems__``) is read in one read
transaction and written in one write transaction. Cached and computed samples are identical
bit for bit.

NOTE: nothing opens LMDB in ``__init__`` and stays open: the store opens lazily in the
process that reads (DataLoader workers included) and is closed before any fork.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset, get_worker_info

from diskcache_ocr.build import BuildSummary, build_engine
from diskcache_ocr.engine_setup import EngineOptions, choose, open_engine
from diskcache_ocr.engine_setup import preload as preload_engine
from diskcache_ocr.ocr.annotations import AnnotationSet
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import StagePipeline
from diskcache_ocr.paths import default_cache_dir
from diskcache_ocr.presets import Preset
from diskcache_ocr.readthrough import ReadThrough
from diskcache_ocr.samples import (
    BatchBuffers,
    Catalog,
    Polygons,
    Sample,
    collate,
    collate_fn,
)
from diskcache_ocr.schema import flat_polygons_bytes, format_hit_rates, polygons_bytes
from diskcache_ocr.store import CacheStore, Policy


class CachedOCRDataset(Dataset[Sample]):
    """OCR detection samples, cached on disk in LMDB by the preset's rules.

    >>> ds = CachedOCRDataset("data/images/val", "data/jsons/val.json", "cache/",
    ...                       preset="validation_optimized", split="val")   # doctest: +SKIP
    >>> sample = ds[0]   # image, polygons, ignore, prob_map ... inverse_matrix, meta

    Your own pipeline: ``convention`` ("db", the reference DBNet rules, or "origin", the
    origin project's), ``transform`` (an ``albumentations.Compose`` with
    ``KeypointParams(format="xy")``, or a callable ``(image, polygons) -> (image, polygons,
    inverse_matrix)`` with ``transform_version``), ``maps`` (a callable ``(polygons, h, w,
    ignore=None) -> dict`` with ``maps_version``). Each stage's fingerprint versions the kind
    that holds its output; an unversioned callable is computed live, never cached. A random
    albumentations transform caches its deterministic prefix and runs the rest live, maps
    live after it. ``item_keys`` ("db" or "origin"; default: the convention's) names a
    sample's keys; ``collate_fn(item_keys)`` batches them. ``cache_dir`` defaults to
    ``$DISKCACHE_OCR_DIR``, else ``~/.cache/diskcache-ocr``. ``load_maps`` overrides the
    preset's (e.g. ``balanced`` + ``load_maps=True`` trains a DBNet: maps made live).

    ``preload``: None follows the preset (``preload_images`` / ``preload_maps`` build what is
    missing now, then read it ahead); True / False force it; ``"first-epoch"`` reads ahead
    what exists now and leaves the rest to the first epoch's reads, which build it in
    parallel in the DataLoader's workers.

    ``output="compact"`` (or a preset's ``output: compact``) returns the stored forms instead:
    the uint8 resized, padded image, the binary maps as uint8 0/1, the float32 threshold map,
    and a ``"finish"`` entry (plain data) saying how to make them float32;
    :func:`~diskcache_ocr.finish_batch` does that to a collated batch, bit for bit what the
    default ``"float32"`` output returns, on whatever device the batch is on. With your own
    transform it applies to an albumentations Compose that ends in ``A.Normalize``: samples
    hold the uint8 image before it (cached so when the Compose is deterministic; made live by
    a random Compose's rest), and ``finish_batch`` applies that Normalize (reproduced, checked
    equal for every uint8 value at construction); any other transform's samples are what it
    returns.

    ``engine`` is the read-through engine the dataset reads by (made by
    :mod:`diskcache_ocr.engine_setup`): :class:`~diskcache_ocr.loader.BatchLoader`,
    :func:`~diskcache_ocr.prebuild.prebuild_dataset` and ``verify`` take it, or the dataset.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        annotations: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        preset: str | Path | Mapping[str, Any] | Preset | None = None,
        split: str = "val",
        transform: Any = None,
        map_config: MapConfig | None = None,
        convention: str | None = None,
        transform_version: Any = None,
        maps: Any = None,
        maps_version: Any = None,
        item_keys: str | None = None,
        load_maps: bool | None = None,
        on_mismatch: Policy = "error",
        allow_random_tensor_cache: bool = False,
        readonly: bool = False,
        check_source: bool = True,
        store_options: Mapping[str, Any] | None = None,
        preload: bool | Literal["first-epoch"] | None = None,
        output: Literal["float32", "compact"] | None = None,
    ) -> None:
        options = EngineOptions(
            images_dir=images_dir, cache_dir=cache_dir, preset=preset, split=split,
            transform=transform, map_config=map_config, convention=convention,
            transform_version=transform_version, maps=maps, maps_version=maps_version,
            item_keys=item_keys, load_maps=load_maps, on_mismatch=on_mismatch,
            allow_random_tensor_cache=allow_random_tensor_cache, readonly=readonly,
            check_source=check_source, store_options=store_options, preload=preload,
            output=output)
        choice = choose(options)
        self.preset, self.plan, self.output = choice.preset, choice.plan, choice.output
        self.split, self.item_keys, rules = split, choice.item_keys, choice.rules
        # A JSON file's annotations are indexed once in the cache directory and mapped by
        # every process (parsed into this one when nothing is cached).
        self.catalog = Catalog.load(
            images_dir, annotations, rules, readonly=readonly,
            cache_dir=(cache_dir or default_cache_dir()) if self.plan.caches_anything else None)
        self.images_dir = self.catalog.images_dir
        self.problems = self.catalog.problems  # what was skipped while loading, and why
        self.engine: ReadThrough = open_engine(options, choice, self.catalog)

    # -- what the engine holds, by its old names -------------------------------------------
    def collate_fn(self) -> Any:
        """The collate function for this dataset's item keys (a DataLoader ``collate_fn``)."""
        return collate_fn(self.item_keys)

    @property
    def pipeline(self) -> Pipeline | StagePipeline:
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
        buffers = self.engine.buffers(len(indices), shared=get_worker_info() is not None,
                                      compact=self.output == "compact")
        return self.engine.samples(indices, buffers)

    # -- maintenance ------------------------------------------------------------------------
    def build(self, indices: Sequence[int]) -> list[tuple[str, str | None, bool]]:
        """Make sure every kind the preset caches exists for ``indices`` (prebuild's unit of
        work). Returns (source, error or None, whether anything was computed) per index."""
        return [tuple(r) for r in self.engine.build(indices)]  # type: ignore[misc]

    def prebuild(self, workers: int = 1, *, progress: bool = True) -> BuildSummary:
        """Build every record this dataset reads (its pipeline, its preset, its cache), in
        ``workers`` processes, resumable; each torchrun rank builds its share. See
        :func:`diskcache_ocr.prebuild.prebuild_dataset`.

        >>> ds.prebuild(workers=8).line()  # doctest: +SKIP
        '40 built, 0 already cached, 0 failed, of 40 in 3.1 s (12.9 images/s, 8 workers)'
        """
        return build_engine(self.engine, workers=workers, progress=progress)

    def missing(self, indices: Sequence[int]) -> tuple[list[int], list[tuple[str, str]]]:
        """Which of ``indices`` lack a cached kind (to build), and which are known to fail
        (source unchanged since it failed: not retried). One read transaction."""
        return self.engine.missing(indices)

    def preload(self, batch_size: int = 8) -> None:
        """Build whatever is missing for every item, then warm the page cache."""
        preload_engine(self.engine, batch_size)

    def stats(self) -> dict[str, int]:
        return {} if self.store is None else self.store.stats()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


__all__ = ["BatchBuffers", "CachedOCRDataset", "Polygons", "collate", "collate_fn",
           "default_cache_dir", "flat_polygons_bytes",
           "format_hit_rates", "polygons_bytes"]
