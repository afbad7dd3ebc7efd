"""Every decision between a dataset's arguments and a ready read-through engine.

:class:`EngineOptions` holds what the user passed (frozen). :func:`choose` makes the
decisions that need no file: the preset's plan and its overrides (``load_maps``,
``output``), which pipeline (the built-in one, or stages of a convention and the user's own
transform and maps), the training-safety check of a random transform, the item keys and
the annotation rules. :func:`open_engine` makes those that need the cache: it opens the
store, checks the versions its header records (by ``on_mismatch``), stamps the header,
preloads, and closes the store again, so nothing stays open across a fork.

:func:`engine_from_header` makes the engine that recomputes what an existing cache holds, by
the pipeline its header records (``verify --recompute``); :func:`engine_of` is what the
loader, the build and the commands take: a dataset's engine, or an engine.

>>> options = EngineOptions(images_dir="data/images/val", preset="validation_optimized")
>>> choice = choose(options)                                   # doctest: +SKIP
>>> catalog = Catalog(load_annotations("data/images/val", "data/jsons/val.json",
...                                    choice.rules))          # doctest: +SKIP
>>> engine = open_engine(options, choice, catalog)             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diskcache_ocr.errors import CacheError, CacheFullError, TrainingSafetyError
from diskcache_ocr.ocr.conventions import annotation_rules, conventions
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import StagePipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig
from diskcache_ocr.paths import default_cache_dir
from diskcache_ocr.presets import CachePlan, Preset, cache_plan, load_preset
from diskcache_ocr.readthrough import ReadThrough, plain_versions
from diskcache_ocr.samples import Catalog
from diskcache_ocr.store import CacheStore, Policy

log = logging.getLogger("diskcache_ocr.dataset")

Output = Literal["float32", "compact"]


@dataclass(frozen=True)
class EngineOptions:
    """A dataset's arguments, as :class:`~diskcache_ocr.dataset.CachedOCRDataset` takes
    them (its docstring says what each means); ``images_dir`` names the split in messages."""

    images_dir: str | os.PathLike[str] = ""
    cache_dir: str | os.PathLike[str] | None = None
    preset: str | Path | Mapping[str, Any] | Preset | None = None
    split: str = "val"
    transform: Any = None
    map_config: MapConfig | None = None
    convention: str | None = None
    transform_version: Any = None
    maps: Any = None
    maps_version: Any = None
    item_keys: str | None = None
    load_maps: bool | None = None
    on_mismatch: Policy = "error"
    allow_random_tensor_cache: bool = False
    readonly: bool = False
    check_source: bool = True
    store_options: Mapping[str, Any] | None = None
    preload: bool | Literal["first-epoch"] | None = None
    output: Output | None = None


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided: the preset, the plan the pipeline honours, the
    pipeline, the output form, the item keys, and the rules the annotations load by."""

    preset: Preset
    plan: CachePlan
    pipeline: Pipeline | StagePipeline
    output: Output
    item_keys: str
    rules: str  # "db" or "origin": how the annotation file is read


def choose(options: EngineOptions) -> Choice:
    """The decisions that need no file (see the module's docstring); raises
    :class:`CacheError` for arguments that do not go together, ValueError for an unknown
    output form, :class:`TrainingSafetyError` for a random transform whose output the plan
    would cache."""
    o = options
    preset = load_preset(o.preset)
    plan = cache_plan(preset)
    if o.load_maps is not None:
        plan = dataclasses.replace(plan, return_maps=bool(o.load_maps))
    # "compact": samples hold the stored uint8 image and binary maps; finish_batch makes
    # a batch of them float32 later, where it is cheap (typically on the GPU).
    output = plan.output if o.output is None else o.output
    if output not in ("float32", "compact"):
        raise ValueError(f"output must be 'float32' or 'compact', got {output!r}")
    pipeline: Pipeline | StagePipeline
    if _staged(o):
        pipeline = StagePipeline(
            convention=o.convention or "db", transform=o.transform,
            transform_version=o.transform_version, maps=o.maps, maps_version=o.maps_version,
            map_params=_map_params(o.map_config, o.convention or "db", o.maps),
            compact=output == "compact")
        plan = _stage_plan(plan, pipeline, o.split, o.allow_random_tensor_cache)
        if output == "compact" and pipeline.tail is None:
            # Only an albumentations Compose ending in a Normalize the library reproduces
            # exactly has a form to finish later; any other transform's samples are what
            # it returns.
            log.info("%s: output='compact' needs an albumentations Compose ending in "
                     "A.Normalize; samples are what your transform returns", o.images_dir)
            output = "float32"
    else:
        if o.transform_version is not None or o.maps_version is not None:
            raise CacheError("transform_version/maps_version are for a transform or maps "
                             "callable you pass")
        transform = o.transform
        if transform is None:
            transform = TRAINING if o.split == "train" else VALIDATION
        pipeline = Pipeline(transform=transform, maps=o.map_config or MapConfig())
        _check_training_safety(plan.safe_for_training or pipeline.is_deterministic(),
                               plan.name, o.split, o.allow_random_tensor_cache, stacklevel=4)
    item_keys = o.item_keys or (o.convention if o.convention == "origin" else "db")
    if item_keys not in ("db", "origin"):
        raise CacheError(f"item_keys must be 'db' or 'origin', got {item_keys!r}")
    return Choice(preset=preset, plan=plan, pipeline=pipeline, output=output,
                  item_keys=item_keys, rules=annotation_rules(o.convention))


def _staged(o: EngineOptions) -> bool:
    """Whether the arguments ask for stages (a convention other than "db", the user's own
    maps or transform) rather than the built-in pipeline."""
    staged = (o.convention not in (None, "db") or o.maps is not None
              or not (o.transform is None or isinstance(o.transform, TransformConfig)))
    if staged and isinstance(o.transform, TransformConfig):
        raise CacheError(f"{o.images_dir}: a TransformConfig is the built-in transform of the "
                         f"'db' convention; with convention={o.convention!r} leave transform "
                         "out (the convention's own) or pass your own transform")
    return staged


def open_engine(options: EngineOptions, choice: Choice, catalog: Catalog) -> ReadThrough:
    """The engine that reads ``catalog`` by ``choice``, through the cache when its plan
    caches anything: the store is opened (the first time, made), its versions checked by
    ``on_mismatch``, the header stamped with the pipeline (unless read-only), what the
    preset preloads built, and the store closed again (each process that reads opens its
    own). A full disk leaves an engine without a cache: samples are computed."""
    o, plan, pipeline = options, choice.plan, choice.pipeline
    store = None
    cache_dir = o.cache_dir
    if plan.caches_anything:
        if cache_dir is None:
            cache_dir = default_cache_dir()
        # NOTE: read-through commits skip fsync (a killed process loses nothing; the
        # header's boot id flags an OS crash since); one fsync at close.
        store_options = {"readahead": plan.warm, "sync": False, **(o.store_options or {})}
        store = CacheStore(cache_dir, readonly=o.readonly, **store_options)
    engine = ReadThrough(catalog, pipeline, plan, store, check_source=o.check_source,
                         item_keys=choice.item_keys)
    if store is None:
        return engine
    try:
        _stamp(engine, store, o, choice, cache_dir)
        if o.preload == "first-epoch":
            # What is missing is built by the first epoch's reads, in parallel in the
            # DataLoader's workers (building it here is serial, before the first batch);
            # what exists is read ahead now.
            if plan.preload and plan.warm:
                store.warm()
        elif plan.preload if o.preload is None else o.preload:
            preload(engine)
    except CacheFullError as exc:
        # Nothing can be stamped or stored: serve computed samples, as a cache that fills
        # up while reading does.
        log.warning("%s: the disk is full; samples are computed, not cached (%s)",
                    cache_dir, exc)
        engine.store = None
    store.close()  # workers open their own; nothing stays open across a fork
    return engine


def _stamp(engine: ReadThrough, store: CacheStore, o: EngineOptions, choice: Choice,
           cache_dir: str | os.PathLike[str] | None) -> None:
    """Check the versions of this pipeline's role against the header (by
    ``on_mismatch``) and record the pipeline there. Each role (images directory, split,
    output form, convention) holds its own pipeline's records: a mismatch rebuilds (or
    refuses) this role's only."""
    images_dir = str(engine.catalog.images_dir)
    described = {**describe(choice.pipeline), "dataset_root": images_dir,
                 "preset": choice.plan.name}
    opened = store.open_pipeline(engine.role(o.split, choice.output), engine.kind_versions(),
                                 o.on_mismatch, plain=plain_versions(), described=described)
    frozen = (engine.serve_stored({k: v.to_dict() for k, v in opened.stored.items()})
              if o.on_mismatch == "ignore" else [])
    if store.unsynced_reboot():
        log.warning("%s: written without fsync before the last reboot; if the machine "
                    "crashed, run `diskcache-ocr verify` (or rebuild)", cache_dir)
    if not o.readonly:
        # (the pipeline recorded is the one the stored records were made by)
        store.update_header(**({"dataset_root": images_dir, "preset": choice.plan.name}
                               if frozen else described))


def describe(pipeline: Pipeline | StagePipeline) -> dict[str, Any]:
    """What a cache's header records of the pipeline that writes it (plain data)."""
    if isinstance(pipeline, StagePipeline):
        return {"stage_pipeline": pipeline.describe()}
    return {"stage_pipeline": None,
            "pipeline": {"transform": pipeline.transform.to_dict(),
                         "maps": pipeline.maps.to_dict()}}


def preload(engine: ReadThrough, batch_size: int = 8) -> None:
    """Build whatever is missing for every item of ``engine``, ``batch_size`` at a time,
    then warm the page cache (when the plan says so). A full disk stops it with a
    warning: what is not cached is computed on read."""
    todo, _failed = engine.missing(range(len(engine.catalog)))
    try:
        for start in range(0, len(todo), batch_size):
            engine.build(todo[start:start + batch_size])
    except CacheFullError as exc:
        # As without preload: what is not cached is computed on read (and cached later,
        # once there is room).
        log.warning("preload stopped, the disk is full: samples not cached are computed "
                    "on read (%s)", exc)
        return
    if engine.store is not None and engine.plan.warm:
        engine.store.warm()


def engine_from_header(header: Mapping[str, Any], catalog: Catalog, *,
                       where: str | os.PathLike[str]) -> ReadThrough:
    """An engine that recomputes ``catalog``'s records by the pipeline that wrote the cache
    at ``where``, as its ``header`` records it; it reads and writes no cache (its
    ``recompute`` is what ``verify --recompute`` compares with). The built-in pipeline, or
    a convention's own stages, are made again from the header; a pipeline with a transform
    or maps of the user's cannot be: that is a :class:`CacheError` saying how to recompute
    through its dataset instead."""
    return ReadThrough(catalog, header_pipeline(header, where=where), cache_plan("none"), None)


def header_pipeline(header: Mapping[str, Any], *, where: str | os.PathLike[str] = "the cache"
                    ) -> Pipeline | StagePipeline:
    """The pipeline a cache's header records: the built-in one with its parameters (the
    default one where the header records none), or a convention's own stages when the
    header's description is exactly theirs. Anything else (a user's transform or maps) is
    a :class:`CacheError`: only that pipeline's dataset can recompute its records."""
    stage = header.get("stage_pipeline")
    if stage:
        convention = stage.get("convention") if isinstance(stage, Mapping) else None
        if convention in conventions():
            for compact in (False, True):  # (a compact output caches the Normalize's input)
                candidate = StagePipeline(convention=convention, compact=compact)
                if _plain(candidate.describe()) == _plain(stage):
                    return candidate
        raise CacheError(f"{where}: built by a user pipeline (convention/transform/maps "
                         "stages) that the header alone cannot rebuild; recompute through its "
                         "dataset: `verify --recompute N --config-name NAME` from its Hydra "
                         "tree, or `ops.verify(cache, recompute=N, dataset=ds)` (verify "
                         "without --recompute checks every record)")
    return Pipeline.from_params(header.get("pipeline") or {})


def _plain(value: Any) -> Any:
    """``value`` as a header holds it (tuples become lists), to compare descriptions."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def engine_of(source: Any, taker: str = "this") -> ReadThrough:
    """The read-through engine ``source`` reads by: a dataset's ``engine``, or ``source``
    itself when it is one. TypeError (naming ``taker``, what wanted it) for anything else."""
    engine = source if isinstance(source, ReadThrough) else getattr(source, "engine", None)
    if not isinstance(engine, ReadThrough):
        raise TypeError(f"{taker} takes a CachedOCRDataset or its engine (a ReadThrough), "
                        f"got {type(source).__name__}")
    return engine


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
        _check_training_safety(False, plan.name, split, allow, stacklevel=5)
    cached = set(plan.cached) - {"maps"}
    if pipeline.split is not None and cached & {"images", "tensors"}:
        cached = (cached - {"images"}) | {"tensors"}
    elif pipeline.split is None:
        cached.discard("tensors")
    return dataclasses.replace(plan, cached=frozenset(cached))


def _check_training_safety(safe: bool, preset: str, split: str, allow: bool, *,
                           stacklevel: int) -> None:
    """Refuse (or, allowed, warn at the dataset's caller: ``stacklevel``) a plan that
    caches a random transform's output."""
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
    warnings.warn(message, stacklevel=stacklevel)


__all__ = ["Choice", "EngineOptions", "choose", "describe", "engine_from_header", "engine_of",
           "header_pipeline", "open_engine", "preload"]

