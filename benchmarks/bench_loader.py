"""Batched loader vs a stock DataLoader over the same cache, and (with CUDA) feeding a GPU.

    python benchmarks/bench_loader.py [--n 200] [--batch-size 16] [--workers 0,1,2] [--reps 3]

CPU part (any machine): images/s and GB/s of
  * BatchLoader (one transaction per batch, threads copying views into reusable buffers),
  * a stock DataLoader over the same cached dataset, for each worker count,
  * the memcpy limit: np.copyto of the same batch bytes into preallocated buffers.
GPU part (only when CUDA is present): images/s of a small DBNet-style training step
(ResNet-18-like features, FPN, DB head, bf16) fed by (a) synthetic data already on the GPU,
(b) the uncached DataLoader, (c) the cached stock DataLoader, (d) the batched loader with
float32 records and with compact records. Target: (d) >= 95 % of (a).
Writes benchmarks/results/loader.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine_info  # benchmarks/common.py, beside this file
from torch import nn
from torch.utils.data import DataLoader

from diskcache_ocr.dataset import CachedOCRDataset, collate
from diskcache_ocr.loader import BatchLoader
from diskcache_ocr.ocr.maps import MAP_NAMES
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.synth import split_paths, synthesize

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def epochs(loader: Any, reps: int) -> dict[str, float]:
    """Timed epochs after one warm-up epoch (page cache, buffers, worker start)."""
    for _ in loader:
        pass
    return timed(lambda: sum(1 for _ in loader), reps)


def batch_bytes(ds: CachedOCRDataset, batch_size: int) -> int:
    size = ds.pipeline.transform.size
    per = 3 * size * size * 4 + (len(MAP_NAMES) * size * size * 4 if ds.load_maps else 0)
    return per * batch_size


def memcpy_limit(ds: CachedOCRDataset, batch_size: int, n: int, reps: int) -> dict[str, float]:
    nbytes = batch_bytes(ds, batch_size)
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    dst[:] = 0  # touch once: the limit is for reused buffers
    batches = n // batch_size

    def run() -> None:
        for _ in range(batches):
            np.copyto(dst, src)

    return timed(run, reps)


def cpu_part(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    images, ann = split_paths(data)
    out: dict[str, Any] = {}
    for label, transform in (("float32", TransformConfig(output="float32")),
                             ("compact", TransformConfig(output="compact"))):
        cache = data / f"cache-{label}"
        prebuild(images, ann, cache, preset="validation_optimized", workers=2, progress=False,
                 transform=transform)
        ds = CachedOCRDataset(images, ann, cache, preset="validation_optimized",
                              transform=transform, preload=False)
        n = (len(ds) // args.batch_size) * args.batch_size
        gb = batch_bytes(ds, args.batch_size) * (n // args.batch_size) / 1e9
        rows: dict[str, Any] = {}
        with BatchLoader(ds, batch_size=args.batch_size, threads=args.threads,
                         drop_last=True) as batched:
            rows["batched loader"] = epochs(batched, args.reps)
        for w in args.workers:
            stock = DataLoader(ds, batch_size=args.batch_size, num_workers=w,
                               collate_fn=collate, drop_last=True, persistent_workers=w > 0)
            rows[f"DataLoader, {w} workers"] = epochs(stock, args.reps)
            del stock
        rows["memcpy limit"] = memcpy_limit(ds, args.batch_size, n, args.reps)
        limit = rows["memcpy limit"]["median"]
        for r in rows.values():
            r["images_per_s"] = n / r["median"]
            r["gb_per_s"] = gb / r["median"]
            r["vs_memcpy"] = limit / r["median"]
        out[label] = {"images": n, "rows": rows}
        if label == "compact":
            out["host fill"] = host_fill(ds, args.batch_size, args.threads, n, args.reps)
    return out


def host_fill(ds: CachedOCRDataset, batch_size: int, threads: int, n: int, reps: int
              ) -> dict[str, Any]:
    """The host's work per sample when the batched loader feeds a device: filling one batch
    buffer (read transaction, copies), with the image and maps finished on the CPU vs left
    in their stored uint8 for the device. Measurable without a device: the fill is all host."""
    batches = [list(range(i, i + batch_size)) for i in range(0, n, batch_size)]
    out: dict[str, Any] = {}
    for label, device in (("finished on the CPU (no device)", None),
                          ("left for the device: uint8 image and binary maps", "cpu")):
        with BatchLoader(ds, batch_size=batch_size, threads=threads, device=device) as loader:
            loader._ensure_resources()  # (internal: the producer's fill alone, no consumer)
            slot = loader._slots[0]

            def run(loader: BatchLoader = loader, slot: Any = slot) -> dict[str, Any]:
                for b in batches:
                    batch = loader._fill(slot, b)
                return batch

            first = run()  # warm-up: page cache, buffer pages (made at the first fill)
            tensors = [v for v in first.values() if isinstance(v, torch.Tensor)]
            r = timed(run, reps)
        r["ms_per_sample"] = r["median"] / n * 1e3
        r["bytes_per_sample"] = sum(t.numel() * t.element_size() for t in tensors) / batch_size
        out[label] = r
    return out


# -- GPU part ---------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                     else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class DBNetLike(nn.Module):
    """ResNet-18-shaped features, an FPN and a DB head (probability + threshold)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        chans, self.stages = [64, 128, 256, 512], nn.ModuleList()
        cin = 64
        for i, c in enumerate(chans):
            self.stages.append(nn.Sequential(Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)))
            cin = c
        self.lateral = nn.ModuleList([nn.Conv2d(c, 64, 1) for c in chans])
        self.smooth = nn.ModuleList([nn.Conv2d(64, 64, 3, 1, 1) for _ in chans])

        def head() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(256, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                 nn.ReLU(), nn.ConvTranspose2d(64, 64, 2, 2),
                                 nn.BatchNorm2d(64), nn.ReLU(), nn.ConvTranspose2d(64, 1, 2, 2))

        self.prob, self.thresh = head(), head()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        ps = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(ps) - 2, -1, -1):
            ps[i] = ps[i] + nn.functional.interpolate(ps[i + 1], size=ps[i].shape[-2:])
        size = ps[0].shape[-2:]
        fused = torch.cat([nn.functional.interpolate(s(p), size=size)
                           for s, p in zip(self.smooth, ps)], 1)
        return self.prob(fused), self.thresh(fused)


def make_step(model: nn.Module, device: torch.device) -> Callable[[dict[str, Any]], None]:
    """One DBNet-style training step of ``model`` on a batch (moved to ``device``; bfloat16
    autocast on CUDA): BCE on the probability map, L1 on the threshold map, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cuda = device.type == "cuda"

    def step(batch: dict[str, Any]) -> None:
        x = batch["image"].to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        maps = {k: batch[k].to(device, non_blocking=True) for k in MAP_NAMES}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            p, t = model(x)
        p, t = p.float(), t.float()
        loss = (nn.functional.binary_cross_entropy_with_logits(
            p, maps["prob_map"], weight=maps["prob_mask"])
            + (torch.abs(torch.sigmoid(t) - maps["thresh_map"]) * maps["thresh_mask"]).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def gpu_part(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    device = torch.device("cuda")
    model = DBNetLike().to(device).to(memory_format=torch.channels_last)
    step = make_step(model, device)

    images, ann = split_paths(data)
    ds32 = CachedOCRDataset(images, ann, data / "cache-float32", preset="validation_optimized",
                            transform=TransformConfig(output="float32"), preload=False)
    dsc = CachedOCRDataset(images, ann, data / "cache-compact", preset="validation_optimized",
                           transform=TransformConfig(output="compact"), preload=False)
    uncached = CachedOCRDataset(images, ann, None, preset={"load_maps": True})
    workers = max(1, (os.cpu_count() or 2) - 1)
    bs = args.batch_size
    size = ds32.pipeline.transform.size
    synthetic = {"image": torch.randn(bs, 3, size, size, device=device),
                 **{k: torch.rand(bs, 1, size, size, device=device).round() for k in MAP_NAMES}}

    def run(feed, steps: int) -> float:
        it = iter(feed)
        step(next(it))  # warm-up (cudnn autotune, workers start)
        torch.cuda.synchronize()
        t, done = time.perf_counter(), 0
        for batch in it:
            step(batch)
            done += 1
            if done >= steps:
                break
        torch.cuda.synchronize()
        return done * bs / (time.perf_counter() - t)

    def repeat(make_feed) -> float:
        return statistics.median(run(make_feed(), args.gpu_steps) for _ in range(args.reps))

    rows = {
        "(a) synthetic, on the GPU": repeat(lambda: iter(lambda: synthetic, None)),
        "(b) uncached DataLoader": repeat(lambda: DataLoader(
            uncached, bs, shuffle=True, num_workers=workers, collate_fn=collate,
            pin_memory=True, drop_last=True)),
        "(c) cached stock DataLoader": repeat(lambda: DataLoader(
            ds32, bs, shuffle=True, num_workers=workers, collate_fn=collate, pin_memory=True,
            drop_last=True)),
        "(d) batched loader, float32": repeat(lambda: BatchLoader(
            ds32, bs, shuffle=True, threads=args.threads, device=device, drop_last=True)),
        "(d) batched loader, compact": repeat(lambda: BatchLoader(
            dsc, bs, shuffle=True, threads=args.threads, device=device, drop_last=True)),
    }
    base = rows["(a) synthetic, on the GPU"]
    return {k: {"images_per_s": v, "vs_synthetic": v / base} for k, v in rows.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images to synthesize")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="0,1,2", help="stock DataLoader worker counts")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gpu-steps", type=int, default=40)
    p.add_argument("--data", type=Path, default=Path("/tmp/diskcache-ocr-bench-loader"))
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    data = args.data
    if not split_paths(data)[1].exists():
        synthesize(data, args.n, seed=0, workers=min(4, os.cpu_count() or 1))
    info = machine_info()
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result: dict[str, Any] = {"machine": info, "batch_size": args.batch_size,
                              "cpu": cpu_part(args, data)}
    if torch.cuda.is_available():
        result["gpu"] = gpu_part(args, data)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader.json").write_text(json.dumps(result, indent=2))
    fill = result["cpu"].pop("host fill")
    for label, part in result["cpu"].items():
        print(f"\n{label} records, {part['images']} images, batch {args.batch_size}:\n")
        print("| reader | images/s | GB/s | vs memcpy limit | spread (s) |")
        print("|---|---|---|---|---|")
        for name, r in part["rows"].items():
            print(f"| {name} | {r['images_per_s']:.0f} | {r['gb_per_s']:.2f} | "
                  f"{r['vs_memcpy']:.2f} | {r['min']:.3f}–{r['max']:.3f} |")
    result["cpu"]["host fill"] = fill
    print(f"\nHost work per sample feeding a device (compact records, {args.threads} copy "
          "threads):\n")
    print("| batch buffers | ms per sample | MB per sample | spread (s) |\n|---|---|---|---|")
    for name, r in fill.items():
        print(f"| {name} | {r['ms_per_sample']:.2f} | {r['bytes_per_sample'] / 1e6:.1f} | "
              f"{r['min']:.3f}–{r['max']:.3f} |")
    if "gpu" in result:
        print("\n| GPU feed | images/s | vs synthetic |\n|---|---|---|")
        for name, r in result["gpu"].items():
            print(f"| {name} | {r['images_per_s']:.0f} | {r['vs_synthetic']:.2f} |")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
