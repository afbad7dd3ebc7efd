"""What a split costs as it grows: 1k, 10k and 100k images of ~120 words each.

    python benchmarks/scale.py                          # 1000,10000,100000
    python benchmarks/scale.py --sizes 1000,10000       # some sizes (the others' figures stay)
    python benchmarks/scale.py --plot-only              # redraw the plot from the JSON

Data (``scale_data.py``, beside this file): 128×128 JPEGs, each with its own 100–140 word
boxes, synthesized once per size and resumable, under ``--data`` (default
``$DISKCACHE_OCR_SCALE_DATA`` or ``benchmarks/.data/scale``; 100k images take ~1.5 GB and
their cache ~5 GB). Each size's cache is prebuilt once: preset ``balanced`` (the decoded
image cached, 48 KiB a record) with the built-in transform at 128 px.

Per size, each figure in a fresh interpreter:

* first construction (``CachedOCRDataset(...)`` where no process has opened this annotation
  file before: any annotation index the library keeps in the cache directory is removed
  first) and warm construction (the same again);
* bytes of ``data.mdb`` a construction reads with the file evicted from the page cache
  (``POSIX_FADV_DONTNEED``, then ``mincore`` before and after), and the same for the
  completeness check (``missing()`` of every image: what a preload or a resumed prebuild
  runs);
* three epochs with a 2-worker persistent ``DataLoader`` (batch 8, ``diskcache_ocr.collate``,
  cache warm): per-sample time (the median epoch); after them, the anonymous memory
  (``Anonymous`` of ``/proc/<pid>/smaps_rollup``: a forked worker counts the pages it still
  shares with the main process too) and the private memory (``Private_Clean +
  Private_Dirty``: what the process alone maps, file pages included; in the main process,
  what it shares with its workers is not in it) of the main process and of each worker;
* ``diskcache-ocr status`` and ``health`` as commands (process start to exit), cold and warm;
* the origin project's way to load the same JSON, written here: ``json.load``, then one
  rounded ``int32`` array per word (the "2× faster first construction" reference).

Targets (reported with a verdict, never asserted): at 100k, warm construction ≤ 2 s, a cold
construction reads ≤ 1 % of the cache, the first construction ≥ 2× faster than the origin's
parse; anonymous memory grows ≤ 1 KiB per image in each worker and ≤ 2 KiB in the main
process; per-sample epoch time at 100k ≤ 1.2× that at 1k; ``status`` at 100k ≤ 2 s.
Writes ``results/scale/scale.json`` and ``results/scale/scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import scale_data  # noqa: E402

NAME = "scale"
SIZES = (1000, 10000, 100000)
PRESET = "balanced"
SIZE_PX = scale_data.SIZE
WORKERS = 2
BATCH = 8
EPOCHS = 3  # epochs of one persistent loader; memory is read after the last
OUT = C.BENCH_DIR / "results" / "scale"
DATA = Path(os.environ.get("DISKCACHE_OCR_SCALE_DATA", C.DATA / "scale"))


# -- the dataset and its files ----------------------------------------------------------------
def paths(data: str | Path, n: int) -> tuple[Path, Path, Path]:
    images, ann = scale_data.split_paths(Path(data), n)
    return images, ann, Path(data) / f"cache-{PRESET}-{n}"


def open_dataset(images: str | Path, ann: str | Path, cache: str | Path) -> Any:
    from diskcache_ocr import CachedOCRDataset
    from diskcache_ocr.ocr.transform import TransformConfig

    return CachedOCRDataset(images, ann, cache, preset=PRESET,
                            transform=TransformConfig(size=SIZE_PX), preload=False)


def prepare(data: Path, n: int) -> tuple[Path, Path, Path]:
    """The split (synthesized once) and its cache (prebuilt once; a prebuild resumes)."""
    images, ann = scale_data.synthesize(data, n, log=C.log)
    images, ann, cache = paths(data, n)
    done = cache / "built"
    if not done.exists():
        C.log(f"prebuilding {n} images into {cache} ...")
        started = time.perf_counter()
        with C.quiet_logging():
            ds = open_dataset(images, ann, cache)
            summary = ds.prebuild(workers=1, progress=False)
            ds.close()
        C.log(f"  {summary.line()} ({time.perf_counter() - started:.0f} s)")
        done.write_text(summary.line() + "\n")
    return images, ann, cache


def forget_annotations(cache: Path) -> None:
    """Remove what the library keeps in the cache directory beside the LMDB files (the
    annotation index, where this version keeps one): before a "first" construction."""
    for p in cache.iterdir():
        if p.name in ("data.mdb", "lock.mdb", "built"):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


# -- page cache -------------------------------------------------------------------------------
def resident(path: Path) -> int:
    from diskcache_ocr.store.warming import resident_bytes

    return resident_bytes(path) or 0


# -- measured in a fresh interpreter each -----------------------------------------------------
def m_construct(images: str, ann: str, cache: str, cold: bool, first: bool) -> dict[str, Any]:
    import diskcache_ocr.dataset  # noqa: F401 - torch and the library loaded before the clock

    data = Path(cache) / "data.mdb"
    if first:
        forget_annotations(Path(cache))
    if cold:
        C.drop_page_cache(data)
    before = resident(data)
    started = time.perf_counter()
    with C.quiet_logging():
        ds = open_dataset(images, ann, cache)
    seconds = time.perf_counter() - started
    read = resident(data) - before
    n = len(ds)
    ds.close()
    return {"seconds": seconds, "data_read": read, "data_size": data.stat().st_size,
            "images": n, "evicted_to": before}


def m_missing(images: str, ann: str, cache: str) -> dict[str, Any]:
    data = Path(cache) / "data.mdb"
    with C.quiet_logging():
        ds = open_dataset(images, ann, cache)
        C.drop_page_cache(data)
        before = resident(data)
        started = time.perf_counter()
        todo, failed = ds.missing(range(len(ds)))
        seconds = time.perf_counter() - started
    read = resident(data) - before
    ds.close()
    return {"seconds": seconds, "data_read": read, "todo": len(todo), "failed": len(failed)}


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous"):
                fields[name] = int(rest.split()[0]) * 1024
    return {"private": fields["Private_Clean"] + fields["Private_Dirty"],
            "anonymous": fields["Anonymous"], "rss": fields["Rss"], "pss": fields["Pss"]}


def m_epoch(images: str, ann: str, cache: str, epochs: int = EPOCHS) -> dict[str, Any]:
    with C.quiet_logging():
        ds = open_dataset(images, ann, cache)
        C.warm_file(Path(cache) / "data.mdb")
        loader = C.data_loader(ds, WORKERS, batch_size=BATCH)
        times = []
        for _ in range(epochs):
            seconds, seen = C.run_epoch(loader)
            assert seen == len(ds), (seen, len(ds))
            times.append(seconds)
        workers = [w.pid for w in loader._iterator._workers]  # (persistent: still alive)
        main = _memory(os.getpid())
        per_worker = [_memory(pid) for pid in workers]
        stats = ds.stats()
    # (the first epoch also starts the workers: the median of the epochs is reported)
    return {"seconds": times, "per_sample": statistics.median(times) / seen, "samples": seen,
            "main": main, "workers": per_worker,
            "hits": stats.get("images.hits", 0), "misses": stats.get("images.misses", 0)}


def m_command(cache: str, command: str, cold: bool) -> dict[str, Any]:
    data = Path(cache) / "data.mdb"
    if cold:
        C.drop_page_cache(data)
    before = resident(data)
    code = ("import sys\nfrom diskcache_ocr import cli\n"
            f"rc = cli.main([{command!r}, '--cache', sys.argv[1], '--json'])\n"
            "print('torch' in sys.modules, file=sys.stderr)\nraise SystemExit(rc)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, cache], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rc": proc.returncode, "data_read": resident(data) - before,
            "torch": proc.stderr.strip().splitlines()[-1] == "True"}


def m_origin_parse(ann: str) -> dict[str, Any]:
    """The origin project's way to load annotations: json.load, then per word one rounded
    int32 array (written here, not its code)."""
    import resource

    import numpy as np

    started = time.perf_counter()
    with open(ann) as fh:
        raw = json.load(fh)
    anns = {}
    words = 0
    for name, entry in raw["images"].items():
        polys = [np.round(np.asarray(w["points"], dtype=np.float64)).astype(np.int32)
                 for w in entry.get("words", {}).values()]
        anns[name] = polys
        words += len(polys)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": len(anns), "words": words,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# -- one size ---------------------------------------------------------------------------------
def run_size(data: Path, n: int, reps: int, origin: bool) -> dict[str, Any]:
    images, ann, cache = prepare(data, n)
    args = {"images": str(images), "ann": str(ann), "cache": str(cache)}
    iso = C.run_isolated
    out: dict[str, Any] = {"images": n, "words": None,
                           "cache_bytes": (cache / "data.mdb").stat().st_size,
                           "annotation_bytes": ann.stat().st_size,
                           "index_bytes": None,
                           "image_bytes": sum(p.stat().st_size for p in images.iterdir())}
    C.log(f"{n}: constructions ...")
    first = [iso(NAME, "m_construct", **args, cold=False, first=True) for _ in range(reps)]
    warm = [iso(NAME, "m_construct", **args, cold=False, first=False) for _ in range(reps)]
    cold = [iso(NAME, "m_construct", **args, cold=True, first=False) for _ in range(reps)]
    out["first_construction"] = C.summary([r["seconds"] for r in first])
    out["warm_construction"] = C.summary([r["seconds"] for r in warm])
    out["cold_construction"] = C.summary([r["seconds"] for r in cold])
    out["cold_construction_read"] = C.summary([r["data_read"] for r in cold])
    out["cold_evicted_to"] = [r["evicted_to"] for r in cold]
    # (what the library keeps in the cache directory beside the LMDB files: the annotation
    # index, where this version keeps one)
    out["index_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()
                             and p.name not in ("data.mdb", "lock.mdb", "built"))
    C.log(f"{n}: completeness check ...")
    miss = [iso(NAME, "m_missing", **args) for _ in range(reps)]
    out["missing_check"] = C.summary([r["seconds"] for r in miss])
    out["missing_check_read"] = C.summary([r["data_read"] for r in miss])
    C.log(f"{n}: epoch ...")
    ep = iso(NAME, "m_epoch", **args)
    out["epoch"] = ep
    C.log(f"{n}: status / health ...")
    for command in ("status", "health"):
        for state in ("cold", "warm"):
            runs = [iso(NAME, "m_command", cache=str(cache), command=command,
                        cold=state == "cold") for _ in range(reps)]
            out[f"{command}_{state}"] = C.summary([r["seconds"] for r in runs])
            out[f"{command}_{state}_read"] = C.summary([r["data_read"] for r in runs])
            out[f"{command}_rc"] = sorted({r["rc"] for r in runs})
            out[f"{command}_loads_torch"] = any(r["torch"] for r in runs)
    # (json.load's objects take ~18× the file's size: at 100k images, ~11 GB)
    need = ORIGIN_RSS_PER_JSON_BYTE * ann.stat().st_size + (2 << 30)
    available = mem_available()
    if origin and available is not None and available < need:
        C.log(f"{n}: the origin's parse skipped: it needs ~{need / 2**30:.1f} GiB, "
              f"{available / 2**30:.1f} GiB available")
        out["origin_parse_skipped"] = {"needs": need, "available": available}
    elif origin:
        C.log(f"{n}: the origin's parse ...")
        runs = [iso(NAME, "m_origin_parse", ann=str(ann)) for _ in range(1 if n >= 100000
                                                                          else reps)]
        out["origin_parse"] = C.summary([r["seconds"] for r in runs])
        out["origin_parse_max_rss"] = max(r["max_rss"] for r in runs)
        out["words"] = runs[0]["words"]
    return out


ORIGIN_RSS_PER_JSON_BYTE = 18


def mem_available() -> int | None:
    from diskcache_ocr.store.warming import mem_available as available

    return available()


# -- report -----------------------------------------------------------------------------------
MiB = 1 << 20


def _growth(rows: dict[int, dict[str, Any]], pick) -> float | None:
    """Bytes per image between the smallest and the largest size measured."""
    sizes = sorted(rows)
    if len(sizes) < 2:
        return None
    a, b = sizes[0], sizes[-1]
    return (pick(rows[b]) - pick(rows[a])) / (b - a)


def targets(rows: dict[int, dict[str, Any]]) -> list[tuple[str, str, str]]:
    big, small = max(rows), min(rows)
    r = rows[big]
    out = []

    def add(what: str, value: float | None, limit: float, text: str, better: str = "lower"):
        if value is None:
            out.append((what, "–", "not measured"))
            return
        ok = value <= limit if better == "lower" else value >= limit
        out.append((what, text, "met" if ok else "NOT met"))

    add(f"warm construction at {big} ≤ 2 s", r["warm_construction"]["median"], 2.0,
        f"{r['warm_construction']['median']:.2f} s")
    share = r["cold_construction_read"]["median"] / r["cache_bytes"]
    add(f"cold construction at {big} reads ≤ 1 % of the cache", share, 0.01,
        f"{100 * share:.3f} % ({r['cold_construction_read']['median'] / MiB:.2f} MiB "
        f"of {r['cache_bytes'] / MiB:.0f} MiB)")
    parsed = [n for n in sorted(rows) if "origin_parse" in rows[n]]
    if parsed:
        o = rows[parsed[-1]]
        x = o["origin_parse"]["median"] / o["first_construction"]["median"]
        add(f"first construction at {parsed[-1]} ≥ 2× faster than the origin's parse", x, 2.0,
            f"{x:.2f}× ({o['first_construction']['median']:.2f} s vs "
            f"{o['origin_parse']['median']:.2f} s)", better="higher")
    w = _growth(rows, lambda x: max(m["anonymous"] for m in x["epoch"]["workers"]))
    add(f"worker anonymous memory growth {small}→{big} ≤ 1 KiB/image",
        None if w is None else w / 1024, 1.0, "–" if w is None else f"{w / 1024:.2f} KiB/image")
    m = _growth(rows, lambda x: x["epoch"]["main"]["anonymous"])
    add(f"main anonymous memory growth {small}→{big} ≤ 2 KiB/image",
        None if m is None else m / 1024, 2.0, "–" if m is None else f"{m / 1024:.2f} KiB/image")
    if big != small:
        x = rows[big]["epoch"]["per_sample"] / rows[small]["epoch"]["per_sample"]
        add(f"per-sample epoch time at {big} ≤ 1.2× at {small}", x, 1.2, f"{x:.2f}×")
    add(f"status at {big} ≤ 2 s", max(r["status_cold"]["median"], r["status_warm"]["median"]),
        2.0, f"{r['status_cold']['median']:.2f} s cold, {r['status_warm']['median']:.2f} s warm")
    return out


def table(rows: dict[int, dict[str, Any]]) -> str:
    sizes = sorted(rows)

    def s(stat: dict[str, Any] | None, unit: str = "s") -> str:
        return C.fmt_s(stat, unit)

    def mib(v: float) -> str:
        return f"{v / MiB:.1f}"

    lines = [
        ("first construction (s)", [s(rows[n]["first_construction"]) for n in sizes]),
        ("warm construction (s)", [s(rows[n]["warm_construction"]) for n in sizes]),
        ("cold construction (s)", [s(rows[n]["cold_construction"]) for n in sizes]),
        ("origin-style parse of the JSON (s)",
         [s(rows[n].get("origin_parse")) for n in sizes]),
        ("cold construction reads of data.mdb (MiB)",
         [f"{mib(rows[n]['cold_construction_read']['median'])} "
          f"({100 * rows[n]['cold_construction_read']['median'] / rows[n]['cache_bytes']:.3f} %)"
          for n in sizes]),
        ("completeness check, cold (s)", [s(rows[n]["missing_check"]) for n in sizes]),
        ("completeness check reads (MiB)",
         [f"{mib(rows[n]['missing_check_read']['median'])} "
          f"({100 * rows[n]['missing_check_read']['median'] / rows[n]['cache_bytes']:.2f} %)"
          for n in sizes]),
        ("epoch per sample, 2 workers (ms)",
         [f"{1e3 * rows[n]['epoch']['per_sample']:.3f}" for n in sizes]),
        ("main process anonymous / private (MiB)",
         [f"{mib(rows[n]['epoch']['main']['anonymous'])} / "
          f"{mib(rows[n]['epoch']['main']['private'])}" for n in sizes]),
        ("each worker anonymous (MiB)",
         [" / ".join(mib(w["anonymous"]) for w in rows[n]["epoch"]["workers"])
          for n in sizes]),
        ("each worker private (MiB)",
         [" / ".join(mib(w["private"]) for w in rows[n]["epoch"]["workers"]) for n in sizes]),
        ("status, cold / warm (s)",
         [f"{rows[n]['status_cold']['median']:.2f} / {rows[n]['status_warm']['median']:.2f}"
          for n in sizes]),
        ("status reads, cold (MiB)",
         [mib(rows[n]["status_cold_read"]["median"]) for n in sizes]),
        ("health, cold / warm (s)",
         [f"{rows[n]['health_cold']['median']:.2f} / {rows[n]['health_warm']['median']:.2f}"
          for n in sizes]),
        ("health reads, cold (MiB)",
         [mib(rows[n]["health_cold_read"]["median"]) for n in sizes]),
        ("cache / annotation index / annotation file / JPEGs (MiB)",
         [f"{mib(rows[n]['cache_bytes'])} / "
          f"{mib(rows[n].get('index_bytes') or 0) if rows[n].get('index_bytes') else '–'} / "
          f"{mib(rows[n]['annotation_bytes'])} / {mib(rows[n]['image_bytes'])}"
          for n in sizes]),
        ("words", [str(rows[n].get("words") or "–") for n in sizes]),
    ]
    out = C.md_table(["", *(f"{n:,} images" for n in sizes)],
                     [(name, *vals) for name, vals in lines],
                     title=f"Scale: preset {PRESET}, {SIZE_PX}-px images, ~120 words each")
    out += "\n" + C.md_table(["target", "value", "verdict"], targets(rows), title="Targets")
    return out


def plot(rows: dict[int, dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        C.log("matplotlib is not installed (the `bench` extra): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(rows)
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))

    def line(ax, label, values, **kw):
        xs = [n for n, v in zip(sizes, values) if v is not None]
        ys = [v for v in values if v is not None]
        if ys:
            ax.plot(xs, ys, marker="o", label=label, **kw)

    ax = axes[0][0]
    line(ax, "first construction", [rows[n]["first_construction"]["median"] for n in sizes])
    line(ax, "warm construction", [rows[n]["warm_construction"]["median"] for n in sizes])
    line(ax, "origin-style parse", [(rows[n].get("origin_parse") or {}).get("median")
                                    for n in sizes], linestyle="--")
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_title("construction (s)")
    ax = axes[0][1]
    line(ax, "cold construction", [100 * rows[n]["cold_construction_read"]["median"]
                                   / rows[n]["cache_bytes"] for n in sizes])
    line(ax, "completeness check", [100 * rows[n]["missing_check_read"]["median"]
                                    / rows[n]["cache_bytes"] for n in sizes])
    line(ax, "status (cold)", [100 * rows[n]["status_cold_read"]["median"]
                               / rows[n]["cache_bytes"] for n in sizes])
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_title("share of data.mdb read, cold (%)")
    ax = axes[0][2]
    line(ax, "main", [rows[n]["epoch"]["main"]["anonymous"] / MiB for n in sizes])
    line(ax, "worker (larger)", [max(w["anonymous"] for w in rows[n]["epoch"]["workers"])
                                 / MiB for n in sizes])
    line(ax, "worker private (larger)", [max(w["private"] for w in rows[n]["epoch"]["workers"])
                                         / MiB for n in sizes], linestyle="--")
    ax.set_title("anonymous memory after the epochs (MiB)")
    ax = axes[1][0]
    line(ax, "2 workers, batch 8", [1e3 * rows[n]["epoch"]["per_sample"] for n in sizes])
    ax.set_title("epoch time per sample (ms)")
    ax = axes[1][1]
    for cmd in ("status", "health"):
        for state in ("cold", "warm"):
            line(ax, f"{cmd} ({state})", [rows[n][f"{cmd}_{state}"]["median"] for n in sizes])
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_title("command, process start to exit (s)")
    ax = axes[1][2]
    line(ax, "cache (data.mdb)", [rows[n]["cache_bytes"] / MiB for n in sizes])
    line(ax, "annotation index", [(rows[n].get("index_bytes") or 0) / MiB or None
                                  for n in sizes])
    line(ax, "annotation JSON", [rows[n]["annotation_bytes"] / MiB for n in sizes])
    line(ax, "JPEGs", [rows[n]["image_bytes"] / MiB for n in sizes])
    ax.set_title("disk (MiB)")
    for ax in (a for row in axes for a in row):
        ax.set_xscale("log")
        if ax in (axes[1][0], axes[0][2]):
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("images in the split")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"A growing split: preset {PRESET}, {SIZE_PX}-px images, ~120 words each "
                 "(medians)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    C.log(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="split sizes, comma-separated (default: 1000,10000,100000)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each timed figure")
    p.add_argument("--data", type=Path, default=DATA, help=f"data folder (default {DATA})")
    p.add_argument("--no-origin", action="store_true", help="skip the origin-style parse")
    p.add_argument("--prepare-only", action="store_true",
                   help="synthesize and prebuild, measure nothing")
    p.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    p.add_argument("--epochs-only", action="store_true",
                   help="measure the epochs (time and memory) again, keep the other figures")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result_path = OUT / f"{NAME}.json"
    previous = json.loads(result_path.read_text()) if result_path.exists() else {}
    rows = {int(k): v for k, v in previous.get("sizes", {}).items()}
    if not args.plot_only:
        C.configure(argparse.Namespace(quick=False))
        for n in sizes:
            if args.prepare_only:
                prepare(args.data, n)
                continue
            if args.epochs_only and n in rows:
                images, ann, cache = prepare(args.data, n)
                C.log(f"{n}: epochs ...")
                rows[n]["epoch"] = C.run_isolated(NAME, "m_epoch", images=str(images),
                                                  ann=str(ann), cache=str(cache))
                continue
            rows[n] = run_size(args.data, n, max(1, args.reps), not args.no_origin)
            rows[n]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            rows[n]["library_source"] = C.library_source_hash()
        if args.prepare_only:
            return
    if not rows:
        raise SystemExit("nothing measured yet")
    text = table(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": NAME, "preset": PRESET, "image_px": SIZE_PX, "workers": WORKERS,
               "batch_size": BATCH, "machine": C.machine_info(),
               "sizes": {str(n): rows[n] for n in sorted(rows)},
               "targets": [dict(zip(("target", "value", "verdict"), t))
                           for t in targets(rows)],
               "table_markdown": text}
    result_path.write_text(json.dumps(payload, indent=2, default=C._json_default) + "\n")
    (OUT / f"{NAME}.md").write_text(text)
    print(text)
    plot(rows, OUT / f"{NAME}.png")


if __name__ == "__main__":
    main()
