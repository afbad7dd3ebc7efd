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

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset, get_worker_info

from diskcache_ocr.build import BuildSummary, build_engine
from diskcache_ocr.errors import CacheError, CacheFullError, TrainingSafetyError
from diskcache_ocr.ocr.annotations import AnnotationSet
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import StagePipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig
from diskcache_ocr.paths import default_cache_dir
from diskcache_ocr.presets import CachePlan, Preset, cache_plan, load_preset
from diskcache_ocr.readthrough import ReadThrough, plain_versions
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

log = logging.getLogger("diskcache_ocr.dataset")


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
        self.preset = load_preset(preset)
        plan = cache_plan(self.preset)
        if load_maps is not None:
            plan = dataclasses.replace(plan, return_maps=bool(load_maps))
        # "compact": samples hold the stored uint8 image and binary maps; finish_batch makes
        # a batch of them float32 later, where it is cheap (typically on the GPU).
        self.output = plan.output if output is None else output
        if self.output not in ("float32", "compact"):
            raise ValueError(f"output must be 'float32' or 'compact', got {self.output!r}")
        self.split = split
        staged = (convention not in (None, "db") or maps is not None
                  or not (transform is None or isinstance(transform, TransformConfig)))
        pipeline: Pipeline | StagePipeline
        if staged and isinstance(transform, TransformConfig):
            raise CacheError(f"{images_dir}: a TransformConfig is the built-in transform of the "
                             f"'db' convention; with convention={convention!r} leave transform "
                             "out (the convention's own) or pass your own transform")
        if staged:
            pipeline = StagePipeline(
                convention=convention or "db", transform=transform,
                transform_version=transform_version, maps=maps, maps_version=maps_version,
                map_params=_map_params(map_config, convention or "db", maps),
                compact=self.output == "compact")
            plan = _stage_plan(plan, pipeline, split, allow_random_tensor_cache)
            if self.output == "compact" and pipeline.tail is None:
                # Only an albumentations Compose ending in a Normalize the library reproduces
                # exactly has a form to finish later; any other transform's samples are what
                # it returns.
                log.info("%s: output='compact' needs an albumentations Compose ending in "
                         "A.Normalize; samples are what your transform returns", images_dir)
                self.output = "float32"
        else:
            if transform_version is not None or maps_version is not None:
                raise CacheError("transform_version/maps_version are for a transform or maps "
                                 "callable you pass")
            if transform is None:
                transform = TRAINING if split == "train" else VALIDATION
            pipeline = Pipeline(transform=transform, maps=map_config or MapConfig())
        item_keys = item_keys or (convention if convention == "origin" else "db")
        if item_keys not in ("db", "origin"):
            raise CacheError(f"item_keys must be 'db' or 'origin', got {item_keys!r}")
        self.item_keys = item_keys
        self.plan = plan
        rules = "origin" if convention == "origin" else "db"
        # A JSON file's annotations are indexed once in the cache directory and mapped by
        # every process (parsed into this one when nothing is cached).
        self.catalog = Catalog.load(
            images_dir, annotations, rules, readonly=readonly,
            cache_dir=(cache_dir or default_cache_dir()) if plan.caches_anything else None)
        self.images_dir = self.catalog.images_dir
        self.problems = self.catalog.problems  # what was skipped while loading, and why
        store = None
        if plan.caches_anything:
            if cache_dir is None:
                cache_dir = default_cache_dir()
            if not staged:  # (a stage plan was checked by _stage_plan)
                _check_training_safety(plan.safe_for_training or pipeline.is_deterministic(),
                                       plan.name, split, allow_random_tensor_cache)
            # NOTE: read-through commits skip fsync (a killed process loses nothing; the
            # header's boot id flags an OS crash since); one fsync at close.
            options = {"readahead": plan.warm, "sync": False, **(store_options or {})}
            store = CacheStore(cache_dir, readonly=readonly, **options)
        self.engine = ReadThrough(self.catalog, pipeline, plan, store, check_source=check_source,
                                  item_keys=item_keys)
        if store is not None:
            try:
                # Each role (images directory, split, output form, convention) holds its own
                # pipeline's records: a mismatch rebuilds (or refuses) this role's only.
                described: dict[str, Any]
                if isinstance(pipeline, StagePipeline):
                    described = {"stage_pipeline": pipeline.describe()}
                else:
                    described = {"stage_pipeline": None,
                                 "pipeline": {"transform": pipeline.transform.to_dict(),
                                              "maps": pipeline.maps.to_dict()}}
                opened = store.open_pipeline(
                    self.engine.role(split, self.output), self.engine.kind_versions(),
                    on_mismatch, plain=plain_versions(),
                    described={**described, "dataset_root": str(self.images_dir),
                               "preset": plan.name})
                frozen = (self.engine.serve_stored({k: v.to_dict() for k, v in
                                                    opened.stored.items()})
                          if on_mismatch == "ignore" else [])
                if store.unsynced_reboot():
                    log.warning("%s: written without fsync before the last reboot; if the "
                                "machine crashed, run `diskcache-ocr verify` (or rebuild)",
                                cache_dir)
                if not readonly:
                    # (the pipeline recorded is the one the stored records were made by)
                    store.update_header(dataset_root=str(self.images_dir), preset=plan.name,
                                        **({} if frozen else described))
                if preload == "first-epoch":
                    # What is missing is built by the first epoch's reads, in parallel in the
                    # DataLoader's workers (building it here is serial, before the first
                    # batch); what exists is read ahead now.
                    if plan.preload and plan.warm:
                        store.warm()
                elif plan.preload if preload is None else preload:
                    self.preload()
            except CacheFullError as exc:
                # Nothing can be stamped or stored: serve computed samples, as a cache that
                # fills up while reading does.
                log.warning("%s: the disk is full; samples are computed, not cached (%s)",
                            cache_dir, exc)
                self.engine.store = None
            store.close()  # workers open their own; nothing stays open across a fork

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


def _map_params(config: MapConfig | None, convention: str, maps: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if maps is not None or convention != "db":
        raise CacheError("map_config is the reference DBNet maker's; with convention="
                         f"{convention!r} or your own maps, pass maps=... instead")
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _stage_plan(plan: CachePlan, pipeline: StagePipeline, split: str, allow: bool
                ) -> CachePlan:
    """The plan a stage pipeline can honour. A random transform never has its maps (or its
    whole output) cached: asking for that is refused as for the built-in pipeline. A random
    albumentations transform with a deterministic prefix caches the prefix's output as the
    ``tensors`` kind in place of the decoded image (it is what the image becomes next)."""
    if pipeline.deterministic:
        return plan
    if plan.caches("maps") or (plan.caches("tensors") and pipeline.split is None):
        _check_training_safety(False, plan.name, split, allow)
    cached = set(plan.cached) - {"maps"}
    if pipeline.split is not None and cached & {"images", "tensors"}:
        cached = (cached - {"images"}) | {"tensors"}
    elif pipeline.split is None:
        cached.discard("tensors")
    return dataclasses.replace(plan, cached=frozenset(cached))


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


__all__ = ["BatchBuffers", "CachedOCRDataset", "Polygons", "collate", "collate_fn",
           "default_cache_dir", "flat_polygons_bytes",
           "format_hit_rates", "polygons_bytes"]
