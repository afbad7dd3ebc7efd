"""Prebuild: fill a cache for a whole split, in parallel, resumable, across ranks.

Three entries: :func:`prebuild` builds the built-in pipeline from an images directory and an
annotation file; :func:`prebuild_dataset` builds exactly what a given dataset reads (its
pipeline, its plan, its cache: a user's own transform included); :func:`prebuild_hydra` builds
what a Hydra config's dataset node reads. None replaces records another pipeline wrote.
The parallel, resumable, rank-sharded work itself is :func:`~diskcache_ocr.build.build_engine`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diskcache_ocr import batchmem
from diskcache_ocr.build import (
    DEFAULT_CHUNK,
    BuildSummary,
    barrier,
    build_engine,
    dist_info,
    process_group_ready,
)
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.engine_setup import engine_of
from diskcache_ocr.errors import CacheError
from diskcache_ocr.hydra_app import DEFAULT_NODE, config_datasets
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.presets import Preset, cache_plan
from diskcache_ocr.readthrough import pipeline_role
from diskcache_ocr.store import CacheStore, Policy
from diskcache_ocr.store.wipe import has_cache


def prebuild(
    images_dir: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str],
    *,
    preset: str | Path | Mapping[str, Any] | Preset | None = "validation_optimized",
    workers: int = 1,
    split: str = "val",
    transform: TransformConfig | None = None,
    map_config: MapConfig | None = None,
    on_mismatch: Policy = "rebuild",
    progress: bool = True,
    chunk: int = DEFAULT_CHUNK,
    allow_random_tensor_cache: bool = False,
    dedicated: bool = False,
) -> BuildSummary:
    """Build every kind ``preset`` caches for every image; returns what happened.

    ``dedicated``: this process exists only to build (the command line does so). It then
    keeps freed heap memory between commits (fewer page faults per commit), and under
    torchrun (``WORLD_SIZE`` > 1) joins the process group (gloo) for the build and leaves it
    afterwards, so the ranks share the work.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if dedicated:
        batchmem.keep_freed_memory()
    joined = dedicated and _join_torchrun()
    try:
        return _build(images_dir, annotations, cache_dir, preset=preset, workers=workers,
                      split=split, transform=transform, map_config=map_config,
                      on_mismatch=on_mismatch, progress=progress, chunk=chunk,
                      allow_random_tensor_cache=allow_random_tensor_cache)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _join_torchrun() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo) if nobody did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _build(
    images_dir: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str],
    *,
    preset: str | Path | Mapping[str, Any] | Preset | None,
    workers: int,
    split: str,
    transform: TransformConfig | None,
    map_config: MapConfig | None,
    on_mismatch: Policy,
    progress: bool,
    chunk: int,
    allow_random_tensor_cache: bool,
) -> BuildSummary:
    rank, world = dist_info()
    started = time.perf_counter()

    def open_dataset(policy: Policy) -> CachedOCRDataset:
        return CachedOCRDataset(
            images_dir, annotations, cache_dir, preset=preset, split=split,
            transform=transform, map_config=map_config, on_mismatch=policy, preload=False,
            allow_random_tensor_cache=allow_random_tensor_cache,
            # A rebuildable cache may skip fsync per commit; one sync at the end, and the
            # header's build.clean marker says whether the last build finished.
            store_options={"sync": False},
        )

    # The first rank writing each cache directory checks and (re)stamps it; the others open
    # it after that (under a process group, ranks are grouped by the directory they write).
    first = rank == 0
    if world > 1 and process_group_ready():
        from diskcache_ocr.cluster import directory_nodes

        first = directory_nodes(cache_dir).leader
    if first:
        plan = cache_plan(preset)
        refuse_other_pipeline(cache_dir, plan.cached,
                              role=pipeline_role(images_dir, split, plan.output, "db"))
        ds = open_dataset(on_mismatch)
    barrier(world)
    if not first:
        ds = open_dataset("error")  # its directory's first rank rebuilt what had to be
    return build_engine(engine_of(ds), workers=workers, progress=progress, chunk=chunk,
                        started=started)


def refuse_other_pipeline(cache_dir: str | os.PathLike[str], kinds: Iterable[str], *,
                          role: str) -> None:
    """Raise :class:`CacheError` when the built-in pipeline's build in ``role`` would
    replace ``kinds`` records that a user's pipeline of the same role wrote into
    ``cache_dir`` (its header says whose they are). Pipelines of other roles keep their
    records beside it; another version of the built-in pipeline's own records is rebuilt as
    before; an emptied kind (``clear --kind``) is free."""
    from diskcache_ocr.ops import pipeline_of

    if not has_cache(cache_dir):
        return
    with CacheStore(cache_dir, readonly=True) as store:
        header = store.header()
        held = header.get("pipelines", {}).get(role) or {}
        taken = [k for k in ("tensors", "maps") if k in kinds and k in held.get("kinds", {})
                 and store.kind_stats(k)["entries"]]
    described = held.get("described") or {}
    header = {**header, **described, "kinds": held.get("kinds", {})}
    owner = pipeline_of(header)
    if not taken or owner["name"] != "user":
        return
    summary = owner.get("summary", {})
    convention = f"convention {owner['convention']}; " if owner.get("convention") else ""
    raise CacheError(
        f"{cache_dir}: its {' and '.join(taken)} were written by another pipeline "
        f"({convention}transform: {summary.get('transform')}; "
        f"preset {header.get('preset')}, images {header.get('dataset_root')}), not by the "
        "built-in pipeline this prebuild builds; nothing was changed. Prebuild that pipeline "
        "instead (`diskcache-ocr prebuild --config-dir DIR --config-name NAME`, or "
        "`prebuild_dataset(dataset)` in Python), give this build another --cache, or clear "
        f"those kinds first ({', '.join(f'`diskcache-ocr clear --kind {k}`' for k in taken)})")


def prebuild_dataset(dataset: Any, *, workers: int = 1, progress: bool = True,
                     chunk: int = DEFAULT_CHUNK) -> BuildSummary:
    """Build every kind ``dataset`` caches, for every image it reads: exactly the records its
    reads will look up (its pipeline, its plan, its cache directory), in ``workers``
    processes (fork), resumable: what is complete is skipped, a source that failed and has
    not changed is reported, not retried. Under torchrun (process group initialized), each
    rank builds its share.

    ``dataset`` is a :class:`~diskcache_ocr.dataset.CachedOCRDataset` (or its read-through
    engine). Its version check already ran when it was made, by its ``on_mismatch``: build a
    dataset opened with ``on_mismatch="rebuild"`` to replace records of another version.

    >>> ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
    ...                       convention="origin", transform=my_compose)   # doctest: +SKIP
    >>> prebuild_dataset(ds, workers=8).line()                             # doctest: +SKIP
    '40 built, 0 already cached, 0 failed, of 40 in 3.1 s (12.9 images/s, 8 workers)'
    """
    return build_engine(engine_of(dataset, "prebuild_dataset"), workers=workers,
                        progress=progress, chunk=chunk)


def prebuild_hydra(config_dir: str | os.PathLike[str], config_name: str,
                   overrides: Sequence[str] = (), *, nodes: Sequence[str] = (DEFAULT_NODE,),
                   workers: int = 1, rebuild: bool = False, progress: bool = True,
                   chunk: int = DEFAULT_CHUNK, cache_dir: str | os.PathLike[str] | None = None,
                   ) -> list[tuple[str, Path, BuildSummary]]:
    """Build what the dataset at each of ``nodes`` of a Hydra config reads, as the app's own
    run makes it (``config_dir``/``config_name`` with ``overrides``, e.g.
    ``data/performance_preset=validation_optimized``; see
    :func:`~diskcache_ocr.hydra_app.config_datasets`), by :func:`prebuild_dataset`.

    ``rebuild``: replace records of another version or pipeline in the dataset's cache
    (otherwise such records are an error that names them, and nothing is changed).
    ``cache_dir``: the cache of a dataset whose config names none. Returns (node, cache
    directory, summary) per node.
    """
    out = []
    with config_datasets(config_dir, config_name, overrides, nodes=nodes, cache_dir=cache_dir,
                         on_mismatch="rebuild" if rebuild else "error",
                         store_options={"sync": False}) as made:
        for node_path, ds in made:
            engine = engine_of(ds, "prebuild_hydra")
            if engine.store is None:
                raise CacheError(f"{node_path}: its preset {engine.plan.name!r} caches "
                                 "nothing: there is nothing to build (pick one that caches, "
                                 "e.g. data/performance_preset=validation_optimized)")
            where = engine.store.path
            out.append((node_path, where, build_engine(engine, workers=workers,
                                                       progress=progress, chunk=chunk)))
    return out


__all__ = ["DEFAULT_CHUNK", "BuildSummary", "dist_info", "prebuild", "prebuild_dataset",
           "prebuild_hydra", "refuse_other_pipeline"]
