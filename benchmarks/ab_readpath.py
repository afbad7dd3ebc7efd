"""A/B of the cached read path between two checkouts of this project.

    python benchmarks/ab_readpath.py --a /path/to/old/checkout --b . [--n 96] [--rounds 5]

For each case (the built-in pipeline in float32 and compact output, a deterministic user
transform, the origin convention; in-process ``__getitems__`` and the batched loader), each
checkout builds its own cache of the same synthesized images (its own format), then the two
are timed in alternating rounds (A, B, B, A, ...), each round a fresh subprocess reading
every batch of a warm cache once after one untimed pass. Alternating cancels most of the
drift a busy machine adds; the median of the rounds is reported with its spread.
Writes benchmarks/results/ab_readpath.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "built-in float32": {"preset": "validation_optimized"},
    "built-in compact": {"preset": "validation_optimized", "output": "compact"},
    "built-in + maps": {"preset": "validation_optimized", "load_maps": True},
    "own transform": {"preset": "validation_optimized", "own": True},
    "origin convention": {"preset": "validation_optimized", "convention": "origin"},
}

# Runs inside a checkout (its code first on sys.path): build once, then time warm passes.
CHILD = r"""
import json, os, sys, time
case = json.loads(sys.argv[1]); data, cache, mode, batch = sys.argv[2:6]
import logging; logging.disable(logging.WARNING)
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.synth import split_paths
images, ann = split_paths(data, "val")
kw = {k: v for k, v in case.items() if k in ("preset", "output", "load_maps", "convention")}
if case.get("own"):
    import albumentations as A
    kw["transform"] = A.Compose(
        [A.LongestMaxSize(max_size=640), A.PadIfNeeded(640, 640, border_mode=0),
         A.Normalize()],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
ds = CachedOCRDataset(images, ann, cache, split="val", **kw)
batch = int(batch); n = len(ds)
idx = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
if mode == "build":
    for b in idx:
        ds.__getitems__(b)
    print(json.dumps({"n": n})); sys.exit(0)
if mode == "getitems":
    run = lambda: [ds.__getitems__(b) for b in idx]
else:
    from diskcache_ocr.loader import BatchLoader
    loader = BatchLoader(ds, batch_size=batch)
    run = lambda: [b for b in loader]
run()  # untimed: page cache, buffers
t = time.perf_counter(); run(); dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "per_sample_ms": 1000 * dt / n}))
"""


def child(root: Path, case: dict, data: Path, cache: Path, mode: str, batch: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case), str(data),
                          str(cache), mode, str(batch)], env=env, cwd=root,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{root} {case} {mode}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    p.add_argument("--b", type=Path, default=Path("."), help="the changed checkout")
    p.add_argument("--n", type=int, default=96, help="images to synthesize")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (odd)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--modes", default="getitems,loader")
    args = p.parse_args()
    roots = {"A": args.a.resolve(), "B": args.b.resolve()}
    from diskcache_ocr.synth import synthesize  # (either side's synthesizer: same images)

    rows = []
    with tempfile.TemporaryDirectory(prefix="ab-readpath-") as tmp:
        data = Path(tmp) / "data"
        synthesize(data, args.n, split="val", seed=7, size=(480, 640))
        for name in args.cases.split(","):
            case = CASES[name]
            caches = {s: Path(tmp) / f"cache-{s}-{len(rows)}" for s in roots}
            for s, root in roots.items():
                child(root, case, data, caches[s], "build", args.batch)
            for mode in args.modes.split(","):
                times: dict[str, list[float]] = {"A": [], "B": []}
                order = ["A", "B", "B", "A"] * ((args.rounds + 1) // 2)
                for s in order[:2 * args.rounds]:
                    r = child(roots[s], case, data, caches[s], mode, args.batch)
                    times[s].append(r["per_sample_ms"])
                a, b = statistics.median(times["A"]), statistics.median(times["B"])
                rows.append({"case": name, "mode": mode, "a_ms": a, "b_ms": b, "b_over_a": b / a,
                             "a_all": times["A"], "b_all": times["B"]})
                print(f"{name:20s} {mode:9s} A {a:7.3f} ms  B {b:7.3f} ms  B/A {b / a:5.2f}",
                      flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "a": str(roots["A"]),
           "b": str(roots["B"]), "n": args.n, "batch": args.batch, "rows": rows}
    (RESULTS / "ab_readpath.json").write_text(json.dumps(out, indent=1))
    print("\n| case | mode | A ms/sample | B ms/sample | B/A | spread A | spread B |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mode']} | {r['a_ms']:.3f} | {r['b_ms']:.3f} | "
              f"{r['b_over_a']:.2f} | {min(r['a_all']):.3f}–{max(r['a_all']):.3f} | "
              f"{min(r['b_all']):.3f}–{max(r['b_all']):.3f} |")


if __name__ == "__main__":
    main()
