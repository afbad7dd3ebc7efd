"""Prebuild throughput (images/s) with 1 and 2 worker processes, and the share spent writing.

Each repetition builds the ``validation_optimized`` kinds (images, tensors, maps) of the whole
synthetic set into a fresh cache directory. ``BuildSummary.write_seconds`` is the time spent
inside write transactions, summed over the worker processes; its share is reported against
the process time available (wall seconds × workers). Records are encoded inside the write
transaction (into a reused buffer), so encoding is in ``write_seconds``.

It also measures what bounds any write path on the machine: the rate at which the kernel
takes new bytes into the page cache (``pwrite`` in 62 MB pieces, one batch's worth, growing a
file to the 1.5 GB an epoch 0 writes) against overwriting pages it already holds. On a VM that
reports free memory to its host (free page reporting), pages that stayed free have been given
back, and taking them again costs a host fault each: the rate drops once recently freed
memory is used up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NAME = "prebuild"
CHUNK = 62 << 20  # one batch of 8 validation_optimized images
CHUNKS = 24  # ~1.5 GB: what epoch 0 of the 200-image set writes


def page_cache_rates() -> dict[str, float]:
    """MB/s for writing CHUNKS × CHUNK bytes to a new file region (the first quarter, and the
    last half: once recently freed memory is used up), then over the same pages again."""
    import time

    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
    path = C.scratch_dir("pagecache-") / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        times = []
        for i in range(CHUNKS):
            started = time.perf_counter()
            os.pwrite(fd, data, i * CHUNK)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(CHUNKS):
            os.pwrite(fd, data, i * CHUNK)
        over = time.perf_counter() - started
    finally:
        os.close(fd)
        C.remove(path.parent)
    q, h = CHUNKS // 4, CHUNKS // 2
    return {"new pages, first quarter": q * CHUNK / sum(times[:q]) / 1e6,
            "new pages, last half": h * CHUNK / sum(times[-h:]) / 1e6,
            "pages already cached (overwrite)": CHUNKS * CHUNK / over / 1e6}


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--preset", default="validation_optimized")
    args = parser.parse_args(argv)
    C.configure(args)
    from diskcache_ocr.prebuild import prebuild

    n = C.n_images(args)
    reps = C.reps(args)
    _, images, ann = C.dataset_root(n)
    counts = [int(w) for w in args.workers.split(",")]
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    with C.quiet_logging():
        for rep in range(reps):
            for w in counts:
                cache = C.scratch_dir("prebuild-")
                try:
                    C.log(f"rep {rep + 1}/{reps}: {w} worker(s)")
                    s = prebuild(images, ann, cache, preset=args.preset, workers=w,
                                 progress=False)
                    assert s.built == n and not s.failed, s.line()
                    f = cache / "data.mdb"
                    runs[w].append({"seconds": s.seconds, "write_seconds": s.write_seconds,
                                    "items_per_s": s.built / s.seconds,
                                    "write_share": s.write_seconds / (s.seconds * w),
                                    "disk_bytes": f.stat().st_blocks * 512})
                finally:
                    C.remove(cache)
    stats = {w: {k: C.summary([r[k] for r in rs]) for k in rs[0]} for w, rs in runs.items()}
    rows = []
    for w, st in stats.items():
        ips = st["items_per_s"]
        mb_s = n * (st["disk_bytes"]["median"] / n) / st["seconds"]["median"] / 1e6
        rows.append([
            w, f"{ips['median']:.1f} [{ips['min']:.1f}–{ips['max']:.1f}]", C.fmt_s(st["seconds"]),
            C.fmt_s(st["write_seconds"]),
            f"{100 * st['write_share']['median']:.0f} % [{100 * st['write_share']['min']:.0f}–"
            f"{100 * st['write_share']['max']:.0f}]",
            f"{st['disk_bytes']['median'] / n / 1e6:.1f} MB", f"{mb_s:.0f} MB/s",
        ])
    scaling = None
    if 1 in stats and 2 in stats:
        scaling = stats[2]["items_per_s"]["median"] / stats[1]["items_per_s"]["median"]
    table = C.md_table(
        ["workers", "images/s", "wall", "write_seconds (sum over processes)",
         "share of process time writing", "bytes per image", "cache write rate"], rows,
        title=f"Prebuild ({args.preset}): {n} images, {reps} reps, median [min–max]"
              + (f"; 2 workers ÷ 1 worker = {scaling:.2f}×" if scaling else ""))
    rates = [page_cache_rates() for _ in range(reps)]
    rate_stats = {k: C.summary([r[k] for r in rates]) for k in rates[0]}
    table += "\n\n" + C.md_table(
        [f"page-cache write, {CHUNKS} × 62 MB pwrite", "MB/s, median [min–max]"],
        [[k, f"{st['median']:.0f} [{st['min']:.0f}–{st['max']:.0f}]"]
         for k, st in rate_stats.items()])
    payload = {"images": n, "preset": args.preset, "reps": reps,
               "page_cache_mb_s": rate_stats,
               "workers": {str(w): st for w, st in stats.items()},
               "speedup_2_vs_1": scaling, "pid": os.getpid()}
    C.write_result(NAME, payload, table)
    return payload


if __name__ == "__main__":
    main()
