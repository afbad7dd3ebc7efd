"""The end-to-end example: synthesize → prebuild → read through a multi-worker DataLoader.

    python -m diskcache_ocr.demo [--dir demo-data] [--n 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from diskcache_ocr.dataset import CachedOCRDataset, collate, format_hit_rates
from diskcache_ocr.loader import BatchLoader
from diskcache_ocr.ops import status, verify
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths, synthesize


def _epochs(batches: Iterable[dict[str, Any]], n: int = 2) -> list[float]:
    """Seconds for each of ``n`` epochs over one loader (workers and buffers kept)."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        for _batch in batches:
            pass
        times.append(time.perf_counter() - started)
    return times


def _data_loader(ds: CachedOCRDataset, workers: int) -> DataLoader[Any]:
    return DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0)


def _times(times: list[float], base: float | None = None) -> str:
    out = "".join(f"{t:8.2f} s" for t in times)
    if base is not None:
        out += "   " + ", ".join(f"{base / t:.1f}x" for t in times) + " faster"
    return out


def run_demo(root: Path, *, n: int = 64, workers: int = 2) -> None:
    data, cache = root / "data", root / "cache"
    images, annotations = split_paths(data)
    shutil.rmtree(root, ignore_errors=True)

    t = time.perf_counter()
    s = synthesize(data, n, seed=0, workers=workers)
    print(f"1. synthesized {s.images} receipts ({s.words} words, {s.exif_rotated} with an EXIF "
          f"orientation) in {time.perf_counter() - t:.1f} s -> {images}")

    summary = prebuild(images, annotations, cache, preset="validation_optimized",
                       workers=workers)
    print(f"2. prebuild: {summary.line()}")

    with CacheStore(cache) as store:
        store.reset_stats()  # count only the demo's reads below
    uncached = CachedOCRDataset(images, annotations, None, preset={"load_maps": True})
    base = _epochs(_data_loader(uncached, workers))
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized")
    cached = _epochs(_data_loader(ds, workers))
    with BatchLoader(ds, batch_size=8, threads=workers) as loader:
        batched = _epochs(loader)
    ds.close()  # saves this process's counters for `status` below
    print(f"3. two epochs of {len(ds)} samples (image + 4 DBNet maps, batch 8) on each loader; "
          "the first also starts\n   its workers and fills fresh batch memory:")
    rows = [(f"no cache, {workers}-worker DataLoader", base, None),
            (f"cached, {workers}-worker DataLoader", cached, min(base)),
            (f"cached, BatchLoader ({workers} copy threads)", batched, min(base))]
    print(f"     {'':38s}  epoch 1   epoch 2")
    for label, times, against in rows:
        print(f"     {label:38s}" + _times(times, against))

    st = status(cache)
    print(f"4. what the cache did: {format_hit_rates(st['stats'])}")
    for kind, k in st["kinds"].items():
        print(f"     {kind:8s} {k['entries']:5d} records  {k['bytes'] / 2**20:8.1f} MiB")
    check = verify(cache, sample=8, recompute=4, annotations=annotations)
    print(f"5. verify: {check['checked']} records decoded, {len(check['corrupt'])} corrupt; "
          f"{check['recomputed']} sources recomputed from scratch, "
          f"{len(check['mismatched'])} differ (cached == fresh, bit for bit)")
    print(f"\nTry: diskcache-ocr status --cache {cache}    diskcache-ocr health --cache {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-data"))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    run_demo(args.dir, n=args.n, workers=args.workers)


if __name__ == "__main__":
    main()
