"""Shared helpers for the benchmark suite: data, timing statistics, memory sampling, results.

Every benchmark module imports this file (it sits next to them; ``run_all.py`` and each module
put ``benchmarks/`` on ``sys.path``). Nothing here is part of the library.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"  # --quick runs write to results/quick/ instead
DATA = Path(os.environ.get("DISKCACHE_OCR_BENCH_DATA", BENCH_DIR / ".data"))

FULL_IMAGES = 200
QUICK_IMAGES = 16
SEED = 0


# -- command line -----------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes for a smoke run ({QUICK_IMAGES} images, fewer iterations)")
    p.add_argument("--images", type=int, default=None,
                   help=f"images in the synthetic set (default {FULL_IMAGES}, "
                        f"quick {QUICK_IMAGES})")
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (>= 3)")
    return p


# Timed runs go to a fresh interpreter each (see run_isolated); --quick runs them in-process.
ISOLATE = True


_LOAD_AT_START: list[float] | None = None
_SOURCE_AT_START: str | None = None


def library_source_hash() -> str:
    """sha256 over the library's Python sources: which code a result was measured on."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "diskcache_ocr").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def configure(args: argparse.Namespace) -> None:
    global ISOLATE, _LOAD_AT_START, _SOURCE_AT_START, RESULTS
    ISOLATE = not args.quick
    if args.quick:  # a smoke run never overwrites the figures of a full run
        RESULTS = BENCH_DIR / "results" / "quick"
    _LOAD_AT_START = list(os.getloadavg())
    _SOURCE_AT_START = library_source_hash()


def n_images(args: argparse.Namespace) -> int:
    if args.images:
        return int(args.images)
    return QUICK_IMAGES if args.quick else FULL_IMAGES


def reps(args: argparse.Namespace) -> int:
    return max(3, int(args.reps))


# -- data -------------------------------------------------------------------------------------
def dataset_root(n: int, seed: int = SEED) -> tuple[Path, Path, Path]:
    """(root, images dir, annotation file) of a synthetic val split, synthesized once."""
    from diskcache_ocr.synth import split_paths, synthesize

    root = DATA / f"synth-{n}-s{seed}"
    images, ann = split_paths(root)
    if not ann.exists():  # the annotation file is written last: its presence means complete
        log(f"synthesizing {n} images into {root} ...")
        started = time.perf_counter()
        synthesize(root, n, seed=seed, workers=min(2, os.cpu_count() or 1))
        log(f"  done in {time.perf_counter() - started:.1f} s")
    return root, images, ann


def prebuilt_set(args: argparse.Namespace) -> tuple[int, int, Path, Path, Path]:
    """(images, reps, images dir, annotation file, prebuilt cache) of a benchmark's arguments,
    after :func:`configure`."""
    configure(args)
    n = n_images(args)
    _, images, ann = dataset_root(n)
    return n, reps(args), images, ann, prebuilt_cache(n)


def scratch_dir(prefix: str) -> Path:
    """A fresh directory under the data folder (same file system as the caches)."""
    (DATA / "tmp").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=DATA / "tmp"))


def remove(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prebuilt_cache(n: int, preset: str = "validation_optimized", workers: int = 2) -> Path:
    """A cache with every kind ``preset`` caches, built once per data set and library code.

    Reused across benchmarks while it opens without a version mismatch and nothing is
    missing; rebuilt otherwise (e.g. after the library's pipeline changed).
    """
    from diskcache_ocr import CachedOCRDataset
    from diskcache_ocr.prebuild import prebuild

    _, images, ann = dataset_root(n)
    cache = DATA / f"cache-{preset}-{n}"
    if (cache / "data.mdb").exists():
        try:
            ds = CachedOCRDataset(images, ann, cache, preset=preset, preload=False)
            todo, _ = ds.missing(range(len(ds)))
            ds.close()
            if not todo:
                return cache
        except Exception as exc:  # noqa: BLE001 - any problem: rebuild
            log(f"rebuilding {cache}: {type(exc).__name__}: {exc}")
        remove(cache)
    log(f"prebuilding {preset} cache for {n} images into {cache} ...")
    started = time.perf_counter()
    prebuild(images, ann, cache, preset=preset, workers=workers, progress=False)
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return cache


def drop_page_cache(path: Path | str) -> None:
    """Ask the kernel to drop a file's clean pages (mapped pages of live processes stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_file(path: Path | str, chunk: int = 8 << 20) -> None:
    """Put a file in the page cache the way a sequential read (or ``CacheStore.warm``) does.

    NOTE: how the page cache was filled changes later warm reads through a memory map: on
    this machine's kernel a sequential read leaves large folios, a 4 KB-at-a-time fill (e.g.
    a reader with read-ahead off) small ones, and a random 1.2 MB record then costs ~2× more
    to map and touch. So every warm-read benchmark starts from the same, sequential state.
    """
    drop_page_cache(path)  # (pages mapped by a live process stay where they are)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while os.read(fd, chunk):
            pass
    finally:
        os.close(fd)


# -- statistics -------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def per_call(fn: Callable[[], Any], iterations: int) -> float:
    """Mean seconds per call over ``iterations`` calls (one repetition)."""
    started = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - started) / iterations


def fmt_s(stat: dict[str, Any] | None, unit: str = "s", digits: int = 2) -> str:
    """'median [min–max]' in seconds, ms or µs."""
    if not stat:
        return "–"
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    label = {"s": " s", "ms": " ms", "us": " µs"}[unit]
    m, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f}{label} [{lo:.{digits}f}–{hi:.{digits}f}]"


def fmt_x(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def fmt_mib(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "–"
    m, lo, hi = (stat[k] / 2**20 for k in ("median", "min", "max"))
    return f"{m:.0f} MiB [{lo:.0f}–{hi:.0f}]"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """median(a) / median(b)."""
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def verdict(value: float | None, limit: float, better: str = "lower") -> str:
    if value is None:
        return "n/a"
    ok = value <= limit if better == "lower" else value >= limit
    return "met" if ok else "MISSED"


# -- memory -----------------------------------------------------------------------------------
_ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Anonymous")


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """Bytes per field of /proc/<pid>/smaps_rollup (None if the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in _ROLLUP_FIELDS:
            out[name] = int(rest.split()[0]) * 1024
    return out


def process_tree(pid: int | None = None) -> list[int]:
    import psutil

    root = psutil.Process(pid or os.getpid())
    return [root.pid] + [c.pid for c in root.children(recursive=True)]


class MemorySampler:
    """Samples the summed smaps_rollup of this process and all its descendants.

    >>> with MemorySampler() as mem:      # doctest: +SKIP
    ...     run_epoch(loader)
    >>> mem.result()["pss_peak"]
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        total: dict[str, int] = {k: 0 for k in _ROLLUP_FIELDS}
        pids = process_tree()
        counted = 0
        for pid in pids:
            roll = smaps_rollup(pid)
            if roll is None:
                continue
            counted += 1
            for k, v in roll.items():
                total[k] += v
        total["processes"] = counted
        self.samples.append(total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def result(self) -> dict[str, Any]:
        s = self.samples
        if not s:
            return {}
        return {
            "pss_peak": max(x["Pss"] for x in s),
            "pss_median": statistics.median(x["Pss"] for x in s),
            "anon_peak": max(x["Anonymous"] for x in s),
            "pss_anon_peak": max(x.get("Pss_Anon", 0) for x in s),
            "pss_file_peak": max(x.get("Pss_File", 0) for x in s),
            "pss_shmem_peak": max(x.get("Pss_Shmem", 0) for x in s),
            # without the batches in flight (shared memory between workers and the main
            # process, which any DataLoader has, cached or not)
            "pss_less_shmem_peak": max(x["Pss"] - x.get("Pss_Shmem", 0) for x in s),
            "processes": max(x["processes"] for x in s),
            "samples": len(s),
        }


def mem_summary(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-field summary (median/min/max) over repetitions of MemorySampler.result()."""
    results = [r for r in results if r]
    if not results:
        return {}
    return {k: summary([r[k] for r in results]) for k in results[0] if k != "samples"}


# -- epochs -----------------------------------------------------------------------------------
def run_epoch(loader: Iterable[Any]) -> tuple[float, int]:
    """Seconds to draw every batch of one epoch, and the number of samples seen."""
    started = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["image"]) if isinstance(batch, dict) else len(batch)
    return time.perf_counter() - started, seen


def data_loader(ds: Any, workers: int, *, batch_size: int = 8, persistent: bool = True,
                shuffle: bool = False, seed: int = 0) -> Any:
    import warnings

    import torch
    from torch.utils.data import DataLoader

    from diskcache_ocr import collate

    # More workers than cores is deliberate in the memory and scaling runs.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate, persistent_workers=persistent and workers > 0,
                      generator=gen, multiprocessing_context="fork" if workers else None)


# -- results ----------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(mod, "__version__", "?"))


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "memory_bytes": mem_total,
        # Other work on the machine shows here: 1-, 5-, 15-minute load averages.
        "loadavg_at_start": _LOAD_AT_START,
        "loadavg_at_end": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "lmdb": _version("lmdb"),
        "diskcache_ocr": _version("diskcache_ocr"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import lmdb

        info["lmdb_engine"] = ".".join(map(str, lmdb.version()))
    except Exception:  # noqa: BLE001
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "diskcache_ocr"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["git_commit"] = commit or None
        info["library_modified"] = bool(dirty)  # uncommitted changes in diskcache_ocr/
    except (OSError, subprocess.SubprocessError):
        pass
    info["library_source_sha256"] = library_source_hash()
    info["library_source_sha256_at_start"] = _SOURCE_AT_START
    info["library_changed_during_run"] = (_SOURCE_AT_START is not None
                                          and _SOURCE_AT_START != info["library_source_sha256"])
    return info


def write_result(name: str, payload: dict[str, Any], table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": name, "quick": not ISOLATE, "machine": machine_info(), **payload,
           "table_markdown": table}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
    log(f"wrote {path.relative_to(REPO)}")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:
        pass
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None
             ) -> str:
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def quiet_logging() -> Any:
    """Silence the library's per-100-samples statistics lines during timed loops."""
    import logging

    logger = logging.getLogger("diskcache_ocr")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


_RESULT_MARK = "@@bench-result@@"
_ISOLATED = (
    "import json, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import importlib\n"
    "fn = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])\n"
    "result = fn(**json.loads(sys.argv[4]))\n"
    "print(sys.argv[5] + json.dumps(result), flush=True)\n"
)


def run_isolated(module: str, func: str, **kwargs: Any) -> Any:
    """``module.func(**kwargs)`` in a fresh interpreter; returns its JSON-able result.

    Used for every timed epoch and memory sample, so that what one run allocated (or left
    in the heap) never shows up in the next run's PSS, and each DataLoader forks from a clean
    parent.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _ISOLATED, str(BENCH_DIR), module, func,
         json.dumps(kwargs, default=_json_default), _RESULT_MARK],
        stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{module}.{func}({kwargs}) failed with exit code {proc.returncode}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    raise RuntimeError(f"{module}.{func}: no result in its output")


def bar_chart(path: Path, labels: Sequence[str], series: dict[str, Sequence[dict[str, Any] | None]],
              title: str, ylabel: str = "seconds (median, min–max bars)") -> Path:
    """Grouped bars (one group per label, one bar per series) with min–max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(labels) + 2), 4.8))
    for j, (name, stats) in enumerate(series.items()):
        xs, med, lo, hi = [], [], [], []
        for i, st in enumerate(stats):
            if not st:
                continue
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            med.append(st["median"])
            lo.append(st["median"] - st["min"])
            hi.append(st["max"] - st["median"])
        bars = ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=name)
        ax.bar_label(bars, labels=[f"{m:.2f}" for m in med], fontsize=7, padding=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path.relative_to(REPO)}")
    return path
