"""Built-in origin-convention DBNet maps against a straightforward origin collate.

The baseline below is written the way the origin's ``DBCollateFN`` computes maps: one
polygon at a time, the law-of-cosines distance over each dilated box, edge by edge. Both run
on the reference inputs' transformed polygons (tests/data/origin-reference, or the full set
with --reference), interleaved so machine load hits both alike; every output is checked
equal first. Writes results/maps.json and maps.md.

    python benchmarks/bench_maps.py [--quick] [--reps 5] [--reference DIR]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pyclipper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diskcache_ocr.ocr.origin_maps import make_origin_maps  # noqa: E402


# -- the baseline: the origin collate's map code, straightforwardly --------------------------
def _distance(xs, ys, point_1, point_2):
    square_distance_1 = np.square(xs - point_1[0]) + np.square(ys - point_1[1])
    square_distance_2 = np.square(xs - point_2[0]) + np.square(ys - point_2[1])
    square_distance = np.square(point_1[0] - point_2[0]) + np.square(point_1[1] - point_2[1])
    cosin = (square_distance - square_distance_1 - square_distance_2) / (
        2 * np.sqrt(square_distance_1 * square_distance_2))
    square_sin = 1 - np.square(cosin)
    square_sin = np.nan_to_num(square_sin)
    result = np.sqrt(square_distance_1 * square_distance_2 * square_sin / square_distance)
    result[cosin < 0] = np.sqrt(np.fmin(square_distance_1, square_distance_2))[cosin < 0]
    return result


def baseline_maps(polygons, h, w, shrink_ratio=0.4, thresh_min=0.3, thresh_max=0.7):
    prob_map = np.zeros((h, w), dtype=np.float32)
    thresh_map = np.zeros((h, w), dtype=np.float32)
    for poly in polygons:
        poly = np.asarray(poly).astype(np.int32)
        area = cv2.contourArea(poly)
        perimeter = cv2.arcLength(poly, True)
        if area <= 0 or perimeter <= 0:
            continue
        D = area * (1 - shrink_ratio ** 2) / (perimeter + np.finfo(float).eps)
        pco = pyclipper.PyclipperOffset()
        pco.AddPath(poly, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        for s in pco.Execute(-D):
            cv2.fillPoly(prob_map, [np.array(s, dtype=np.int32)], 1.0)
        for d in pco.Execute(D):
            dilated = np.array(d)
            xmin, xmax = dilated[:, 0].min(), dilated[:, 0].max()
            ymin, ymax = dilated[:, 1].min(), dilated[:, 1].max()
            width, height = xmax - xmin + 1, ymax - ymin + 1
            polygon = poly.astype(np.int64)
            polygon[:, 0] = polygon[:, 0] - xmin
            polygon[:, 1] = polygon[:, 1] - ymin
            xs = np.broadcast_to(np.linspace(0, width - 1, num=width).reshape(1, width),
                                 (height, width))
            ys = np.broadcast_to(np.linspace(0, height - 1, num=height).reshape(height, 1),
                                 (height, width))
            distance_map = np.zeros((polygon.shape[0], height, width), dtype=np.float32)
            for i in range(polygon.shape[0]):
                j = (i + 1) % polygon.shape[0]
                absolute_distance = _distance(xs, ys, polygon[i], polygon[j])
                distance_map[i] = np.clip(absolute_distance / D, 0, 1)
            distance_map = distance_map.min(axis=0)
            xv0, xv1 = min(max(0, xmin), w - 1), min(max(0, xmax), w - 1)
            yv0, yv1 = min(max(0, ymin), h - 1), min(max(0, ymax), h - 1)
            thresh_map[yv0:yv1 + 1, xv0:xv1 + 1] = np.fmax(
                1 - distance_map[yv0 - ymin:yv1 - ymax + height, xv0 - xmin:xv1 - xmax + width],
                thresh_map[yv0:yv1 + 1, xv0:xv1 + 1])
    thresh_map = thresh_map * (thresh_max - thresh_min) + thresh_min
    return prob_map, thresh_map


# -- the run -----------------------------------------------------------------------------------
def load_samples(ref: Path) -> list[list[np.ndarray]]:
    samples = []
    for path in sorted((ref / "outputs").glob("*.npz")):
        d = np.load(path)
        samples.append(np.split(d["poly_points"], np.cumsum(d["poly_sizes"])[:-1]))
    return samples


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path,
                   default=common.REPO / "tests" / "data" / "origin-reference",
                   help="a folder with outputs/*.npz holding poly_points / poly_sizes")
    args = p.parse_args(argv)
    common.configure(args)
    # The baseline's formula divides 0 by 0 on vertices, as the origin's does; keep quiet.
    warnings.simplefilter("ignore", RuntimeWarning)
    samples = load_samples(args.reference)
    if not samples:
        raise SystemExit(f"no outputs/*.npz under {args.reference}")
    for polys in samples:  # equal before timed: a fast wrong answer is no result
        fast, slow = make_origin_maps(polys, 640, 640), baseline_maps(polys, 640, 640)
        if not (np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])):
            raise SystemExit("built-in maps differ from the baseline")
    reps = 1 if args.quick else common.reps(args)
    times: dict[str, list[float]] = {"baseline": [], "builtin": []}
    for _ in range(reps):
        for name, fn in (("baseline", baseline_maps), ("builtin", make_origin_maps)):
            started = time.perf_counter()
            for polys in samples:
                fn(polys, 640, 640)
            times[name].append((time.perf_counter() - started) / len(samples))
    base, fast = common.summary(times["baseline"]), common.summary(times["builtin"])
    speedup = base["median"] / fast["median"]
    polygons = float(np.mean([len(s) for s in samples]))
    table = common.md_table(
        ["maker", "ms / sample (median)", "min", "max"],
        [[name, f"{s['median'] * 1e3:.2f}", f"{s['min'] * 1e3:.2f}", f"{s['max'] * 1e3:.2f}"]
         for name, s in (("origin collate (baseline)", base), ("built-in origin maps", fast))],
        title=f"DBNet maps, origin convention, 640×640, {len(samples)} samples, "
              f"{polygons:.1f} polygons a sample: built-in {speedup:.2f}× faster")
    common.write_result("maps", {"samples": len(samples), "polygons_per_sample": polygons,
                                 "reps": reps, "baseline_s": base, "builtin_s": fast,
                                 "speedup": speedup, "outputs_equal": True}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
