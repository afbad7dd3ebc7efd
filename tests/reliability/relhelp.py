"""Helpers of the reliability suite: killable child processes, cache snapshots, references.

Child processes come from a fork server that has already imported the library (and torch),
so starting one costs a fork, not a 2-second import: that is what lets the crash tests kill
a build 20 times within the CI budget. Each child makes itself a process-group leader, so
``killpg`` takes its own workers (prebuild's pool, a DataLoader's workers) down with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import blake3
import numpy as np

PRELOAD = ["pytest", "diskcache_ocr", "diskcache_ocr.cli", "diskcache_ocr.prebuild",
           "diskcache_ocr.watch", "diskcache_ocr.ops", "diskcache_ocr.loader", "torch.utils.data"]
START_TIMEOUT_S = 120.0
KINDS = ("images", "tensors", "maps")


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # (no effect once the server runs: then just slower)
    return ctx


def _child_main(started: Any, target: Callable[..., int | None], args: tuple[Any, ...],
                log_path: str) -> None:
    os.setsid()  # a new process group: killpg reaches this process and its children only
    # A fork-server child inherits "forkserver" as its default start method; a program
    # started normally on Linux (Python < 3.14) forks its DataLoader workers.
    mp.set_start_method("fork", force=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    started.set()
    rc = target(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(int(rc or 0))


class Child:
    """A process running ``target(*args)`` in its own process group."""

    def __init__(self, target: Callable[..., int | None], *args: Any, log: Path) -> None:
        ctx = _context()
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._started = ctx.Event()
        self.proc = ctx.Process(target=_child_main, args=(self._started, target, args,
                                                          str(self.log)), daemon=False)
        self.proc.start()
        if not self._started.wait(START_TIMEOUT_S):
            self.kill()
            raise AssertionError(f"child {target.__name__} did not start: {self.log_text()}")
        self.t0 = time.monotonic()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def join(self, timeout: float) -> int:
        """The exit code (negative: the signal); a child that overstays fails the test."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            self.proc.join(30)
            raise AssertionError(f"child {self.pid} did not finish in {timeout:.0f} s (hang?); "
                                 f"log:\n{self.log_text()}")
        return int(self.proc.exitcode)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return "<no log>"


# -- cache contents -------------------------------------------------------------------------
def snapshot(cache: Path) -> dict[str, Any]:
    """What a cache holds: every record's digest per kind, and every index entry (without
    the times, which differ between two builds)."""
    from diskcache_ocr.store import CacheStore

    out: dict[str, Any] = {}
    with CacheStore(cache, readonly=True) as store:
        for kind in KINDS:
            out[kind] = {k.hex(): blake3.blake3(v).hexdigest() for k, v in store.iter_raw(kind)}
        # Sources by their name under the dataset's root (the index knows them by path).
        root = os.path.realpath(store.header().get("dataset_root") or "/")
        out["index"] = {
            os.path.relpath(s, root): {
                "size": e.size, "content_hash": e.content_hash.hex(), "status": e.status,
                "keys": {k: v.hex() for k, v in e.keys.items()}}
            for s, e in store.iter_index()}
    return out


def diff_snapshots(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    out = []
    for part in (*KINDS, "index"):
        g, w = got.get(part, {}), want.get(part, {})
        for key in sorted(set(g) | set(w)):
            if g.get(key) != w.get(key):
                out.append(f"{part}/{key[:24]}: got {str(g.get(key))[:90]}, "
                           f"want {str(w.get(key))[:90]}")
    return out


def check_after_crash(cache: Path) -> dict[str, Any]:
    """A cache left by a killed process: opens, no damaged record, every index entry's
    records present (index and records commit together). Returns health's report."""
    from diskcache_ocr import ops
    from diskcache_ocr.store import CacheStore
    from diskcache_ocr.store.header import STORE_FORMAT

    if not (cache / "data.mdb").exists():
        return {"ok": True, "problems": []}  # killed before it created anything
    with CacheStore(cache) as store:
        header = store.header()
        assert header.get("format") == STORE_FORMAT, header
        entries = list(store.iter_index())
        for source, entry in entries:
            for kind, key in entry.records():
                assert store.contains(kind, key), f"{source}: index names a missing {kind} record"
    report = ops.verify(cache)
    assert report["corrupt"] == [], report["corrupt"]
    health = ops.health(cache)
    codes = {p["code"] for p in health["problems"]}
    assert "corrupt" not in codes, health
    return health


# -- samples --------------------------------------------------------------------------------
MAP_NAMES = ("prob_map", "prob_mask", "thresh_map", "thresh_mask")


def sample_digest(sample: Mapping[str, Any]) -> str:
    """One digest over everything a sample carries that comes from the image content."""
    h = blake3.blake3()
    for name in ("image", *MAP_NAMES, "inverse_matrix"):
        if name in sample:
            h.update(name.encode())
            h.update(np.ascontiguousarray(sample[name].numpy()).tobytes())
    for poly in sample["polygons"]:
        h.update(np.ascontiguousarray(poly).tobytes())
    h.update(np.asarray(sample["ignore"], bool).tobytes())
    h.update(repr(tuple(sample["meta"]["orig_size"])).encode())
    return h.hexdigest()


def part_digests(sample: Mapping[str, Any]) -> dict[str, str]:
    """Digests of the image and of the maps apart (to name a torn or mixed sample)."""
    out = {}
    for name in ("image", *MAP_NAMES):
        if name in sample:
            out[name] = blake3.blake3(
                np.ascontiguousarray(sample[name].numpy()).tobytes()).hexdigest()[:16]
    return out


def unbatch(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["meta"])
    return [{k: (v[i] if hasattr(v, "__getitem__") and not isinstance(v, (str, bytes)) else v)
             for k, v in batch.items()} for i in range(n)]


def copy_images(src: Path, dst: Path, names: Sequence[str] | None = None) -> None:
    """Copy images keeping their mtimes (so a cache built from ``src`` matches ``dst``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if names is None or p.name in names:
            shutil.copy2(p, dst / p.name)


def replace_atomically(src: Path, dst: Path, tag: str) -> None:
    tmp = dst.with_name(f".{dst.name}.{tag}.tmp")  # no image suffix: nobody reads it
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# -- child targets --------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    from diskcache_ocr.cli import main

    return main(argv)


def run_epoch(images: str, annotations: str, cache: str, workers: int, out: str,
              store_options: dict[str, Any] | None = None) -> int:
    """A read-through epoch through a DataLoader; writes the number of samples and errors."""
    import torch
    from torch.utils.data import DataLoader

    from diskcache_ocr.dataset import CachedOCRDataset, collate

    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          preload=False, store_options=store_options)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    n, errors = 0, []
    for batch in loader:
        for meta in batch["meta"]:
            n += 1
            if meta["error"]:
                errors.append(f"{meta['file']}: {meta['error']}")
    Path(out).write_text(json.dumps({"samples": n, "errors": errors}))
    return 0


def run_watch(cache: str, images: str, annotations: str, ready: str, kill_at: int | None,
              kill_after_commit: bool) -> int:
    """The watch service, made to SIGKILL itself inside (or right after) its first
    invalidation: ``kill_at`` ops into the write transaction, or after the commit."""
    from diskcache_ocr.store import CacheStore, WriteBatch

    apply, commit = WriteBatch.apply, CacheStore.commit

    def is_invalidation(batch: WriteBatch) -> bool:
        return any(op == "delete" and name == "index" for op, name, _, _ in batch.ops)

    def dying_apply(self: WriteBatch, txn: Any, handles: Any) -> None:
        if kill_at is None or not is_invalidation(self):
            return apply(self, txn, handles)
        stop = min(kill_at, len(self.ops))
        for i, op in enumerate(self.ops):
            if i == stop:
                os.kill(os.getpid(), signal.SIGKILL)
            one = WriteBatch()
            one.ops = [op]
            apply(one, txn, handles)
        os.kill(os.getpid(), signal.SIGKILL)  # everything applied, nothing committed

    def dying_commit(self: CacheStore, batch: WriteBatch) -> None:
        commit(self, batch)
        if kill_after_commit and is_invalidation(batch):
            os.kill(os.getpid(), signal.SIGKILL)

    WriteBatch.apply = dying_apply  # type: ignore[method-assign]
    CacheStore.commit = dying_commit  # type: ignore[method-assign]

    def out(line: str) -> None:
        print(line, file=sys.__stdout__, flush=True)
        Path(ready).write_text(line)

    return _watch_command(cache, images, annotations, out)


def _watch_command(cache: str, images: str, annotations: str,
                   out: Callable[[str], None]) -> int:
    """``diskcache-ocr watch`` in this process, each line it prints also handed to ``out``."""
    import contextlib
    import io

    from diskcache_ocr import cli

    class Lines(io.TextIOBase):
        def __init__(self) -> None:
            self.pending = ""

        def write(self, text: str) -> int:
            self.pending += text
            *done, self.pending = self.pending.split("\n")
            for line in done:
                out(line)
            return len(text)

    with contextlib.redirect_stdout(Lines()):
        return cli.main(["watch", "--cache", cache, "--images", images, "--annotations",
                         annotations, "--debounce", "0.05"])


def run_serve(cache: str, images: str, annotations: str, ready: str) -> int:

    def out(line: str) -> None:
        print(line, file=sys.__stdout__, flush=True)
        with open(ready, "a") as fh:
            fh.write(line + "\n")

    return _watch_command(cache, images, annotations, out)


def hold_reader(cache: str, max_readers: int, holding: str, seconds: float) -> int:
    """Open the cache, hold a read transaction (a reader slot), say so, then sleep."""
    from diskcache_ocr.errors import CacheError
    from diskcache_ocr.store import CacheStore

    store = CacheStore(cache, readonly=True, max_readers=max_readers)
    try:
        with store.reader() as r:
            r.get_index("nothing")
            Path(holding).write_text("holding")
            time.sleep(seconds)
    except CacheError as exc:
        Path(holding).write_text(f"CacheError: {exc}")
    return 0


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# -- the concurrency scenario ---------------------------------------------------------------
def read_and_check(images: str, annotations: str, cache: str, refs_path: str, mode: str,
                   stop: str, min_epochs: int, max_epochs: int, seed: int, out: str) -> int:
    """Read epochs until told to stop; every sample must equal a fresh computation of one of
    the two known contents of its file (digests in ``refs_path``)."""
    import random

    import torch
    from torch.utils.data import DataLoader

    from diskcache_ocr.dataset import CachedOCRDataset, collate
    from diskcache_ocr.loader import BatchLoader, split_batch

    refs = json.loads(Path(refs_path).read_text())
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          preload=False)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seen, bad, epochs, labels = 0, [], 0, {"0": 0, "1": 0}

    def check(sample: Mapping[str, Any]) -> None:
        nonlocal seen
        seen += 1
        name = sample["meta"]["file"]
        if sample["meta"]["error"]:
            bad.append(f"{name}: error {sample['meta']['error']}")
            return
        digest = sample_digest(sample)
        for label, want in refs[name]["whole"].items():
            labels[label] += digest == want
        if digest not in refs[name]["whole"].values():
            parts = part_digests(sample)
            which = {part: [c for c, d in refs[name]["parts"].items() if d.get(part) == got]
                     for part, got in parts.items()}
            bad.append(f"{name}: matches no known content; parts match {which}")

    while epochs < max_epochs and (epochs < min_epochs or not os.path.exists(stop)):
        order = list(range(len(ds)))
        rng.shuffle(order)
        if mode == "getitem":
            for i in order:
                check(ds[i])
        elif mode == "getitems":
            for start in range(0, len(order), 3):
                for sample in ds.__getitems__(order[start:start + 3]):
                    check(sample)
        elif mode == "dataloader":
            for batch in DataLoader(ds, batch_size=2, shuffle=True, generator=gen,
                                    num_workers=0, collate_fn=collate):
                for sample in unbatch(batch):
                    check(sample)
        else:
            with BatchLoader(ds, batch_size=2, shuffle=True, generator=gen, threads=2) as bl:
                for batch in bl:
                    for sample in split_batch(batch):
                        check(sample)
        epochs += 1
    Path(out).write_text(json.dumps({"samples": seen, "epochs": epochs, "bad": bad,
                                     "contents": labels}))
    return 0


def rewrite_sources(images: str, contents: dict[str, list[str]], rewrites: int, seed: int,
                    out: str) -> int:
    """Replace files atomically, alternating each between its two known contents."""
    import random

    rng = random.Random(seed)
    state = {name: 0 for name in contents}
    for k in range(rewrites):
        name = rng.choice(sorted(contents))
        state[name] ^= 1
        replace_atomically(Path(contents[name][state[name]]), Path(images) / name, f"w{k}")
        time.sleep(rng.uniform(0.01, 0.1))
    Path(out).write_text(json.dumps(state))
    return 0


def prebuild_until(argv: list[str], stop: str, out: str) -> int:
    """Run prebuild again and again until told to stop (each run sees other changes)."""
    from diskcache_ocr.cli import main

    runs = 0
    while not os.path.exists(stop) or runs == 0:
        rc = main(argv)
        if rc != 0:
            return rc
        runs += 1
    Path(out).write_text(json.dumps({"runs": runs}))
    return 0


@contextlib.contextmanager
def small_tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``where`` (skips the test without root)."""
    import pytest

    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                          str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a {size_mib} MiB tmpfs to fill up (needs root): "
                    f"{res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(disk: Path) -> Path:
    """Write zeros into ``disk/filler`` until the disk is full; returns the filler."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


# -- clearing a cache while others open it ---------------------------------------------------
def record_arrays(tag: str, i: int) -> dict[str, Any]:
    """A record whose every byte says which writer and which write it is."""
    seed = int.from_bytes(blake3.blake3(f"{tag}/{i}".encode()).digest()[:8], "little")
    return {"image": np.random.default_rng(seed).integers(0, 256, (64, 96, 3), np.uint8)}


def record_key(tag: str, i: int) -> bytes:
    return blake3.blake3(f"key:{tag}/{i}".encode()).digest()


def write_records(cache: str, tag: str, n: int, pause_s: float, out: str) -> int:
    """Open the cache, write ``n`` records one transaction each, read them back."""
    from diskcache_ocr.errors import CacheError
    from diskcache_ocr.store import CacheStore

    bad = []
    try:
        with CacheStore(cache) as store:
            for i in range(n):
                store.put("images", record_key(tag, i), record_arrays(tag, i))
                time.sleep(pause_s)
            for i in range(n):
                got = store.get("images", record_key(tag, i))
                if got is None or not np.array_equal(got["image"], record_arrays(tag, i)["image"]):
                    bad.append(i)
    except CacheError as exc:
        bad.append(f"{type(exc).__name__}: {exc}")
    Path(out).write_text(json.dumps({"bad": bad}))
    return 0


def paused_wipe(cache: str, paused: str, go: str) -> int:
    """``clear --all``'s deleting step, made to stop after ``data.mdb`` is gone and before
    ``lock.mdb`` goes (until ``go`` exists): the moment another process may open the cache."""
    import pathlib

    from diskcache_ocr.store import remove

    unlink = pathlib.Path.unlink

    def slow_unlink(self: pathlib.Path, missing_ok: bool = False) -> None:
        unlink(self, missing_ok=missing_ok)
        if self.name == "data.mdb" and str(self.parent) == cache:
            Path(paused).write_text("paused")
            wait_for(lambda: os.path.exists(go), 120, "go")

    pathlib.Path.unlink = slow_unlink  # type: ignore[method-assign]
    sys.argv = ["remove", cache]
    remove._child()
    return 0


# -- batch memory in shared memory ------------------------------------------------------------
def slabs_in(shm_dir: str) -> list[str]:
    from diskcache_ocr import batchmem

    return sorted(n for n in os.listdir(shm_dir) if n.startswith(batchmem.SLAB_PREFIX))


def loader_exit(images: str, annotations: str, cache: str, shm_dir: str, how: str,
                out: str) -> int:
    """A training loop over a 2-worker DataLoader that ends ``how``; writes what it saw.

    - ``kill-worker``: a worker is SIGKILLed; the loop's error is not caught (the program
      ends with it).
    - ``raise``: the training step raises after two batches, not caught.
    - ``teardown``: the loop stops after two batches, the iterator is dropped and collected;
      the slabs left while the program still runs are written out.
    - ``kill-worker-then-new-loader``: a worker is SIGKILLed, the error caught and dropped
      (a notebook), then a new loader runs one batch; the slabs left are written out.
    """
    import gc

    from torch.utils.data import DataLoader

    from diskcache_ocr.batchmem import slabs
    from diskcache_ocr.dataset import CachedOCRDataset, collate

    slabs.SHM_DIR = shm_dir  # (workers fork with it)
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          preload=False)
    epochs = [i % len(ds) for i in range(len(ds) * 20)]

    def loader() -> DataLoader:
        return DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate, sampler=epochs)

    it = iter(loader())
    pids = [w.pid for w in it._workers]  # type: ignore[attr-defined]
    held = [next(it), next(it)]
    report: dict[str, Any] = {"workers": pids, "during": slabs_in(shm_dir)}

    def save() -> None:
        Path(out).write_text(json.dumps(report))

    if how == "kill-worker":
        save()
        os.kill(pids[0], signal.SIGKILL)
        for batch in it:
            held = [batch]
        return 0
    if how == "raise":
        save()
        raise RuntimeError("the training step failed")
    if how == "teardown":
        del it, held
        gc.collect()
        report["after"] = slabs_in(shm_dir)
        save()
        return 0
    assert how == "kill-worker-then-new-loader"
    os.kill(pids[0], signal.SIGKILL)
    try:
        for batch in it:
            held = [batch]
    except RuntimeError as exc:
        report["error"] = str(exc)[:200]
    del it, held
    gc.collect()
    again = iter(loader())
    next(again)
    report["after"] = slabs_in(shm_dir)
    report["new workers"] = [w.pid for w in again._workers]  # type: ignore[attr-defined]
    save()
    del again
    return 0


def shm_epochs(kind: str, images: str, annotations: str, cache: str, epochs: int,
               out: str) -> int:
    """Epochs of a 2-worker DataLoader (batches of 3) whose batches live in /dev/shm:
    ``stock`` (a plain Dataset of the same tensors and the default collate), ``ours`` (the
    cached dataset, batch memory reused) or ``ours-no-reuse``. Writes the batches seen and
    the error that ended it, if any."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from diskcache_ocr.dataset import CachedOCRDataset, collate

    names = ("image", *MAP_NAMES, "inverse_matrix")
    ds = CachedOCRDataset(images, annotations, cache, preload=False, preset={
        "load_maps": True, "reuse_batch_memory": kind != "ours-no-reuse",
        "cache_config": {"cache_images": True, "cache_transformed_tensors": True,
                         "cache_maps": True}})

    class Plain(Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.items = [{k: ds[i][k].clone() for k in names} for i in range(len(ds))]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return self.items[i]

    data, collate_fn = (Plain(), None) if kind == "stock" else (ds, collate)
    batches, error = 0, None
    try:
        for _ in range(epochs):
            order = torch.randperm(len(ds) * 4).remainder(len(ds)).tolist()  # 11 batches
            for batch in DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate_fn,
                                    sampler=order):
                batches += 1
                time.sleep(0.02)  # a training step
                del batch
    except Exception as exc:  # noqa: BLE001 - the answer of this run
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    slabs = [n for n in slabs_in("/dev/shm") if not n.endswith("-pressure")]  # (see batchmem)
    Path(out).write_text(json.dumps({"batches": batches, "error": error, "slabs": slabs}))
    return 0
