"""Prebuild: fill a cache for a whole split, in parallel, resumable, across ranks.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from diskcache_ocr import batchmem
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.presets import Preset
from diskcache_ocr.store import Policy

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


# The dataset each pool worker uses, inherited through fork (never pickled per task).
_worker_dataset: CachedOCRDataset | None = None


def _init_worker() -> None:
    # NOTE: a forked child must not enter an OpenMP parallel region the parent started
    # (it hangs); one intra-op thread per worker is also what a process pool wants.
    import torch

    from diskcache_ocr.batchmem import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # (a process of our own that only builds: keep freed heap memory)


def _build_chunk(chunk: Sequence[int]) -> tuple[list[tuple[str, str | None, bool]], float]:
    ds = _worker_dataset
    assert ds is not None
    before = ds.write_seconds
    rows = ds.build(chunk)
    return rows, ds.write_seconds - before


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
        ds = open_dataset(on_mismatch)
    _barrier(world)
    if rank != 0:
        ds = open_dataset("error")  # rank 0 already rebuilt what had to be rebuilt
    store = ds.store
    if store is None:
        raise ValueError(f"preset {ds.plan.name!r} caches nothing: there is nothing to build")
    if rank == 0:
        store.update_header(build={"clean": False, "started": time.time(), "world_size": world})
    _barrier(world)

    share = list(range(rank, len(ds), world))
    todo, known_failed = ds.missing(share)
    # An index status reads "failed: <reason>"; report the reason as a fresh failure does.
    summary = BuildSummary(total=len(share), skipped=len(share) - len(todo) - len(known_failed),
                           failed=[(s, r.removeprefix("failed: ")) for s, r in known_failed],
                           workers=workers, rank=rank, world_size=world)
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    bar = tqdm(total=len(todo), unit="img", desc=f"prebuild{f' rank {rank}' if world > 1 else ''}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for rows, write_s in _run_chunks(ds, chunks, workers):
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


def _run_chunks(ds: CachedOCRDataset, chunks: list[list[int]], workers: int
                ) -> Iterator[tuple[list[tuple[str, str | None, bool]], float]]:
    global _worker_dataset
    _worker_dataset = ds
    try:
        if workers == 1 or len(chunks) <= 1:
            for c in chunks:
                yield _build_chunk(c)
            return
        assert ds.store is not None
        ds.store.close()  # (also done by the fork hook) the children open their own
        with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            yield from pool.imap_unordered(_build_chunk, chunks)
    finally:
        _worker_dataset = None
