"""The user's own pipeline through the cache against the same pipeline uncached.

Validation, origin-style: the origin's albumentations val transform + origin-convention maps;
a cached epoch (2 DataLoader workers, every kind prebuilt, loaded the dataset's own way:
``__getitems__`` and its ``collate_fn``) against the plain uncached pipeline (PIL decode, the
Compose, the maps; torch's default collate) in the same loader settings. Training, origin-style: the
train transform (deterministic LongestMaxSize + PadIfNeeded prefix, then random flips and
colour) with maps made live after it; the prefix's output cached, against the whole thing
uncached. Per-sample costs of decode, prefix, rest and maps are timed in-process. Each
pipeline is checked equal to the uncached one in an untimed epoch of its own (timed epochs
drop their batches, as a training loop does). Every epoch is timed twice: with workers
started for each epoch, and with persistent workers (later epochs of one loader). Writes
results/pipeline.json and .md.

    python benchmarks/bench_pipeline.py [--quick] [--images 48] [--workers 2] [--reps 3]
"""

from __future__ import annotations

import gc
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import albumentations as A  # noqa: E402
import common  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402
from bench_maps import baseline_maps  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from diskcache_ocr import CachedOCRDataset, finish_batch  # noqa: E402
from diskcache_ocr.ocr.albu_cut import cut_deterministic_prefix as split_deterministic_prefix  # noqa: E402
from diskcache_ocr.ocr.conventions import get_convention  # noqa: E402
from diskcache_ocr.ocr.decode import decode_image  # noqa: E402

MEAN, STD = (0.5602,) * 3, (0.2539,) * 3
SIZE = 640
VAL_PRESET = {"load_maps": True, "cache_config": {
    "cache_images": False, "cache_transformed_tensors": True, "cache_maps": True}}
TRAIN_PRESET = {"load_maps": True, "cache_config": {"cache_images": True}}


def _head(size: int) -> list:
    return [A.LongestMaxSize(size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, value=0)]


def val_transform(size: int = SIZE) -> A.Compose:
    return A.Compose([*_head(size), A.Normalize(MEAN, STD)],
                     keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))


def train_transform(size: int = SIZE) -> A.Compose:
    return A.Compose([*_head(size), A.HorizontalFlip(p=0.5),
                      A.RandomBrightnessContrast(p=0.5), A.Normalize(MEAN, STD)],
                     keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))


class Uncached(Dataset):
    """The same pipeline without a cache, as a user writes it: PIL, the Compose, the maps,
    made by our built-in maker (``maps="builtin"``) or as the origin's collate makes them
    (``"origin-collate"``: bench_maps.baseline_maps, checked equal to the built-in)."""

    def __init__(self, ds: CachedOCRDataset, transform: A.Compose, maps: str) -> None:
        self.files = [str(ds.images_dir / ds.source(i)) for i in range(len(ds))]
        self.words = [ds.words(i)[0] for i in range(len(ds))]
        self.transform = transform
        self.maps = get_convention("origin").maps if maps == "builtin" else _collate_maps

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.files[i]) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        polys = [np.round(p).astype(np.int32) for p in self.words[i]]
        out = self.transform(image=image, keypoints=[tuple(map(float, xy)) for p in polys
                                                     for xy in p])
        pts = np.array([k[:2] for k in out["keypoints"]], np.float64).reshape(-1, 2)
        moved = np.split(pts, np.cumsum([len(p) for p in polys])[:-1]) if polys else []
        img = out["image"]
        maps = self.maps(moved, img.shape[0], img.shape[1])
        return {"image": img, **maps}


def _collate_maps(polygons: list, h: int, w: int) -> dict:
    prob, thresh = baseline_maps(polygons, h, w)
    return {"prob_map": prob, "thresh_map": thresh}


class Seeded(Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        random.seed(i)
        np.random.seed(i)
        s = self.ds[i]
        return {"index": i, "image": s["image"], "prob_map": s["prob_map"],
                "thresh_map": s["thresh_map"]}


def epoch(ds: Dataset, workers: int, check: dict | None = None, keep: bool = False
          ) -> tuple[float, dict]:
    """One epoch's seconds, batched by torch's default collate (stacked in shared memory
    inside the workers). Batches are dropped as a training loop drops them, unless ``keep``
    (the reference run); with ``check``, each is compared as it arrives (an untimed check
    epoch: comparing would cost both sides alike and hide what loading costs)."""
    loader = DataLoader(Seeded(ds), batch_size=8, num_workers=workers,
                        persistent_workers=False)
    started = time.perf_counter()
    seen = {}
    count = 0
    for batch in loader:
        for row, i in enumerate(batch["index"].tolist()):
            count += 1
            if keep:
                seen[i] = {k: batch[k][row] for k in ("image", "prob_map", "thresh_map")}
                continue
            if check is None:
                continue
            for k in ("image", "prob_map", "thresh_map"):
                assert torch.equal(batch[k][row], check[i][k]), (i, k)
        del batch
    seconds = time.perf_counter() - started
    assert count == len(ds)  # type: ignore[arg-type]
    return seconds, seen


def native_epoch(ds: CachedOCRDataset, workers: int, check: dict | None = None) -> float:
    """One epoch's seconds through the dataset's own batch path, as its README loads it:
    ``__getitems__`` (each sample copied once into reusable batch memory) and the dataset's
    collate (which hands that memory on). Only for a deterministic transform: nothing to
    seed per index. With ``check``, each batch is compared with it as it arrives."""
    assert ds.item_keys == "origin"
    index = {ds.source(i): i for i in range(len(ds))}
    loader = DataLoader(ds, batch_size=8, num_workers=workers, persistent_workers=False,
                        collate_fn=ds.collate_fn())
    started = time.perf_counter()
    count = 0
    for batch in loader:
        for row, name in enumerate(batch["image_filename"]):
            i = index[name]
            count += 1
            if check is None:
                continue
            for key, batch_key in (("image", "images"), ("prob_map", "prob_maps"),
                                   ("thresh_map", "thresh_maps")):
                assert torch.equal(batch[batch_key][row], check[i][key]), (i, key)
        del batch
    seconds = time.perf_counter() - started
    assert count == len(ds)
    return seconds


def run_epoch(mode: str, ds: CachedOCRDataset, plains: dict, name: str, workers: int,
              check: dict | None = None) -> float:
    """One epoch of pipeline ``name`` ("cached" or an uncached one's maps maker)."""
    if name != "cached":
        return epoch(plains[name], workers, check)[0]
    if mode == "validation":
        return native_epoch(ds, workers, check)
    return epoch(ds, workers, check)[0]


def make_loader(mode: str, ds: CachedOCRDataset, plains: dict, name: str, workers: int
                ) -> DataLoader:
    """A loader with persistent workers for pipeline ``name``, loading as :func:`run_epoch`."""
    persistent = workers > 0
    if name == "cached" and mode == "validation":
        return DataLoader(ds, batch_size=8, num_workers=workers, persistent_workers=persistent,
                          collate_fn=ds.collate_fn())
    return DataLoader(Seeded(ds if name == "cached" else plains[name]), batch_size=8,
                      num_workers=workers, persistent_workers=persistent)


def drain(loader: DataLoader, finish: bool = False) -> float:
    """Seconds to draw one epoch of ``loader``, batches dropped as they arrive (``finish``:
    each compact batch made float32 first, in this process)."""
    started = time.perf_counter()
    for batch in loader:
        if finish:
            batch = finish_batch(batch)
        del batch
    return time.perf_counter() - started


def compact_epoch(ds: CachedOCRDataset, workers: int, check: dict) -> None:
    """An untimed epoch of the compact dataset, each batch finished and compared with the
    uncached pipeline's samples."""
    index = {ds.source(i): i for i in range(len(ds))}
    loader = DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=ds.collate_fn())
    for batch in loader:
        batch = finish_batch(batch)
        for row, name in enumerate(batch["image_filename"]):
            i = index[name]
            for key, batch_key in (("image", "images"), ("prob_map", "prob_maps"),
                                   ("thresh_map", "thresh_maps")):
                assert torch.equal(batch[batch_key][row], check[i][key]), (i, key)


def per_sample(ds: Dataset, n: int) -> float:
    """Seconds per ``ds[i]`` in this process, each sample dropped at once: the reader's own
    cost, without a DataLoader's collate and worker transfer."""
    started = time.perf_counter()
    for i in range(n):
        random.seed(i)
        np.random.seed(i)
        ds[i]
    return (time.perf_counter() - started) / n


def stage_times(ds: CachedOCRDataset, compose: A.Compose, n: int) -> dict[str, float]:
    """Per-sample seconds of decode, transform prefix, rest and maps (in-process)."""
    split = split_deterministic_prefix(compose)
    maps = get_convention("origin").maps
    t = {"decode": 0.0, "prefix": 0.0, "rest": 0.0, "maps": 0.0}
    for i in range(n):
        data = (ds.images_dir / ds.source(i)).read_bytes()
        a = time.perf_counter()
        image = decode_image(data, ds.source(i))
        b = time.perf_counter()
        polys = [np.round(p).astype(np.int32) for p in ds.words(i)[0]]
        pre = split.run_prefix(image, polys)
        c = time.perf_counter()
        img, moved, _ = split.run_rest(pre)
        d = time.perf_counter()
        maps(moved, img.shape[0], img.shape[1])
        e = time.perf_counter()
        for k, v in zip(t, (b - a, c - b, d - c, e - d), strict=True):
            t[k] += v
    return {k: v / n for k, v in t.items()}


def main() -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    common.configure(args)
    n = common.n_images(args)
    _, images, ann = common.dataset_root(n)
    workers = args.workers
    out: dict = {"images": n, "workers": workers, "size": SIZE}
    rows = []
    for mode in ("validation", "training"):
        scratch = common.scratch_dir(f"pipeline-{mode}-")
        try:
            if mode == "validation":
                ds = CachedOCRDataset(images, ann, scratch, preset=VAL_PRESET,
                                      convention="origin", transform=val_transform())
            else:
                ds = CachedOCRDataset(images, ann, scratch, preset=TRAIN_PRESET, split="train",
                                      convention="origin", transform=train_transform())
            make = val_transform if mode == "validation" else train_transform
            plains = {m: Uncached(ds, make(), m) for m in ("builtin", "origin-collate")}
            _, reference = epoch(plains["builtin"], 0, keep=True)
            ds.preload()  # every kind the plan caches (validation: all; training: the prefix)
            for name in ("cached", *plains):  # every pipeline's epoch equals the reference
                run_epoch(mode, ds, plains, name, workers, reference)
            compact = None
            if mode == "validation":  # the same transform cached compact (own cache)
                compact_dir = common.scratch_dir("pipeline-compact-")
                compact = CachedOCRDataset(images, ann, compact_dir, preset=VAL_PRESET,
                                           convention="origin", transform=val_transform(),
                                           output="compact")
                assert compact.output == "compact"
                compact.preload()
                compact_epoch(compact, workers, reference)
            # Timed epochs fork workers from a process of ordinary size: the reference (all
            # samples, over a GB) would make every fork, cached or not, copy its page tables.
            del reference
            gc.collect()
            times: dict[str, list[float]] = {"cached": [], **{m: [] for m in plains}}
            for _ in range(common.reps(args)):  # interleaved: machine load hits all alike
                for name in (*plains, "cached"):
                    times[name].append(run_epoch(mode, ds, plains, name, workers))
            # The same with persistent workers (started once, warmed by one untimed epoch):
            # what each later epoch costs when workers outlive an epoch.
            loaders = {name: make_loader(mode, ds, plains, name, workers) for name in times}
            for loader in loaders.values():
                drain(loader)
            kept: dict[str, list[float]] = {k: [] for k in times}
            for _ in range(common.reps(args)):
                for name, loader in loaders.items():
                    kept[name].append(drain(loader))
            del loaders
            if compact is not None:
                loader = DataLoader(compact, batch_size=8, num_workers=workers,
                                    persistent_workers=workers > 0,
                                    collate_fn=compact.collate_fn())
                for finish in (True, False):
                    drain(loader, finish)
                    kept[f"compact, finish {'in main' if finish else 'later'}"] = [
                        drain(loader, finish) for _ in range(common.reps(args))]
                del loader
                compact.close()
                common.remove(compact_dir)
            alone: dict[str, list[float]] = {k: [] for k in times}
            for _ in range(common.reps(args)):
                for m, plain in plains.items():
                    alone[m].append(per_sample(plain, min(n, 16)))
                alone["cached"].append(per_sample(ds, min(n, 16)))
            stats = {k: common.summary(v) for k, v in times.items()}
            cached = stats["cached"]
            target = 10.0 if mode == "validation" else 3.0
            speedups = {m: common.ratio(stats[m], cached) for m in plains}
            warm = {k: common.summary(v) for k, v in kept.items()}
            warm_speedups = {m: common.ratio(warm[m], warm["cached"]) for m in plains}
            out[mode] = {"cached_epoch": cached,
                         "uncached_epoch": {m: stats[m] for m in plains},
                         "speedup": speedups, "target": target,
                         "persistent_workers": {"cached_epoch": warm["cached"],
                                                "uncached_epoch": {m: warm[m] for m in plains},
                                                "speedup": warm_speedups},
                         "bit_for_bit": True, "kinds_cached": sorted(ds.plan.cached),
                         "in_process_per_sample": {k: common.summary(v)
                                                   for k, v in alone.items()}}
            for name in (k for k in warm if k.startswith("compact")):
                out[mode]["persistent_workers"][name] = {
                    "cached_epoch": warm[name],
                    "speedup": {m: common.ratio(warm[m], warm[name]) for m in plains}}
                rows.append(f"| {mode}, {name} | builtin | persistent | "
                            f"{common.fmt_s(warm['builtin'])} | {common.fmt_s(warm[name])} | "
                            f"{common.fmt_x(common.ratio(warm['builtin'], warm[name]))} | – |")
            for m in plains:
                rows.append(f"| {mode} | {m} | fresh | {common.fmt_s(stats[m])} | "
                            f"{common.fmt_s(cached)} | {common.fmt_x(speedups[m])} | "
                            f"≥ {target:g}× |")
                rows.append(f"| {mode} | {m} | persistent | {common.fmt_s(warm[m])} | "
                            f"{common.fmt_s(warm['cached'])} | {common.fmt_x(warm_speedups[m])} "
                            f"| ≥ {target:g}× |")
            if mode == "training":
                out[mode]["per_sample_s"] = stage_times(ds, train_transform(), min(n, 16))
            ds.close()
        finally:
            common.remove(scratch)
    per = out["training"]["per_sample_s"]
    alone_rows = [f"| {mode} | " + " | ".join(
        f"{1000 * out[mode]['in_process_per_sample'][k]['median']:.1f} ms"
        for k in ("builtin", "origin-collate", "cached")) + " |"
        for mode in ("validation", "training")]
    table = "\n".join([
        f"{n} images, {SIZE}², {workers} DataLoader workers; every pipeline checked equal "
        "to the uncached one, bit for bit, in an untimed epoch; timed epochs drop batches.",
        "",
        "Workers: *fresh* = started for each epoch (`persistent_workers=False`, the time "
        "includes starting them); *persistent* = started once, later epochs timed.",
        "",
        "| pipeline | uncached maps by | workers | uncached epoch | cached epoch | speed-up "
        "| target |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "In-process, per `ds[i]` (no DataLoader collate or worker transfer):", "",
        "| pipeline | uncached (built-in maps) | uncached (origin collate maps) | cached |",
        "|---|---|---|---|", *alone_rows, "",
        "Training, per sample (in-process): " + ", ".join(
            f"{k} {1000 * v:.1f} ms" for k, v in per.items()),
    ])
    common.write_result("pipeline", out, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
