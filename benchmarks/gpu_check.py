"""GPU check: how much of a small DBNet-style model's in-GPU rate each way of feeding it keeps.

    python benchmarks/gpu_check.py              # a CUDA machine; a few minutes on 16 cores
    python benchmarks/gpu_check.py --dry-run    # any machine: tiny sizes on the CPU

First the model's training-step rate on synthetic batches already on the device, then the
same step fed by
  (a) the uncached pipeline through a DataLoader with N workers (pinned),
  (b) a stock DataLoader over the cache, float32 samples (pinned),
  (c) a stock DataLoader over the cache, compact samples (pinned), moved to the device and
      made float32 there by ``finish_batch``, where Lightning's ``on_after_batch_transfer``
      runs it,
  (d) BatchLoader with the device,
each as a fraction of the in-GPU rate (target for (c) and (d): ≥ 0.95). It also checks that
(c)'s batches equal (b)'s bit for bit on that device. Writes benchmarks/results/gpu.json
(``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import DBNetLike, make_step  # noqa: E402
from common import machine_info  # noqa: E402

from diskcache_ocr import BatchLoader, CachedOCRDataset, collate, finish_batch  # noqa: E402
from diskcache_ocr.ocr.maps import MAP_NAMES  # noqa: E402
from diskcache_ocr.ocr.transform import TransformConfig  # noqa: E402
from diskcache_ocr.synth import split_paths, synthesize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("image", *MAP_NAMES, "inverse_matrix")


def forever(make: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Epoch after epoch of one loader (its workers persist)."""
    feed = make()
    while True:
        yield from feed


def finished_on(loader: Iterable[dict[str, Any]], device: torch.device
                ) -> Iterator[dict[str, Any]]:
    """Each compact batch moved to ``device``, then finished there (Lightning's order:
    transfer, then ``on_after_batch_transfer``)."""
    for batch in loader:
        yield finish_batch(batch, device)


def rate(step: Callable[[dict[str, Any]], None], feed: Iterator[Any], steps: int,
         batch_size: int, device: torch.device) -> float:
    step(next(feed))  # warm-up: workers start, cudnn picks its kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for batch in itertools.islice(feed, steps):
        step(batch)
    sync()
    return steps * batch_size / (time.perf_counter() - started)


def same_batches(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()) for k in FIELDS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU: checks the script runs, measures nothing")
    p.add_argument("--n", type=int, default=256, help="images to synthesize")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed steps per feed")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--data", type=Path, default=Path("/tmp/diskcache-ocr-gpu-check"))
    p.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = p.parse_args(argv)
    size = 640
    if args.dry_run:
        args.n, args.batch_size, args.steps, args.reps = 6, 2, 2, 1
        args.workers, args.threads, size = 2, 2, 32
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a shared small CPU: spinning intra-op threads dominate
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        p.error("no CUDA device; use --dry-run to check the script on the CPU")
    data = args.data / f"synth-{args.n}"
    if not split_paths(data)[1].exists():
        synthesize(data, args.n, seed=0, workers=min(8, os.cpu_count() or 1),
                   **({"size": (120, 160), "min_words": 2, "max_words": 6}
                      if args.dry_run else {}))
    images, ann = split_paths(data)
    transform = TransformConfig(size=size)
    cache = data / f"cache-{size}"

    def dataset(cache_dir: Path | None, preset: Any, output: str) -> CachedOCRDataset:
        return CachedOCRDataset(images, ann, cache_dir, preset=preset, transform=transform,
                                output=output)  # type: ignore[arg-type]

    started = time.perf_counter()
    ds32 = dataset(cache, "validation_optimized", "float32")  # builds what is missing
    build_s = time.perf_counter() - started
    dsc = dataset(cache, "validation_optimized", "compact")
    uncached = dataset(None, {"load_maps": True}, "float32")
    bs, w = args.batch_size, args.workers
    pin = device.type == "cuda"

    def stock(ds: CachedOCRDataset) -> DataLoader:
        return DataLoader(ds, bs, shuffle=True, num_workers=w, collate_fn=collate,
                          pin_memory=pin, drop_last=True, persistent_workers=True)

    indices = list(range(bs))
    exact = same_batches(finish_batch(collate(dsc.__getitems__(indices)), device),
                         {k: v.to(device) for k, v in collate(ds32.__getitems__(indices)).items()
                          if isinstance(v, torch.Tensor)})

    model = DBNetLike().to(device).to(memory_format=torch.channels_last)
    step = make_step(model, device)
    synthetic = {"image": torch.randn(bs, 3, size, size, device=device),
                 **{k: torch.rand(bs, 1, size, size, device=device).round() for k in MAP_NAMES}}
    feeds: dict[str, Callable[[], Iterator[Any]]] = {
        "in-GPU (synthetic batches on the device)": lambda: itertools.repeat(synthetic),
        f"(a) uncached, DataLoader {w} workers": lambda: forever(lambda: stock(uncached)),
        f"(b) cached float32, stock DataLoader {w} workers": lambda: forever(
            lambda: stock(ds32)),
        f"(c) cached compact, stock DataLoader {w} workers + finish_batch on the device":
            lambda: forever(lambda: finished_on(stock(dsc), device)),
        f"(d) BatchLoader, {args.threads} threads": lambda: forever(lambda: BatchLoader(
            dsc, bs, shuffle=True, threads=args.threads, device=device, drop_last=True)),
    }
    rates: dict[str, float] = {}
    for name, make in feeds.items():
        runs = []
        for _ in range(args.reps):
            feed = make()
            runs.append(rate(step, feed, args.steps, bs, device))
            del feed
        rates[name] = statistics.median(runs)
    base = rates["in-GPU (synthetic batches on the device)"]
    result = {
        "dry_run": args.dry_run, "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "machine": machine_info(), "images": args.n, "size": size, "batch_size": bs,
        "workers": w, "steps": args.steps, "reps": args.reps, "build_s": build_s,
        "compact_finish_equals_float32": exact,
        "feeds": {k: {"images_per_s": v, "fraction_of_in_gpu": v / base}
                  for k, v in rates.items()},
        "target": "(c) and (d) >= 0.95 of the in-GPU rate",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| feed | images/s | fraction of in-GPU |\n|---|---|---|")
    for k, v in result["feeds"].items():
        print(f"| {k} | {v['images_per_s']:.1f} | {v['fraction_of_in_gpu']:.2f} |")
    print(f"compact + finish_batch equals float32 bit for bit on {device}: {exact}")
    return result


if __name__ == "__main__":
    main()
