"""Build every record an engine caches: in parallel (fork), resumable, across ranks.

The work behind :func:`~diskcache_ocr.prebuild.prebuild` and
:func:`~diskcache_ocr.prebuild.prebuild_dataset`, on a read-through engine of any pipeline.
Work is split into small chunks handed to N processes (fork); each process computes and writes
its own chunks (LMDB serializes writers), so the build is compute-bound. Every chunk commits
atomically: after a kill at any moment the next run skips what is complete. Under
``torchrun`` (a process group of several ranks), every image is computed once in the job and
every cache directory ends complete (see :mod:`diskcache_ocr.cluster`); each directory's first
rank marks the build unfinished in the header first and, last, records what the directory
holds of the split (``status`` and ``health`` read it).

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

import numpy as np
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
    # Across nodes (see diskcache_ocr.cluster): images whose records this rank received from
    # another node and wrote (and those records), the cache directories of the job (nodes),
    # this rank's node (node_index), and every rank's {rank, node_index, built, received, ...}.
    received: int = 0
    received_records: int = 0
    nodes: int = 1
    node_index: int = 0
    ranks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = [{"source": s, "reason": r} for s, r in self.failed]
        return d

    def line(self) -> str:
        rate = self.built / self.seconds if self.seconds else 0.0
        share = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        if self.nodes > 1:
            share = f"node {self.node_index}/{self.nodes}, {share}"
        got = f", {self.received} received from other nodes" if self.nodes > 1 else ""
        return (f"{share}{self.built} built{got}, {self.skipped} already cached, "
                f"{len(self.failed)} failed, of {self.total} in {self.seconds:.1f} s "
                f"({rate:.1f} images/s, {self.workers} workers)")


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch always ships it
        pass
    return 0, 1


def process_group_ready() -> bool:
    """Whether torch.distributed's default process group is up (torchrun, DDP)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return False
    return dist.is_available() and dist.is_initialized()


MISSING_NAMED = 5  # missing sources the header names (the count is always there)


def mark_started(store: Any, engine: Any, world: int, nodes: int = 1) -> None:
    """Note in the header that a build of ``world`` ranks on ``nodes`` cache directories
    began for a split of ``len(engine.catalog)`` images; :func:`mark_finished` closes it."""
    _record(store, engine, {"clean": False, "started": time.time(), "world_size": world,
                            "nodes": nodes, "images": len(engine.catalog)})


def _record(store: Any, engine: Any, build: dict[str, Any], **changes: Any) -> None:
    """The header's ``build`` (the last build) and ``builds`` (the last build of each images
    directory: train and val sharing one cache each keep their own)."""
    builds = dict(store.header().get("builds") or {})
    builds[str(engine.catalog.images_dir)] = build
    store.update_header(build=build, builds=builds, **changes)


def mark_finished(store: Any, engine: Any, world: int, nodes: int = 1) -> int:
    """Record in the header that the build ended, with what this directory holds of the
    split: how many of its images lack a record (``missing``, a few of them named), so
    that ``status`` and ``health`` can tell a complete cache from a part of one. Syncs
    first: no unsynced writes are outstanding after it. Returns the missing count."""
    store.sync()
    store.refresh()  # (see every write committed so far, by any process)
    todo, failed = engine.missing(range(len(engine.catalog)))
    _record(store, engine, {
        "clean": True, "finished": time.time(), "world_size": world, "nodes": nodes,
        "images": len(engine.catalog), "missing": len(todo), "failed": len(failed),
        "missing_some": [engine.catalog.source(i) for i in todo[:MISSING_NAMED]],
    }, unsynced_boot=None)
    store.sync()
    return len(todo)


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
    if world > 1 and process_group_ready():
        return _build_across_nodes(engine, workers=workers, progress=progress, chunk=chunk,
                                   started=started)
    if rank == 0:
        mark_started(store, engine, world)
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
    # (Without a process group, a rank knows only its own directory: each records what it
    # holds; rank 0 alone marked the start.)
    mark_finished(store, engine, world)
    store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _build_across_nodes(engine: Any, *, workers: int, progress: bool, chunk: int,
                        started: float) -> BuildSummary:
    """:func:`build_engine` under a process group of several ranks (collective: every rank
    calls it). Ranks writing one directory form a node (:mod:`diskcache_ocr.cluster`); what
    no node holds is computed once, split over every rank; each node is sent what it lacks
    and another holds; each node builds what it still lacks (a source that failed
    elsewhere); each node's first rank records the end in its header."""
    import torch.distributed as dist

    from diskcache_ocr import cluster

    store = engine.store
    nodes = cluster.directory_nodes(store.path)
    rank, world = nodes.rank, nodes.world_size
    cluster.check_same_split(engine, nodes)
    n_nodes = len(nodes.groups)
    if nodes.leader:
        mark_started(store, engine, world, n_nodes)
    dist.barrier()

    states = cluster.node_states(engine, nodes)
    nobody = np.flatnonzero((states == cluster.MISSING).all(axis=0))
    share = [int(i) for i in nobody[rank::world]]
    held_here = int((states[nodes.node] != cluster.MISSING).sum())
    summary = BuildSummary(total=len(share), workers=workers, rank=rank, world_size=world,
                           nodes=n_nodes, node_index=nodes.node,
                           skipped=held_here if nodes.leader else 0)
    # One bar per node (its first rank's): the node's images, held, built or received.
    bar = tqdm(total=len(engine.catalog), initial=held_here, unit="img",
               desc=f"prebuild node {nodes.node}", disable=not (progress and nodes.leader),
               file=sys.stderr, dynamic_ncols=True)

    def arrived(images: int, records: int) -> None:
        summary.received += images
        summary.received_records += records
        bar.update(images)

    try:
        done: list[tuple[int, bool]] = []
        _build_some(engine, share, workers, chunk, summary, bar, done)
        store.sync()
        # Each image computed now is held (or failed) by its builder's node.
        for r, rows in enumerate(cluster.gather(done, world)):
            k = next(g for g, rs in enumerate(nodes.groups) if r in rs)
            for i, ok in rows:
                states[k, i] = cluster.HELD if ok else cluster.FAILED
        cluster.exchange(engine, nodes, cluster.transfer_plan(states, nodes.groups, rank),
                         arrived)
        dist.barrier()
        # What this node still lacks, built by its own ranks.
        left = cluster.gather(cluster.directory_states(engine).tobytes() if nodes.leader
                              else None, world)
        here = np.frombuffer(left[nodes.mine[0]], np.uint8, count=len(engine.catalog))
        todo = [int(i) for i in np.flatnonzero(here == cluster.MISSING)]
        rest = todo[nodes.mine.index(rank)::len(nodes.mine)]
        summary.total += len(rest)
        _build_some(engine, rest, workers, chunk, summary, bar, [])
        store.sync()
    finally:
        bar.close()
    dist.barrier()
    if nodes.leader:
        mark_finished(store, engine, world, n_nodes)
    store.close()
    summary.seconds = time.perf_counter() - started
    summary.ranks = [
        {"rank": d["rank"], "node_index": d["node_index"], "built": d["built"],
         "received": d["received"], "received_records": d["received_records"],
         "failed": len(d["failed"])}
        for d in cluster.gather(summary.to_dict(), world)]
    dist.barrier()
    return summary


def _build_some(engine: Any, indices: Sequence[int], workers: int, chunk: int,
                summary: BuildSummary, bar: Any, done: list[tuple[int, bool]]) -> None:
    """Build ``indices`` in this rank's directory (skipping what it holds), into
    ``summary``; ``done`` gets (index, ok) of each image built."""
    todo, known_failed = engine.missing(indices)
    summary.failed += [(s, r.removeprefix("failed: ")) for s, r in known_failed]
    by_source = {engine.catalog.source(i): i for i in todo}
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    for rows, write_s in _run_chunks(engine, chunks, workers):
        summary.write_seconds += write_s
        for source, error, _computed in rows:
            done.append((by_source[source], error is None))
            if error is None:
                summary.built += 1
            else:
                summary.failed.append((source, error))
        bar.update(len(rows))


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


__all__ = ["DEFAULT_CHUNK", "BuildSummary", "barrier", "build_engine", "dist_info",
           "mark_finished", "mark_started", "process_group_ready"]
