"""DataLoader scaling: samples/s and summed PSS per worker count, uncached against cached.

    python benchmarks/scaling.py --workers 1,2            # this 2-core machine
    python benchmarks/scaling.py --workers 1,2,4,8,16     # a 16-core machine

Modes (each in a fresh interpreter, persistent workers, batch 8, ``diskcache_ocr.collate``):

* ``uncached``: ``CachedOCRDataset(preset={"load_maps": True})`` — decode, transform, maps.
* ``cached``: ``validation_optimized`` over a prebuilt cache — the same samples from LMDB.
* ``cached+BatchLoader``: where ``diskcache_ocr.loader.BatchLoader`` exists, the
  main-process batched reader with ``threads`` = the worker count (no worker processes).

After a warm-up of ``2 × workers`` batches, every repetition is one full epoch; memory is the
peak of the summed PSS of the main process and its workers during one more epoch, untimed
(sampling walks page tables and would slow the timed epochs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NAME = "scaling"
BATCH = 8
MODES = ("uncached", "cached", "cached+BatchLoader")


def measure(mode: str, workers: int, images: str, ann: str, cache: str, reps: int
            ) -> dict[str, Any]:
    """Warm-up, then ``reps`` timed epochs of one loader (run in a fresh interpreter)."""
    import itertools

    from diskcache_ocr import CachedOCRDataset

    with C.quiet_logging():
        if mode == "uncached":
            ds = CachedOCRDataset(images, ann, None, preset={"load_maps": True})
        else:
            ds = CachedOCRDataset(images, ann, cache, preset="validation_optimized",
                                  preload=False)
        if mode == "cached+BatchLoader":
            from diskcache_ocr.loader import BatchLoader

            loader: Any = BatchLoader(ds, batch_size=BATCH, threads=workers)
        else:
            loader = C.data_loader(ds, workers, batch_size=BATCH)
        for _ in itertools.islice(iter(loader), 2 * max(1, workers)):
            pass
        epochs = []
        for _ in range(reps):
            seconds, seen = C.run_epoch(loader)
            assert seen == len(ds), (seen, len(ds))
            epochs.append(seconds)
        # Memory in one more, untimed epoch: sampling smaps walks every process's page
        # tables and would slow the timed ones (the more so the more is mapped).
        with C.MemorySampler() as mem:
            C.run_epoch(loader)
        del loader
        ds.close()
    return {"epochs": epochs, "samples_per_s": [len(ds) / s for s in epochs],
            "mem": mem.result()}


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    default_workers = ",".join(str(w) for w in (1, 2, 4, 8, 16)
                               if w <= max(2, os.cpu_count() or 1))
    parser.add_argument("--workers", default=default_workers,
                        help=f"comma-separated worker counts (default here: {default_workers})")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    n, reps, images, ann, cache = C.prebuilt_set(args)
    C.warm_file(cache / "data.mdb")
    counts = [int(w) for w in args.workers.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if "cached+BatchLoader" in modes:
        import importlib.util

        if importlib.util.find_spec("diskcache_ocr.loader") is None:
            modes.remove("cached+BatchLoader")
            C.log("no diskcache_ocr.loader.BatchLoader: that mode is skipped")
    res: dict[str, dict[str, Any]] = {}
    for mode in modes:
        for w in counts:
            C.log(f"{mode}, {w} workers")
            res.setdefault(mode, {})[str(w)] = C.run_isolated(
                "scaling", "measure", mode=mode, workers=w, images=images, ann=ann,
                cache=cache, reps=reps)
    stats = {mode: {w: {"samples_per_s": C.summary(r["samples_per_s"]),
                        "epoch": C.summary(r["epochs"]), "mem": r["mem"]}
                    for w, r in per.items()} for mode, per in res.items()}
    rows = []
    for mode, per in stats.items():
        for w, st in per.items():
            sps = st["samples_per_s"]
            unc = stats.get("uncached", {}).get(w)
            speed = (f"{sps['median'] / unc['samples_per_s']['median']:.1f}×"
                     if unc and mode != "uncached" else "")
            mem = st["mem"]
            rows.append([mode, w, f"{sps['median']:.0f} [{sps['min']:.0f}–{sps['max']:.0f}]",
                         speed, f"{mem['pss_peak'] / 2**20:.0f} MiB",
                         f"{mem['pss_anon_peak'] / 2**20:.0f} MiB",
                         f"{mem['pss_file_peak'] / 2**20:.0f} MiB", mem["processes"]])
    table = C.md_table(
        ["mode", "workers (threads for BatchLoader)", "samples/s, median [min–max]",
         "÷ uncached", "PSS peak (sum)", "Pss_Anon", "Pss_File", "processes"], rows,
        title=f"Scaling: {n} images, batch {BATCH}, {reps} timed epochs each after a warm-up, "
              f"{os.cpu_count()} cores")
    payload = {"images": n, "batch_size": BATCH, "reps": reps, "workers": counts,
               "modes": stats, "pid": os.getpid()}
    C.write_result(NAME, payload, table)
    return payload


if __name__ == "__main__":
    main()
