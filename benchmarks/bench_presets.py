"""Epoch 0 / epoch 1 time and memory per performance preset, against no cache.

For each preset: a fresh cache directory, ``CachedOCRDataset(..., preload=False)`` (so epoch 0
fills the cache read-through), a 2-worker persistent ``DataLoader`` (batch 8,
``collate_fn=diskcache_ocr.collate``), two epochs timed; the summed PSS and anonymous memory of
the main process and its workers are sampled (every 50 ms) during a third, untimed epoch
(sampling reads every process's page tables, which would slow a timed epoch).

The "no cache" baselines are the uncached pipeline with the same outputs: ``none`` (image
only) for presets without maps, and ``none + load_maps`` for ``validation_optimized``.
``validation_optimized`` also reports, separately: the time of ``preload=True`` (build in
this process + warm the page cache), epoch 0 after that preload, and ``prebuild`` with 2
workers.

Targets: validation_optimized epoch 1 ≥ 10× faster than no cache; epoch 0
(read-through) ≤ 1.10× no cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NAME = "presets"
PRESETS = ("none", "minimal", "balanced", "validation_optimized", "memory_efficient")
NO_CACHE_MAPS = "none + load_maps"  # the uncached pipeline that also returns maps
WORKERS = 2
BATCH = 8


def preset_arg(name: str) -> Any:
    return {"load_maps": True} if name == NO_CACHE_MAPS else name


def disk_bytes(cache: Path) -> int:
    f = cache / "data.mdb"
    return f.stat().st_blocks * 512 if f.exists() else 0


def two_epochs(images: str, ann: str, cache: str, preset: Any, workers: int = WORKERS,
               preload: bool = False) -> dict[str, Any]:
    """Two epochs of one fresh dataset (run in a fresh interpreter by ``main``)."""
    from diskcache_ocr import CachedOCRDataset

    with C.quiet_logging():
        ds = CachedOCRDataset(images, ann, cache, preset=preset, preload=preload)
        loader = C.data_loader(ds, workers, batch_size=BATCH)
        # NOTE: the timed epochs run without the memory sampler (reading smaps_rollup of a
        # process that maps the cache walks its page tables, which steals CPU from a fast
        # epoch); memory is sampled during a third, untimed epoch.
        e0, n0 = C.run_epoch(loader)
        e1, n1 = C.run_epoch(loader)
        with C.MemorySampler() as mem2:
            C.run_epoch(loader)
        assert n0 == n1 == len(ds), (n0, n1, len(ds))
        del loader  # stops the persistent workers
        ds.close()
    return {"epoch0": e0, "epoch1": e1, "mem2": mem2.result(),
            "disk_bytes": disk_bytes(Path(cache))}


def build_then_epochs(images: str, ann: str, cache: str) -> dict[str, Any]:
    """validation_optimized: time ``preload=True``, then two epochs; then prebuild (2 workers)
    into a second fresh directory."""
    import time

    from diskcache_ocr import CachedOCRDataset
    from diskcache_ocr.prebuild import prebuild

    with C.quiet_logging():
        started = time.perf_counter()
        ds = CachedOCRDataset(images, ann, cache, preset="validation_optimized", preload=True)
        preload_s = time.perf_counter() - started
        ds.close()
        r = two_epochs(images, ann, cache, "validation_optimized")
        other = Path(cache) / "prebuilt"
        s = prebuild(images, ann, other, preset="validation_optimized", workers=WORKERS,
                     progress=False)
    return {"preload": preload_s, "epoch0_after_preload": r["epoch0"],
            "prebuild_2_workers": s.seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="comma-separated presets to run")
    args = parser.parse_args(argv)
    C.configure(args)
    n = C.n_images(args)
    reps = C.reps(args)
    _, images, ann = C.dataset_root(n)
    configs = ["none", NO_CACHE_MAPS] + [p for p in args.presets.split(",") if p != "none"]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    extra: dict[str, list[float]] = {"preload": [], "epoch0_after_preload": [],
                                     "prebuild_2_workers": []}
    for rep in range(reps):  # interleaved: machine noise spreads over every preset
        for cfg in configs:
            cache = C.scratch_dir("presets-")
            try:
                C.log(f"rep {rep + 1}/{reps}: {cfg}")
                runs[cfg].append(C.run_isolated(
                    "bench_presets", "two_epochs", images=images, ann=ann, cache=cache,
                    preset=preset_arg(cfg)))
            finally:
                C.remove(cache)
        if "validation_optimized" in configs:
            cache = C.scratch_dir("presets-preload-")
            try:
                C.log(f"rep {rep + 1}/{reps}: validation_optimized preload / prebuild")
                r = C.run_isolated("bench_presets", "build_then_epochs", images=images,
                                   ann=ann, cache=cache)
                for k in extra:
                    extra[k].append(r[k])
            finally:
                C.remove(cache)

    stats: dict[str, dict[str, Any]] = {}
    for cfg, rs in runs.items():
        stats[cfg] = {
            "epoch0": C.summary([r["epoch0"] for r in rs]),
            "epoch1": C.summary([r["epoch1"] for r in rs]),
            "mem_epoch2": C.mem_summary(r["mem2"] for r in rs),
            "disk_bytes": C.summary([r["disk_bytes"] for r in rs]),
        }
    extra_stats = {k: C.summary(v) for k, v in extra.items() if v}

    def baseline(cfg: str) -> str:
        if cfg in ("none", NO_CACHE_MAPS):
            return cfg
        return NO_CACHE_MAPS if _load_maps(cfg) else "none"

    rows = []
    targets: dict[str, Any] = {}
    for cfg in configs:
        st, base = stats[cfg], stats[baseline(cfg)]
        e0_ratio = C.ratio(st["epoch0"], base["epoch0"])
        speedup = C.ratio(base["epoch1"], st["epoch1"])
        st["baseline"] = baseline(cfg)
        st["epoch0_ratio_to_no_cache"] = e0_ratio
        st["epoch1_speedup_vs_no_cache"] = speedup
        mem = st["mem_epoch2"]
        note = ""
        if cfg == "validation_optimized":
            targets["validation_optimized epoch 1 speedup vs no cache"] = {
                "target": "≥ 10×", "value": speedup,
                "met": C.verdict(speedup, 10.0, "higher") == "met"}
            targets["validation_optimized epoch 0 (read-through) ÷ no cache"] = {
                "target": "≤ 1.10×", "value": e0_ratio,
                "met": C.verdict(e0_ratio, 1.10) == "met"}
            note = (f"e1 speedup {C.verdict(speedup, 10.0, 'higher')} (≥10×); "
                    f"e0 {C.verdict(e0_ratio, 1.10)} (≤1.10×)")
        rows.append([
            cfg, st["baseline"], C.fmt_s(st["epoch0"]), C.fmt_s(st["epoch1"]),
            C.fmt_x(e0_ratio), C.fmt_x(speedup, 1),
            C.fmt_mib(mem.get("pss_peak")), C.fmt_mib(mem.get("anon_peak")),
            f"{st['disk_bytes']['median'] / 2**20:.0f} MiB", note,
        ])
    table = C.md_table(
        ["preset", "baseline", "epoch 0", "epoch 1", "e0 ÷ baseline e0",
         "speedup e1 (baseline e1 ÷ e1)", "PSS peak, epoch 2 (sum)",
         "anon peak, epoch 2 (sum)",
         "cache on disk", "targets"], rows,
        title=f"Presets: {n} images, DataLoader {WORKERS} workers (persistent), batch {BATCH}, "
              f"{reps} reps, median [min–max]")
    if extra_stats:
        vo_e1 = stats.get("validation_optimized", {}).get("epoch1")
        rows2 = [
            ["preload=True (build in one process + warm)", C.fmt_s(extra_stats.get("preload"))],
            ["epoch 0 after preload", C.fmt_s(extra_stats.get("epoch0_after_preload"))],
            ["prebuild, 2 workers", C.fmt_s(extra_stats.get("prebuild_2_workers"))],
            ["(epoch 1, for reference)", C.fmt_s(vo_e1)],
        ]
        table += "\n" + C.md_table(["validation_optimized, build separately", "seconds"], rows2)
    C.bar_chart(C.RESULTS / "epochs.png", configs,
                {"epoch 0": [stats[c]["epoch0"] for c in configs],
                 "epoch 1": [stats[c]["epoch1"] for c in configs]},
                title=f"Epoch time per preset: {n} images, DataLoader {WORKERS} workers, "
                      f"batch {BATCH}, {reps} reps ({os.cpu_count()} cores)")
    payload = {"images": n, "workers": WORKERS, "batch_size": BATCH, "reps": reps,
               "presets": stats, "validation_optimized_build": extra_stats, "targets": targets,
               "pid": os.getpid()}
    C.write_result(NAME, payload, table)
    return payload


def _load_maps(preset: str) -> bool:
    from diskcache_ocr import load_preset

    return load_preset(preset).load_maps


if __name__ == "__main__":
    main()
