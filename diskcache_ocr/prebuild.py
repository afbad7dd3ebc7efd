"""Prebuild: fill a cache for a whole split, in parallel, resumable, across ranks.

Three entries: :func:`prebuild` builds the built-in pipeline from an images directory and an
annotation file; :func:`prebuild_dataset` builds exactly what a given dataset reads (its
pipeline, its plan, its cache: a user's own transform included); :func:`prebuild_hydra` builds
what a Hydra config's dataset node reads. None replaces records another pipeline wrote.

Work is split into small chunks handed to N processes (fork); each process computes and
writes its own chunks (LMDB serializes writers), so the build is compute-bound. Every chunk
commits atomically: after a kill at any moment the next run skips what is complete.
Under ``torchrun``, each rank builds every ``world_size``-th image; rank 0 stamps the header
first and marks the build clean last, with barriers between.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from diskcache_ocr import batchmem
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.hydra_app import DEFAULT_NODE, config_datasets
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.presets import Preset, cache_plan
from diskcache_ocr.readthrough import ReadThrough
from diskcache_ocr.store import CacheStore, Policy
from diskcache_ocr.store.wipe import has_cache

DEFAULT_CHUNK = 4


@dataclass
class BuildSummary:
    total: int = 0  # images in this rank's share
    built: int = 0
    skipped: int = 0  # already complete
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    write_seconds: float = 0.0  # summed over processes
    workers: int = 1
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = [{"source": s, "reason": r} for s, r in self.failed]
        return d

    def line(self) -> str:
        rate = self.built / self.seconds if self.seconds else 0.0
        share = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        return (f"{share}{self.built} built, {self.skipped} already cached, {len(self.failed)} "
                f"failed, of {self.total} in {self.seconds:.1f} s ({rate:.1f} images/s, "
                f"{self.workers} workers)")


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch always ships it
        pass
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# The engine each pool worker uses, inherited through fork (never pickled per task).
_worker_engine: ReadThrough | None = None


def _init_worker() -> None:
    # NOTE: a forked child must not enter an OpenMP parallel region the parent started
    # (it hangs); one intra-op thread per worker is also what a process pool wants.
    import torch

    from diskcache_ocr.batchmem import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # (a process of our own that only builds: keep freed heap memory)


def _build_chunk(chunk: Sequence[int]) -> tuple[list[tuple[str, str | None, bool]], float]:
    engine = _worker_engine
    assert engine is not None
    before = engine.write_seconds
    rows = [tuple(r) for r in engine.build(chunk)]
    return rows, engine.write_seconds - before  # type: ignore[return-value]


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

    if rank == 0:
        refuse_other_pipeline(cache_dir, cache_plan(preset).cached)
        ds = open_dataset(on_mismatch)
    _barrier(world)
    if rank != 0:
        ds = open_dataset("error")  # rank 0 already rebuilt what had to be rebuilt
    return _build_engine(ds.engine, workers=workers, progress=progress, chunk=chunk,
                         rank=rank, world=world, started=started)


def refuse_other_pipeline(cache_dir: str | os.PathLike[str], kinds: Iterable[str]) -> None:
    """Raise :class:`CacheError` when the built-in pipeline's build would replace ``kinds``
    records that a user's pipeline wrote into ``cache_dir`` (its header says whose they
    are). Another version of the built-in pipeline's own records is rebuilt as before; an
    emptied kind (``clear --kind``) is free."""
    from diskcache_ocr.ops import pipeline_of

    if not has_cache(cache_dir):
        return
    with CacheStore(cache_dir, readonly=True) as store:
        header = store.header()
        taken = [k for k in ("tensors", "maps") if k in kinds and k in header.get("kinds", {})
                 and store.kind_stats(k)["entries"]]
    owner = pipeline_of(header)
    if not taken or owner["name"] != "user":
        return
    summary = owner.get("summary", {})
    raise CacheError(
        f"{cache_dir}: its {' and '.join(taken)} were written by another pipeline "
        f"(convention {owner.get('convention')}; transform: {summary.get('transform')}; "
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
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    engine = getattr(dataset, "engine", dataset)
    if not isinstance(engine, ReadThrough):
        raise TypeError(f"prebuild_dataset takes a CachedOCRDataset (or its engine), got "
                        f"{type(dataset).__name__}")
    rank, world = dist_info()
    return _build_engine(engine, workers=workers, progress=progress, chunk=chunk, rank=rank,
                         world=world, started=time.perf_counter())


def _build_engine(engine: ReadThrough, *, workers: int, progress: bool, chunk: int,
                  rank: int, world: int, started: float) -> BuildSummary:
    """Build this rank's share of what ``engine`` caches; rank 0 marks the build in the
    header (unfinished first, clean last), with barriers between."""
    store = engine.store
    if store is None:
        raise ValueError(f"preset {engine.plan.name!r} caches nothing: there is nothing to "
                         "build")
    if store.readonly:
        raise CacheError(f"{store.path}: the dataset opened its cache read-only; nothing can "
                         "be built")
    if rank == 0:
        store.update_header(build={"clean": False, "started": time.time(), "world_size": world})
    _barrier(world)

    share = list(range(rank, len(engine.catalog), world))
    todo, known_failed = engine.missing(share)
    # An index status reads "failed: <reason>"; report the reason as a fresh failure does.
    summary = BuildSummary(total=len(share), skipped=len(share) - len(todo) - len(known_failed),
                           failed=[(s, r.removeprefix("failed: ")) for s, r in known_failed],
                           workers=workers, rank=rank, world_size=world)
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    bar = tqdm(total=len(todo), unit="img", desc=f"prebuild{f' rank {rank}' if world > 1 else ''}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for rows, write_s in _run_chunks(engine, chunks, workers):
            summary.write_seconds += write_s
            for source, error, _computed in rows:
                if error is None:
                    summary.built += 1
                else:
                    summary.failed.append((source, error))
            bar.update(len(rows))
    finally:
        bar.close()
    store.sync()
    _barrier(world)
    if rank == 0:
        # Everything is on disk now (synced above): no unsynced writes are outstanding.
        store.update_header(build={"clean": True, "finished": time.time(), "world_size": world},
                            unsynced_boot=None)
        store.sync()
    store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _run_chunks(engine: ReadThrough, chunks: list[list[int]], workers: int
                ) -> Iterator[tuple[list[tuple[str, str | None, bool]], float]]:
    global _worker_engine
    _worker_engine = engine
    try:
        if workers == 1 or len(chunks) <= 1:
            for c in chunks:
                yield _build_chunk(c)
            return
        assert engine.store is not None
        engine.store.close()  # (also done by the fork hook) the children open their own
        with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            yield from pool.imap_unordered(_build_chunk, chunks)
    finally:
        _worker_engine = None


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
            if ds.store is None:
                raise CacheError(f"{node_path}: its preset {ds.plan.name!r} caches nothing: "
                                 "there is nothing to build (pick one that caches, e.g. "
                                 "data/performance_preset=validation_optimized)")
            where = ds.store.path
            out.append((node_path, where, prebuild_dataset(ds, workers=workers,
                                                           progress=progress, chunk=chunk)))
    return out
