"""The drop-in against the origin project's own dataset, on the origin's own code.

Runs in an environment with the origin project's pins and its checkout on the path (see
``scripts/conformance/README.md``)::

    ORIGIN_SRC=/path/to/origin PYTHONPATH=$PWD:<stubs>:$ORIGIN_SRC <origin venv>/bin/python \\
        benchmarks/bench_origin.py [--images 56] [--reps 3] [--workers 2]

For each repetition, on the same synthesized split: the origin's dataset uncached (its
``none`` preset: construction, then epochs 0..2), and the drop-in with ``validation_optimized``
on a fresh cache directory (construction, epoch 0 filling the cache read-through, warm epochs
1..2), both fed to the origin's ``DBCollateFN`` through a ``DataLoader`` with persistent
workers and given the origin's own validation transform object. Reports medians and writes
``benchmarks/results/origin.json`` and ``origin.md``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _their_parts():
    import albumentations as A
    from ocr.datasets.base import ValidatedOCRDataset as Theirs
    from ocr.datasets.db_collate_fn import DBCollateFN
    from ocr.datasets.schemas import CacheConfig, DatasetConfig
    from ocr.datasets.transforms import ValidatedDBTransforms

    def transform():
        return ValidatedDBTransforms(
            transforms=[A.LongestMaxSize(max_size=640, interpolation=1, p=1.0),
                        A.PadIfNeeded(min_width=640, min_height=640, border_mode=0, p=1.0),
                        A.Normalize(mean=[0.5602] * 3, std=[0.2539] * 3)],
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=True))

    def theirs(images, annotations):
        config = DatasetConfig(image_path=images, annotation_path=annotations,
                               cache_config=CacheConfig(cache_images=False, cache_maps=False,
                                                        cache_transformed_tensors=False))
        return Theirs(config, transform())

    return theirs, transform, DBCollateFN


def _epochs(make, collate, workers: int, batch: int, epochs: int) -> dict[str, float]:
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    ds = make()
    out = {"construct": time.perf_counter() - t0}
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate(),
                        persistent_workers=workers > 0)
    for e in range(epochs):
        t = time.perf_counter()
        for _ in loader:
            pass
        out[f"epoch{e}"] = time.perf_counter() - t
    out["construct+epoch0"] = out["construct"] + out["epoch0"]
    del loader
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=56)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    if not os.environ.get("ORIGIN_SRC"):
        sys.exit("set ORIGIN_SRC to a checkout of the origin project (see the docstring)")
    from diskcache_ocr.origin import ValidatedOCRDataset
    from diskcache_ocr.synth import split_paths, synthesize

    theirs, transform, collate = _their_parts()
    root = Path(tempfile.mkdtemp(prefix="bench-origin-"))
    synthesize(root, args.images, seed=11, workers=2)
    images, annotations = split_paths(root)
    preset = {"preload_images": True, "preload_maps": True, "load_maps": True,
              "cache_config": {"cache_images": True, "cache_maps": True,
                               "cache_transformed_tensors": True}}
    runs: dict[str, list[dict[str, float]]] = {"origin, uncached": [],
                                              "drop-in, validation_optimized": []}
    for rep in range(args.reps):
        runs["origin, uncached"].append(_epochs(
            lambda: theirs(images, annotations), collate, args.workers, args.batch,
            args.epochs))
        cache = root / f"cache-{rep}"
        config = {"image_path": str(images), "annotation_path": str(annotations),
                  "cache_dir": str(cache), **preset}
        runs["drop-in, validation_optimized"].append(_epochs(
            lambda config=config: ValidatedOCRDataset(config, transform()), collate,
            args.workers, args.batch, args.epochs))
        print(f"rep {rep}: " + json.dumps({k: {m: round(v, 3) for m, v in r[-1].items()}
                                          for k, r in runs.items()}), flush=True)
    medians = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
               for k, rs in runs.items()}
    base, ours = medians["origin, uncached"], medians["drop-in, validation_optimized"]
    ratios = {"construct+epoch0 (drop-in / origin)": ours["construct+epoch0"]
              / base["construct+epoch0"],
              "warm epoch speed-up (origin epoch / drop-in epoch, last epoch)":
              base[f"epoch{args.epochs - 1}"] / ours[f"epoch{args.epochs - 1}"]}
    result = {"args": vars(args), "runs": runs, "medians": medians, "ratios": ratios,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d %H:%M")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "origin.json").write_text(json.dumps(result, indent=1))
    lines = ["| | " + " | ".join(base) + " |", "|---|" + "---|" * len(base)]
    for name, m in medians.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f} s" for v in m.values()) + " |")
    lines += ["", *(f"- {k}: **{v:.2f}**" for k, v in ratios.items()),
              "", f"{args.images} images, {args.workers} workers, batch {args.batch}, "
              f"median of {args.reps}."]
    (out / "origin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
