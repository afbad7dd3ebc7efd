"""Prebuild beyond one machine: every image computed once in a torchrun job, every node's
cache complete.

Under ``torch.distributed`` (any backend with send/recv and all_gather; gloo on CPU), ranks
that write the same cache directory form one *node*: a directory is known by its
``(st_dev, st_ino)`` as each rank sees it, exchanged with ``all_gather_object``, so two
simulated nodes on one host (two directories) behave as two real ones and the ranks of one
machine share one cache. The build (``build_engine`` under a process group) runs in four
steps, on the pieces here:

1. Each node's leader (its lowest rank) says which images of the split its directory
   holds complete (index entry and every kept record), failed, or lacks.
2. The images no node holds are split over all ranks; each rank computes its share into
   its own directory (the usual chunked, resumable build).
3. Every image a node lacks and another holds is sent to it, records as stored, over the
   process group in bounded chunks (:data:`CHUNK_BYTES`; one out and one in at a time). The
   receiver checks each chunk's digest and each record's checksum, checks that the keys are
   the ones its own pipeline derives from the content hash, re-hashes its own copy of the
   source file, and writes the chunk in one write transaction of its own, indexed under its
   own path and file stat.
4. Each node builds whatever it still lacks itself (a source that failed elsewhere, a
   record that could not be sent), and its leader records the build's end in the header.

Every step reads the directories' real state, so a rerun after a killed rank completes
every node without recomputing what some node holds.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from diskcache_ocr.codec import verify_checksum
from diskcache_ocr.errors import CacheError, CacheFormatError, SourceError
from diskcache_ocr.keys import content_hash
from diskcache_ocr.ocr.annotations import safe_source_path
from diskcache_ocr.ocr.decode import read_image_file
from diskcache_ocr.schema import MAX_NAMES, IndexEntry, name_kind, source_id
from diskcache_ocr.store import WriteBatch

# Bytes of records packed into one chunk (at least one image's): a rank holds one chunk going
# out and one coming in at a time.
CHUNK_BYTES = 32 << 20

_DIGEST = 16  # blake2b digest bytes ahead of each chunk

# An image's state in one directory.
MISSING, HELD, FAILED = 0, 1, 2


@dataclass(frozen=True)
class Nodes:
    """The job's cache directories: ``groups[k]`` are the ranks writing directory ``k``
    (ordered by their lowest rank), ``node`` is this rank's."""

    rank: int
    world_size: int
    groups: tuple[tuple[int, ...], ...]
    node: int

    @property
    def leader(self) -> bool:
        return self.rank == self.groups[self.node][0]

    @property
    def mine(self) -> tuple[int, ...]:
        return self.groups[self.node]


def _boot_id() -> str:
    """This running kernel's boot id (one per machine and boot; the host name where Linux's
    is unreadable)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        import socket

        return socket.gethostname()


def directory_nodes(path: str | os.PathLike[str]) -> Nodes:
    """Group the ranks by the cache directory they write (created if absent), identified by
    the machine's boot id, the device and the inode as each rank sees it (node-local disks
    set up alike can give the same device and inode on two machines). A collective call:
    every rank must make it."""
    import torch.distributed as dist

    Path(path).mkdir(parents=True, exist_ok=True)
    st = os.stat(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, (_boot_id(), st.st_dev, st.st_ino))
    order: dict[tuple[Any, ...], list[int]] = {}
    for r, ident in enumerate(ids):
        order.setdefault(tuple(ident), []).append(r)
    groups = tuple(tuple(rs) for rs in order.values())
    node = next(k for k, rs in enumerate(groups) if rank in rs)
    return Nodes(rank, world, groups, node)


def gather(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def directory_states(engine: Any) -> np.ndarray:
    """Each image's state (MISSING, HELD, FAILED) in this rank's directory."""
    store = engine.store
    store.refresh()
    n = len(engine.catalog)
    todo, failed = engine.missing(range(n))
    state = np.full(n, HELD, np.uint8)
    state[np.asarray(todo, dtype=np.int64)] = MISSING
    names = {s for s, _ in failed}
    for i in range(n):
        if state[i] == HELD and engine.catalog.source(i) in names:
            state[i] = FAILED
    return state


def node_states(engine: Any, nodes: Nodes) -> np.ndarray:
    """(nodes × images) states: each leader reads its directory, everyone gets all."""
    mine = directory_states(engine).tobytes() if nodes.leader else None
    every = gather(mine, nodes.world_size)
    n = len(engine.catalog)
    return np.stack([np.frombuffer(every[g[0]], np.uint8, count=n) for g in nodes.groups])


def check_same_split(engine: Any, nodes: Nodes) -> None:
    """Every rank must read the same split (same sources, same order, same pipeline):
    images are named by their position in it."""
    cat = engine.catalog
    h = hashlib.blake2b(digest_size=16)
    for i in range(len(cat)):
        h.update(os.fsencode(cat.source(i)) + b"\0")
    for kind, v in sorted(engine.kind_versions().items()):
        h.update(f"{kind}={v.version}/{v.fingerprint};".encode())
    every = gather(h.hexdigest(), nodes.world_size)
    if len(set(every)) > 1:
        odd = [r for r, d in enumerate(every) if d != every[0]]
        raise CacheError(
            f"{engine.store.path}: ranks {odd} read another split or pipeline than rank 0 "
            "(other sources, another order, or other kind versions); every rank of a "
            "multi-node prebuild must run the same command on the same data")


def transfer_plan(states: np.ndarray, groups: Sequence[Sequence[int]],
                  rank: int | None = None) -> dict[tuple[int, int], list[int]]:
    """(sender rank, receiver rank) -> images, for every image a node lacks that another
    holds (only the pairs ``rank`` is part of, when given). Senders and receivers are spread
    over the holding and lacking nodes' ranks by the image's position, so the work and the
    writes are shared. Array work over (nodes × images); the lists hold this rank's part."""
    n_nodes, n = states.shape
    sizes = np.array([len(g) for g in groups], np.int64)
    table = np.full((n_nodes, int(sizes.max(initial=1))), -1, np.int64)
    for k, g in enumerate(groups):
        table[k, :len(g)] = g
    # Image i's holder ranks, in node order: the (i mod count)-th of them sends it.
    weights = (states == HELD) * sizes[:, None]
    cum = np.cumsum(weights, axis=0)
    count = cum[-1] if n_nodes else np.zeros(n, np.int64)
    pick = np.arange(n) % np.maximum(count, 1)
    node = np.minimum((cum <= pick).sum(axis=0), n_nodes - 1)
    before = np.where(node > 0, cum[np.maximum(node - 1, 0), np.arange(n)], 0)
    sender = table[node, pick - before]
    plan: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, receivers in enumerate(groups):
        lack = np.flatnonzero((states[k] == MISSING) & (count > 0))
        to = np.asarray(receivers, np.int64)[lack % len(receivers)]
        by = sender[lack]
        if rank is not None:
            mine = (to == rank) | (by == rank)
            lack, to, by = lack[mine], to[mine], by[mine]
        for i, src, dst in zip(lack.tolist(), by.tolist(), to.tolist(), strict=True):
            plan[(src, dst)].append(i)
    return dict(plan)


def exchange(engine: Any, nodes: Nodes, plan: dict[tuple[int, int], list[int]],
             arrived: Callable[[int, int], None] = lambda images, records: None) -> None:
    """Every planned image, in ``world - 1`` steps: in step ``s`` rank ``r`` sends to rank
    ``r + s`` and receives from rank ``r - s`` (mod world; a permutation, so no two ranks
    wait on each other), chunk by chunk, each chunk headed by its size and whether more
    follow. A rank holds one chunk going out and one coming in at a time. ``arrived`` is
    told (images, records) of each chunk written here. Collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    rank, world = nodes.rank, nodes.world_size
    for step in range(1, world):
        dst, src = (rank + step) % world, (rank - step) % world
        todo = list(plan.get((rank, dst), ()))
        more = bool(plan.get((src, rank)))
        while todo or more:
            sends = []
            if todo:
                chunk, taken = pack_chunk(engine, todo)
                del todo[:taken]
                head = torch.tensor([len(chunk), int(bool(todo))], dtype=torch.int64)
                body = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
                sends = [(dist.isend(head, dst, tag=0), head),
                         (dist.isend(body, dst, tag=1), body)]  # (tensors kept alive)
            if more:
                head_in = torch.zeros(2, dtype=torch.int64)
                dist.recv(head_in, src, tag=0)
                body_in = torch.empty(int(head_in[0]), dtype=torch.uint8)
                dist.recv(body_in, src, tag=1)
                more = bool(head_in[1])
                arrived(*write_chunk(engine, body_in.numpy().tobytes(), f"rank {src}"))
            for work, _ in sends:
                work.wait()


def pack_chunk(engine: Any, items: Sequence[int], limit: int | None = None
               ) -> tuple[bytes, int]:
    """The records of the first images of ``items`` (at least one, then up to ``limit``
    bytes), as stored, with a digest ahead; returns (chunk, images taken). An image whose
    records this directory no longer holds goes as absent (its node builds it itself)."""
    store, cat = engine.store, engine.catalog
    limit = CHUNK_BYTES if limit is None else limit
    keep = engine.kind_versions()
    out, size, taken = [], 0, 0
    with store.reader() as r:
        for i in items:
            if taken and size >= limit:
                break
            taken += 1
            entry = r.get_index(source_id(cat.images_dir, cat.source(i)))
            records = []
            if entry is not None and entry.ok:
                # (by the names the index gives them: kind and version)
                for name, key in engine.keys(i, entry.content_hash).items():
                    if name_kind(name) not in keep:
                        continue
                    value = r.get_raw(name_kind(name), key)
                    if value is None:
                        records = []
                        break
                    records.append([name, key, bytes(value)])
            if not records:
                out.append({"i": i, "absent": True})
                continue
            size += sum(len(v) for _, _, v in records)
            out.append({"i": i, "hash": entry.content_hash, "records": records})
    body = msgpack.packb({"images": out}, use_bin_type=True)
    return hashlib.blake2b(body, digest_size=_DIGEST).digest() + body, taken


def write_chunk(engine: Any, chunk: bytes, sender: str) -> tuple[int, int]:
    """Check a received chunk and write what it holds into this rank's directory, in one
    write transaction: returns (images, records) written. A damaged chunk or record raises
    :class:`CacheFormatError`; an image whose source file here differs from the sender's
    (another content hash) is left for this node to build."""
    store, cat = engine.store, engine.catalog
    where = f"{store.path}: a chunk of records from {sender}"
    digest, body = chunk[:_DIGEST], chunk[_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise CacheFormatError(f"{where} arrived damaged (digest mismatch); nothing of it "
                               "was written; run the same prebuild again")
    try:
        images = msgpack.unpackb(body, raw=False)["images"]
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CacheFormatError(f"{where} is unreadable ({exc})") from None
    keep = engine.kind_versions()
    batch, n_images, n_records = WriteBatch(), 0, 0
    for item in images:
        if item.get("absent"):
            continue
        i, h = int(item["i"]), bytes(item["hash"])
        if not 0 <= i < len(cat):
            raise CacheFormatError(f"{where} names image {i}; the split has {len(cat)}")
        want = {n: key for n, key in engine.keys(i, h).items() if name_kind(n) in keep}
        got = {str(name): (bytes(key), value) for name, key, value in item["records"]}
        if {n: key for n, (key, _) in got.items()} != want:
            raise CacheError(f"{where}: image {cat.source(i)} came with other record keys "
                             "than this node's pipeline derives (another pipeline or "
                             "version); every node must run the same build")
        for name, (key, value) in got.items():
            verify_checksum(value, f"{where}: {name}/{key.hex()}")
        try:
            path = safe_source_path(cat.images_dir, cat.source(i))
            st = os.stat(path)
            mine = content_hash(read_image_file(path, cat.source(i),
                                                max_pixels=engine.pipeline.max_pixels))
            unchanged = IndexEntry.of_stat(st, b"").matches(os.stat(path))
        except (OSError, SourceError):
            continue  # unreadable here: this node's own build reports it
        if mine != h or not unchanged:
            continue  # another file here: this node builds its own
        for name, (key, value) in got.items():
            batch.put(name_kind(name), key, value)
        source = source_id(cat.images_dir, cat.source(i))
        batch.put_index(source, IndexEntry.of_stat(
            st, h, status="ok", keys=_names(store, source, st, h, want),
            updated_ns=time.time_ns()))
        n_images += 1
        n_records += len(got)
    if len(batch):
        store.commit(batch)
    return n_images, n_records


def _names(store: Any, source: str, st: os.stat_result, h: bytes, mine: dict[str, bytes]
           ) -> dict[str, bytes]:
    """The record names of a received source's new index entry: ``mine``, after those an
    entry here already gives this very file (other pipelines' records), oldest going first
    beyond MAX_NAMES."""
    try:
        entry = store.get_index(source)
    except CacheError:  # a damaged entry: replaced
        entry = None
    keys = {} if entry is None or not entry.matches(st) or entry.content_hash != h else {
        n: k for n, k in entry.keys.items() if n not in mine}
    others = list(keys)
    for name in others[:max(0, len(keys) + len(mine) - MAX_NAMES)]:
        del keys[name]
    return {**keys, **mine}


__all__ = ["CHUNK_BYTES", "FAILED", "HELD", "MISSING", "Nodes", "check_same_split",
           "directory_nodes", "directory_states", "exchange", "gather", "node_states",
           "pack_chunk", "transfer_plan", "write_chunk"]
