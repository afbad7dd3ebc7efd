"""Beyond one machine: a build's completeness in the header (status and health know a
partial cache), and prebuild across nodes on torch.distributed (each image computed once in
the job, every node's cache complete; two simulated nodes on localhost)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import run_cli, snapshot

from diskcache_ocr import ops
from diskcache_ocr.cluster import pack_chunk, transfer_plan, write_chunk
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheFormatError
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.store import KINDS, CacheStore
from diskcache_ocr.synth import split_paths

N = 16
prebuild_mod = importlib.import_module("diskcache_ocr.prebuild")
build_mod = importlib.import_module("diskcache_ocr.build")


@pytest.fixture(scope="module")
def data(synth_data) -> Path:
    return synth_data(N, 23, min_words=2, max_words=6, size=(160, 224))


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> dict:
    """The one-process build's content (every test compares with it)."""
    cache = tmp_path_factory.mktemp("single") / "cache"
    prebuild(*split_paths(data), cache, workers=1, progress=False)
    return snapshot(cache)


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    """This process builds as rank ``rank`` of ``world`` without a process group: its own
    share only, as a rank of a job that never exchanged anything."""
    for module in (prebuild_mod, build_mod):
        monkeypatch.setattr(module, "barrier", lambda world: None)
        monkeypatch.setattr(module, "dist_info", lambda: (rank, world))


def _codes(report: dict) -> dict[str, str]:
    return {p["code"]: p["detail"] for p in report["problems"]}


# -- 1. completeness is known ------------------------------------------------------------------
def test_a_killed_build_is_incomplete_until_rerun(data, tmp_path, monkeypatch, capsys):
    images, annotations = split_paths(data)
    cache = tmp_path / "cache"
    real = build_mod._run_chunks

    def killed(engine, chunks, workers):
        for n, out in enumerate(real(engine, chunks, workers)):
            if n == 1:
                raise KeyboardInterrupt  # (the build stops as a kill stops it: midway)
            yield out

    monkeypatch.setattr(build_mod, "_run_chunks", killed)
    with pytest.raises(KeyboardInterrupt):
        prebuild(images, annotations, cache, workers=1, progress=False, chunk=4)
    monkeypatch.undo()

    found = _codes(ops.health(cache))
    assert "did not finish" in found["incomplete_build"]
    assert "prebuild" in found["incomplete_build"]
    done = ops.status(cache)["completeness"]
    assert (done["finished"], done["complete"], done["images"]) == (False, False, N)
    rc, out, _ = run_cli(capsys, "health", "--cache", cache, "--json")
    assert rc == 1 and "incomplete_build" in {p["code"] for p in json.loads(out)["problems"]}

    prebuild(images, annotations, cache, workers=1, progress=False)
    assert "incomplete_build" not in _codes(ops.health(cache))
    done = ops.status(cache)["completeness"]
    assert (done["finished"], done["complete"], done["missing"]) == (True, True, 0)
    rc, out, _ = run_cli(capsys, "status", "--cache", cache)
    assert rc == 0 and f"complete ({N} images of its split)" in out


def test_a_ranks_share_alone_is_never_called_healthy(data, tmp_path, monkeypatch, capsys):
    images, annotations = split_paths(data)
    cache = tmp_path / "cache"
    _as_rank(monkeypatch, 0, 2)
    summary = prebuild(images, annotations, cache, workers=1, progress=False)
    assert summary.built == N // 2
    monkeypatch.undo()

    report = ops.health(cache)
    assert report["ok"] is False
    detail = _codes(report)["incomplete_build"]
    assert f"{N // 2} of {N} images" in detail and "2 ranks" in detail
    ds = CachedOCRDataset(images, annotations, None)
    assert ds.source(1) in detail  # (a missing one is named)
    rc, out, _ = run_cli(capsys, "status", "--cache", cache, "--json")
    done = json.loads(out)["completeness"]
    assert (done["complete"], done["missing"], done["world_size"]) == (False, N // 2, 2)
    rc, out, _ = run_cli(capsys, "status", "--cache", cache)
    assert f"INCOMPLETE: {N // 2} of {N}" in out

    # The other share, built later into the same directory, completes it.
    _as_rank(monkeypatch, 1, 2)
    prebuild(images, annotations, cache, workers=1, progress=False)
    monkeypatch.undo()
    assert ops.status(cache)["completeness"]["complete"] is True
    assert "incomplete_build" not in _codes(ops.health(cache))


def test_a_cache_without_a_prebuild_has_no_completeness_finding(data, tmp_path):
    images, annotations = split_paths(data)
    ds = CachedOCRDataset(images, annotations, tmp_path / "cache", preset="validation_optimized",
                          preload=False)
    ds[0]
    ds.store.close()
    assert ops.status(tmp_path / "cache")["completeness"] is None
    assert "incomplete_build" not in _codes(ops.health(tmp_path / "cache"))


# -- 2. the transfer, piece by piece --------------------------------------------------------
def test_transfer_plan_sends_each_missing_image_once_from_a_holder():
    HELD, MISSING = 1, 0
    states = np.array([[HELD, MISSING, HELD, MISSING],
                       [MISSING, HELD, HELD, MISSING],
                       [MISSING, MISSING, MISSING, MISSING]], np.uint8)
    groups = [(0, 1), (2,), (3, 4)]
    plan = transfer_plan(states, groups)
    got = sorted((src, dst, i) for (src, dst), items in plan.items() for i in items)
    per_image: dict[tuple[int, int], int] = {}
    for src, dst, i in got:
        receiver = next(k for k, rs in enumerate(groups) if dst in rs)
        sender = next(k for k, rs in enumerate(groups) if src in rs)
        assert states[sender, i] == HELD and states[receiver, i] == MISSING
        per_image[(receiver, i)] = per_image.get((receiver, i), 0) + 1
    # every (node, image) it lacks and some node holds, once; image 3 nobody holds
    assert per_image == {(1, 0): 1, (0, 1): 1, (2, 0): 1, (2, 1): 1, (2, 2): 1}
    # image 2 is held by nodes 0 and 1: its sender is one of their ranks (0, 1, 2), by its
    # position (the third of them), and node 2's receiver the first of (3, 4)
    assert plan[(2, 3)] == [2]
    # each rank's own part is the full plan's pairs it takes part in
    for rank in range(5):
        assert transfer_plan(states, groups, rank) == {
            pair: items for pair, items in plan.items() if rank in pair}


def test_transfer_plan_spreads_a_large_split_over_senders_and_receivers():
    rng = np.random.default_rng(0)
    states = rng.choice(np.array([0, 1, 2], np.uint8), size=(6, 3000), p=[0.5, 0.4, 0.1])
    groups = [(0,), (1, 2), (3, 4, 5), (6,), (7, 8), (9,)]
    plan = transfer_plan(states, groups)
    node_of = {r: k for k, rs in enumerate(groups) for r in rs}
    seen = set()
    for (src, dst), items in plan.items():
        for i in items:
            assert states[node_of[src], i] == 1 and states[node_of[dst], i] == 0
            assert (node_of[dst], i) not in seen
            seen.add((node_of[dst], i))
    held = (states == 1).any(axis=0)
    assert seen == {(k, i) for k in range(6) for i in range(3000)
                    if states[k, i] == 0 and held[i]}
    senders = {src for src, _ in plan}
    assert senders == set(range(10))  # every rank of a holding node sends its part


def _engine(images, annotations, cache):
    return CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                            preload=False, store_options={"sync": False}).engine


def test_a_chunk_moves_records_bit_for_bit_and_a_damaged_one_is_refused(data, tmp_path,
                                                                        single):
    images, annotations = split_paths(data)
    full = tmp_path / "full"
    prebuild(images, annotations, full, workers=1, progress=False)
    sender = _engine(images, annotations, full)
    receiver = _engine(images, annotations, tmp_path / "empty")

    assert receiver.store.kind_stats("tensors")["entries"] == 0
    chunk, taken = pack_chunk(sender, list(range(N)), limit=1)
    assert taken == 1  # (the limit is reached after one image)
    damaged = bytearray(chunk)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(CacheFormatError, match="damaged"):
        write_chunk(receiver, bytes(damaged), "rank 0")

    for start in range(0, N, 5):
        chunk, taken = pack_chunk(sender, list(range(start, min(start + 5, N))))
        assert taken == min(5, N - start)
        images_in, records = write_chunk(receiver, chunk, "rank 0")
        assert (images_in, records) == (taken, taken * len(KINDS))
    receiver.store.close()
    sender.store.close()
    got = snapshot(tmp_path / "empty")
    for kind in KINDS:
        assert got[kind] == single[kind], kind
    assert got["index"] == single["index"]
    assert ops.verify(tmp_path / "empty")["corrupt"] == []


def test_records_of_another_pipeline_are_refused_and_nothing_is_written(data, tmp_path):
    from diskcache_ocr.errors import CacheError
    from diskcache_ocr.ocr.transform import TransformConfig

    images, annotations = split_paths(data)
    prebuild(images, annotations, tmp_path / "full", workers=1, progress=False)
    sender = _engine(images, annotations, tmp_path / "full")
    other = CachedOCRDataset(images, annotations, tmp_path / "other",
                             preset="validation_optimized", preload=False,
                             transform=TransformConfig(size=320)).engine
    chunk, _ = pack_chunk(sender, [0, 1])
    with pytest.raises(CacheError, match="other record keys"):
        write_chunk(other, chunk, "rank 0")
    assert other.store.kind_stats("tensors")["entries"] == 0
    assert list(other.store.iter_index()) == []
    sender.store.close()
    other.store.close()


# -- 3. two simulated nodes on localhost --------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


_CHILD = """
import os, sys
import diskcache_ocr.build as b
import diskcache_ocr.cluster as c
from diskcache_ocr.cli import main
c.CHUNK_BYTES = {chunk_bytes}
if {die!r} and os.environ["RANK"] == "1":
    module, name, n = {die!r}
    real, calls = getattr(c if module == "cluster" else b, name), []
    def dies(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= n:
            os._exit(137)  # (as a kill: no cleanup, no header update)
        return out
    setattr(c if module == "cluster" else b, name, dies)
sys.exit(main(sys.argv[1:]))
"""


def _start(images: Path, annotations: Path, caches: list[Path], chunk_bytes: int | None,
           die: tuple[str, str, int] | None = None) -> list[subprocess.Popen]:
    argv = ["prebuild", "--images", str(images), "--annotations", str(annotations), "--json"]
    code = _CHILD.format(chunk_bytes=chunk_bytes or "c.CHUNK_BYTES", die=die)
    port = _free_port()
    procs = []
    for rank, cache in enumerate(caches):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0",
               "WORLD_SIZE": str(len(caches)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, *argv, "--cache", str(cache)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def run_nodes(images: Path, annotations: Path, caches: list[Path], *, timeout: float = 240,
              chunk_bytes: int | None = None) -> list[dict]:
    """``prebuild --json`` as each rank of a job of ``len(caches)`` ranks on this host (the
    environment torchrun's static rendezvous gives each process), rank r writing
    ``caches[r]``; every rank's summary. ``chunk_bytes``: the transfer's chunk bound."""
    procs = _start(images, annotations, caches, chunk_bytes)
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr[-4000:]
            out.append(json.loads(stdout))
    finally:
        _stop(procs)
    return out


def kill_rank_1(images: Path, annotations: Path, caches: list[Path], die: tuple[str, str, int],
                *, timeout: float = 240) -> None:
    """A job of two ranks whose rank 1 dies (exit 137, no cleanup) after its ``n``-th call
    of ``module.name``; rank 0 is then killed as torchrun ends a job whose worker died."""
    procs = _start(images, annotations, caches, 1, die)
    try:
        procs[1].wait(timeout=timeout)
        assert procs[1].returncode == 137, procs[1].communicate()[1][-4000:]
    finally:
        _stop(procs)


gloo = pytest.mark.skipif(not _gloo(), reason="torch.distributed without gloo")


@gloo
@pytest.mark.full  # (subprocesses that import torch)
def test_two_nodes_each_end_complete_with_every_image_computed_once(data, tmp_path, single):
    images, annotations = split_paths(data)
    caches = [tmp_path / "node0" / "cache", tmp_path / "node1" / "cache"]
    summaries = run_nodes(images, annotations, caches)

    assert sum(s["built"] for s in summaries) == N  # each image once in the job
    assert [s["received"] for s in summaries] == [N // 2, N // 2]
    assert [s["received_records"] for s in summaries] == [N // 2 * len(KINDS)] * 2
    assert all(s["nodes"] == 2 for s in summaries)
    assert summaries[0]["ranks"] == summaries[1]["ranks"]
    assert [(r["rank"], r["node_index"], r["built"], r["received"]) for r in summaries[0]["ranks"]
            ] == [(0, 0, N // 2, N // 2), (1, 1, N // 2, N // 2)]
    for cache in caches:
        got = snapshot(cache)
        for kind in KINDS:
            assert got[kind] == single[kind], (cache, kind)
        assert got["index"] == single["index"]
        report = ops.health(cache)
        assert report["ok"], report
        done = ops.status(cache)["completeness"]
        assert (done["complete"], done["nodes"], done["world_size"]) == (True, 2, 2)
        assert ops.verify(cache, recompute=4, images_dir=images,
                          annotations=annotations)["mismatched"] == []

    # A DistributedSampler epoch on each node reads only hits.
    from torch.utils.data import DistributedSampler

    for rank, cache in enumerate(caches):
        ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                              readonly=True, preload=False)
        fresh = CachedOCRDataset(images, annotations, None, preset="validation_optimized")
        before = ds.store.stats()
        for i in DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True):
            got, want = ds[i], fresh[i]
            assert got.keys() == want.keys()
            for name, value in want.items():
                if hasattr(value, "shape"):
                    assert np.array_equal(np.asarray(got[name]), np.asarray(value)), name
        stats = ds.store.stats()
        read = {k: v - before.get(k, 0) for k, v in stats.items()}
        assert not any(v for k, v in read.items() if k.endswith(".misses")), read
        assert read["tensors.hits"] == N // 2
        ds.store.close()


@gloo
@pytest.mark.full  # (subprocesses that import torch)
def test_ranks_sharing_a_directory_share_one_cache(data, tmp_path, single):
    images, annotations = split_paths(data)
    cache = tmp_path / "shared"
    summaries = run_nodes(images, annotations, [cache, cache])
    assert sum(s["built"] for s in summaries) == N
    assert [s["received"] for s in summaries] == [0, 0]
    assert all(s["nodes"] == 1 for s in summaries)
    got = snapshot(cache)
    for kind in KINDS:
        assert got[kind] == single[kind], kind
    assert ops.status(cache)["completeness"]["complete"] is True


@gloo
@pytest.mark.full  # (subprocesses that import torch)
def test_a_rerun_completes_every_node_without_recomputing_what_a_node_holds(
        data, tmp_path, single, monkeypatch):
    """What a killed job leaves: each node holds a different part (here: shares of a job of
    four ranks that never exchanged). The rerun computes only what no node holds."""
    images, annotations = split_paths(data)
    caches = [tmp_path / "node0", tmp_path / "node1"]
    for rank, cache in ((0, caches[0]), (1, caches[1])):
        _as_rank(monkeypatch, rank, 4)
        prebuild(images, annotations, cache, workers=1, progress=False)
        monkeypatch.undo()
    assert not ops.health(caches[0])["ok"]

    summaries = run_nodes(images, annotations, caches, chunk_bytes=1)  # (a chunk an image)
    assert sum(s["built"] for s in summaries) == N - 2 * (N // 4)
    assert [s["received"] for s in summaries] == [N // 2, N // 2]  # (4 held + 4 built there)
    for cache in caches:
        got = snapshot(cache)
        for kind in KINDS:
            assert got[kind] == single[kind], (cache, kind)
        assert ops.health(cache)["ok"]


@gloo
@pytest.mark.full  # (subprocesses that import torch)
def test_two_ranks_on_one_node_and_one_on_another(data, tmp_path, single):
    images, annotations = split_paths(data)
    big, small = tmp_path / "big", tmp_path / "small"
    summaries = run_nodes(images, annotations, [big, small, big], chunk_bytes=200_000)
    assert sum(s["built"] for s in summaries) == N
    assert [s["node_index"] for s in summaries] == [0, 1, 0]
    # each node receives what the other node's ranks built
    by_node = {0: 0, 1: 0}
    for s in summaries:
        by_node[s["node_index"]] += s["received"]
    built = {0: summaries[0]["built"] + summaries[2]["built"], 1: summaries[1]["built"]}
    assert by_node == {0: built[1], 1: built[0]}
    for cache in (big, small):
        got = snapshot(cache)
        for kind in KINDS:
            assert got[kind] == single[kind], (cache, kind)
        assert got["index"] == single["index"]
        assert ops.status(cache)["completeness"]["complete"] is True


@gloo
@pytest.mark.full  # (subprocesses that import torch)
@pytest.mark.parametrize("die", [("build", "_build_chunk", 1), ("cluster", "write_chunk", 3)],
                         ids=["while-computing", "while-receiving"])
def test_a_killed_rank_and_a_rerun_complete_every_node(data, tmp_path, single, die):
    images, annotations = split_paths(data)
    caches = [tmp_path / "node0", tmp_path / "node1"]
    kill_rank_1(images, annotations, caches, die)
    held = []
    for cache in caches:
        assert "incomplete_build" in _codes(ops.health(cache))
        with CacheStore(cache, readonly=True) as store:
            held.append({e.content_hash for _, e in store.iter_index()})
    # rank 1 died after its first chunk of 4 computed, or after its third image received
    assert len(held[1]) == (4 if die[1] == "_build_chunk" else N // 2 + 3)

    summaries = run_nodes(images, annotations, caches)
    # nothing a node held is computed again
    assert sum(s["built"] for s in summaries) == N - len(held[0] | held[1])
    for cache in caches:
        got = snapshot(cache)
        for kind in KINDS:
            assert got[kind] == single[kind], (cache, kind)
        assert got["index"] == single["index"]
        assert ops.health(cache)["ok"]


@gloo
@pytest.mark.full  # (subprocesses that import torch)
def test_two_torchrun_nodes_on_localhost_end_complete(data, tmp_path, single):
    """The command as on two real nodes: one torchrun per node (static rendezvous on
    127.0.0.1, one process each), each node its own cache directory."""
    images, annotations = split_paths(data)
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
         "-m", "diskcache_ocr.cli", "prebuild", "--images", str(images),
         "--annotations", str(annotations), "--cache", str(tmp_path / f"node{node}"),
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for node in (0, 1)]
    try:
        summaries = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, stderr[-4000:]
            summaries.append(json.loads(stdout))
    finally:
        _stop(procs)
    assert [s["built"] for s in summaries] == [N // 2, N // 2]
    assert [s["received"] for s in summaries] == [N // 2, N // 2]
    for node in (0, 1):
        got = snapshot(tmp_path / f"node{node}")
        for kind in KINDS:
            assert got[kind] == single[kind], (node, kind)
        assert ops.health(tmp_path / f"node{node}")["ok"]
