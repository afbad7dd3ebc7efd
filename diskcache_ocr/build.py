"""Build every record an engine caches: in parallel (fork), resumable, across ranks.

The work behind :func:`~diskcache_ocr.prebuild.prebuild` and
:func:`~diskcache_ocr.prebuild.prebuild_dataset`, on a read-through engine of any pipeline.
Work is split into small chunks handed to N processes (fork); each process computes and writes
its own chunks (LMDB serializes writers), so the build is compute-bound. Every chunk commits
atomically: after a kill at any moment the next run skips what is complete. Under
``torchrun``, each rank builds every ``world_size``-th image; rank 0 marks the build unfinished
in the header first and clean last, with barriers between.

The engine is taken as it is (its ``catalog``, ``store``, ``plan``, ``missing``, ``build``,
``write_seconds``): this module sits below the dataset, which builds through it.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from diskcache_ocr.errors import CacheError

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


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# The engine each pool worker uses, inherited through fork (never pickled per task).
_worker_engine: Any = None


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


def build_engine(engine: Any, *, workers: int = 1, progress: bool = True,
                 chunk: int = DEFAULT_CHUNK, started: float | None = None) -> BuildSummary:
    """Build this rank's share of every kind ``engine`` (a
    :class:`~diskcache_ocr.readthrough.ReadThrough`) caches, for every image of its catalog;
    what is complete is skipped, a source that failed and has not changed is reported, not
    retried. Raises ValueError when the engine caches nothing."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rank, world = dist_info()
    started = time.perf_counter() if started is None else started
    store = engine.store
    if store is None:
        raise ValueError(f"preset {engine.plan.name!r} caches nothing: there is nothing to "
                         "build")
    if store.readonly:
        raise CacheError(f"{store.path}: the dataset opened its cache read-only; nothing can "
                         "be built")
    if rank == 0:
        store.update_header(build={"clean": False, "started": time.time(), "world_size": world})
    barrier(world)

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
    barrier(world)
    if rank == 0:
        # Everything is on disk now (synced above): no unsynced writes are outstanding.
        store.update_header(build={"clean": True, "finished": time.time(), "world_size": world},
                            unsynced_boot=None)
        store.sync()
    store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _run_chunks(engine: Any, chunks: list[list[int]], workers: int
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


__all__ = ["DEFAULT_CHUNK", "BuildSummary", "barrier", "build_engine", "dist_info"]
