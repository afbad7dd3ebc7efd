"""DBNet targets exactly as the origin project's collate makes them, computed fast.

The origin's recipe, per polygon after the transform: vertices cast to int32; skipped when
``cv2.contourArea`` or the closed ``cv2.arcLength`` is not positive; ``D = area * (1 - r**2)
/ (perimeter + eps)``; pyclipper round-joined offsets by ``-D`` (each filled with 1.0 by
``cv2.fillPoly`` into ``prob_map``) and ``+D`` (for each, its integer bounding box gets
``1 - min over edges of clip(dist / D, 0, 1)`` merged with ``np.fmax``, where ``dist`` is DB's
law-of-cosines point-to-segment distance); finally ``thresh * (max - min) + min``. No masks,
no minimum text size.

Why it is fast and still exact: a pixel farther than ``D`` from an edge gets ``clip = 1``
from it, which can never lower the minimum, so each edge is evaluated only on the pixels of
its own neighbourhood (its rectangle grown by ``D`` plus a margin far above the formula's
rounding error), for all edges of all polygons at once. Every value is computed with the
origin's own float64 expression, element by element, so it rounds the same; ``1 - min`` equals
the maximum of ``1 - value`` (rounding is monotonic), so edges and polygons combine with one
max. The formula's one NaN case (a pixel exactly on an edge, or on a repeated vertex, where
rounding makes the cosine exceed 1) makes the origin's ``fmax`` skip that pixel for the
whole polygon; the same pixels are skipped here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import pyclipper

_EPS = float(np.finfo(float).eps)
_CHUNK = 1 << 17  # (pixel, edge) pairs per pass: temporaries stay in the CPU cache


@dataclass(frozen=True)
class OriginMapConfig:
    """Parameters of the origin's ``DBCollateFN`` maps."""

    shrink_ratio: float = 0.4
    thresh_min: float = 0.3
    thresh_max: float = 0.7
    version: str = "1"

    def __post_init__(self) -> None:
        for name in ("shrink_ratio", "thresh_min", "thresh_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite real number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 < self.shrink_ratio < 1.0:
            raise ValueError(f"shrink_ratio: expected 0 < value < 1, got {self.shrink_ratio!r}")
        if not self.thresh_min < self.thresh_max:
            raise ValueError(f"thresh_min must be below thresh_max, got "
                             f"{self.thresh_min!r} and {self.thresh_max!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"maker": "origin-db-collate", **asdict(self)}


def make_origin_maps(
    polygons: Sequence[np.ndarray], height: int, width: int,
    config: OriginMapConfig = OriginMapConfig(),  # noqa: B008 - frozen
) -> tuple[np.ndarray, np.ndarray]:
    """``(prob_map, thresh_map)``, each (height, width) float32, as the origin computes them."""
    if height <= 0 or width <= 0:
        raise ValueError(f"canvas must be positive, got {height}×{width}")
    prob = np.zeros((height, width), np.float32)
    thresh = np.zeros((height, width), np.float32)
    jobs: list[tuple[np.ndarray, float, int, int, int, int]] = []
    keep = 1 - config.shrink_ratio ** 2
    for pts in _int_outlines(polygons):
        area = cv2.contourArea(pts)
        length = cv2.arcLength(pts, True)
        if area <= 0 or length <= 0:
            continue
        dist = area * keep / (length + _EPS)
        pco = pyclipper.PyclipperOffset()
        pco.AddPath(pts, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        for shrunk in pco.Execute(-dist):
            cv2.fillPoly(prob, [np.asarray(shrunk, np.int32)], (1.0,))
        for grown in pco.Execute(dist):
            xs, ys = [x for x, _ in grown], [y for _, y in grown]
            xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
            if xmin > width - 1 or ymin > height - 1 or xmax < 0 or ymax < 0:
                # The origin's slicing does odd things for a box wholly off the canvas;
                # follow it literally.
                _box_literal(thresh, pts.astype(np.int64), dist, xmin, ymin, xmax, ymax)
            else:
                jobs.append((pts, dist, max(xmin, 0), max(ymin, 0),
                             min(xmax, width - 1), min(ymax, height - 1)))
    if jobs:
        _border_pairs(thresh, jobs)
    thresh *= np.float32(config.thresh_max - config.thresh_min)
    thresh += np.float32(config.thresh_min)
    return prob, thresh


def make_origin_maps_literal(
    polygons: Sequence[np.ndarray], height: int, width: int,
    config: OriginMapConfig = OriginMapConfig(),  # noqa: B008 - frozen
) -> tuple[np.ndarray, np.ndarray]:
    """The same maps computed box by box as the origin's collate writes it: the slow,
    obviously-faithful form that :func:`make_origin_maps` is checked against."""
    prob = np.zeros((height, width), np.float32)
    thresh = np.zeros((height, width), np.float32)
    for pts in _int_outlines(polygons):
        area, length = cv2.contourArea(pts), cv2.arcLength(pts, True)
        if area <= 0 or length <= 0:
            continue
        dist = area * (1 - config.shrink_ratio ** 2) / (length + _EPS)
        pco = pyclipper.PyclipperOffset()
        pco.AddPath(pts, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        for shrunk in pco.Execute(-dist):
            cv2.fillPoly(prob, [np.asarray(shrunk, np.int32)], (1.0,))
        for grown in pco.Execute(dist):
            g = np.asarray(grown, np.int64)
            xmin, ymin = g.min(axis=0).tolist()
            xmax, ymax = g.max(axis=0).tolist()
            _box_literal(thresh, pts.astype(np.int64), dist, xmin, ymin, xmax, ymax)
    thresh = thresh * (config.thresh_max - config.thresh_min) + config.thresh_min
    return prob, thresh


def _int_outlines(polygons: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each polygon's vertices cast to int32 (truncation, as the origin's ``astype``)."""
    arrays = [np.asarray(p) for p in polygons]
    for index, pts in enumerate(arrays):
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"polygons[{index}]: expected shape (N, 2), got {pts.shape}")
    if not arrays:
        return []
    # One cast for all; float64 first so every input dtype truncates the same way.
    flat = np.concatenate([p.astype(np.float64, copy=False) for p in arrays]).astype(np.int32)
    return np.split(flat, np.cumsum([len(p) for p in arrays])[:-1])


def db_distance(xs: np.ndarray, ys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DB's point-to-segment distance (law of cosines), the origin's float64 expression."""
    sd1 = np.square(xs - a[0]) + np.square(ys - a[1])
    sd2 = np.square(xs - b[0]) + np.square(ys - b[1])
    sd = np.square(a[0] - b[0]) + np.square(a[1] - b[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        cosin = (sd - sd1 - sd2) / (2 * np.sqrt(sd1 * sd2))
        square_sin = np.nan_to_num(1 - np.square(cosin))
        result = np.sqrt(sd1 * sd2 * square_sin / sd)
    behind = cosin < 0
    result[behind] = np.sqrt(np.fmin(sd1, sd2))[behind]
    return result


def _box_literal(canvas: np.ndarray, poly: np.ndarray, dist: float,
                 xmin: int, ymin: int, xmax: int, ymax: int) -> None:
    """One dilated box, computed and merged exactly as the origin's code does."""
    h, w = canvas.shape
    bw, bh = xmax - xmin + 1, ymax - ymin + 1
    xs = np.broadcast_to(np.linspace(0, bw - 1, num=bw).reshape(1, bw), (bh, bw))
    ys = np.broadcast_to(np.linspace(0, bh - 1, num=bh).reshape(bh, 1), (bh, bw))
    local = poly - np.array([xmin, ymin])
    dmap = np.zeros((len(local), bh, bw), np.float32)
    for i in range(len(local)):
        dmap[i] = np.clip(db_distance(xs, ys, local[i], local[(i + 1) % len(local)]) / dist,
                          0, 1)
    d = dmap.min(axis=0)
    x0, x1 = min(max(0, xmin), w - 1), min(max(0, xmax), w - 1)
    y0, y1 = min(max(0, ymin), h - 1), min(max(0, ymax), h - 1)
    part = d[y0 - ymin:y1 - ymax + bh, x0 - xmin:x1 - xmax + bw]
    target = canvas[y0:y1 + 1, x0:x1 + 1]
    # A box wholly above or left of the canvas leaves an empty slice here, where the origin
    # raises a broadcast error; it contributes nothing instead. (Wholly right of or below
    # the canvas, the origin's slice picks a stray column or row; that is kept.)
    if part.shape == target.shape:
        canvas[y0:y1 + 1, x0:x1 + 1] = np.fmax(1 - part, target)


def _border_pairs(canvas: np.ndarray, jobs: list[tuple[np.ndarray, float, int, int, int, int]]
                  ) -> None:
    """Merge every in-canvas dilated box into ``canvas`` (see the module docstring)."""
    h, w = canvas.shape
    sizes = np.array([len(j[0]) for j in jobs])
    a = np.concatenate([j[0] for j in jobs]).astype(np.int64)
    nxt = np.arange(1, len(a) + 1)
    nxt[np.cumsum(sizes) - 1] = np.cumsum(sizes) - sizes  # each outline closes on itself
    b = a[nxt]
    job = np.repeat(np.arange(len(jobs)), sizes)
    dist = np.array([j[1] for j in jobs])[job]
    box = np.array([j[2:] for j in jobs], np.int64)[job]  # x0, y0, x1, y1 inside the canvas
    # Pixels left out lie at least ceil(D) + 1 from the edge, so the formula (whose error is
    # orders of magnitude below a pixel) clips them to 1 there: they could not lower the min.
    reach = np.ceil(dist).astype(np.int64)
    x0 = np.maximum(np.minimum(a[:, 0], b[:, 0]) - reach, box[:, 0])
    y0 = np.maximum(np.minimum(a[:, 1], b[:, 1]) - reach, box[:, 1])
    x1 = np.minimum(np.maximum(a[:, 0], b[:, 0]) + reach, box[:, 2])
    y1 = np.minimum(np.maximum(a[:, 1], b[:, 1]) + reach, box[:, 3])
    ncol = np.maximum(x1 - x0 + 1, 0)
    nrow = np.where(ncol > 0, np.maximum(y1 - y0 + 1, 0), 0)
    count = nrow * ncol
    ax, ay, bx, by = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    seg = ((ax - bx) ** 2 + (ay - by) ** 2).astype(np.float64)  # exact squared lengths
    flat = canvas.reshape(-1)
    # Chunks end on job boundaries, so a NaN's effect on its own job stays inside one chunk.
    job_ends = np.cumsum(np.bincount(job, weights=count, minlength=len(jobs))).astype(np.int64)
    edge_ends = np.cumsum(sizes)
    first_job = 0
    while first_job < len(jobs):
        done = job_ends[first_job - 1] if first_job else 0
        last_job = max(int(np.searchsorted(job_ends, done + _CHUNK, side="right")),
                       first_job + 1)
        start = int(edge_ends[first_job - 1]) if first_job else 0
        stop = int(edge_ends[last_job - 1])
        first_job = last_job
        rows = nrow[start:stop]
        if not count[start:stop].any():
            continue
        # Two levels: (edge, row) entries first, then their pixels, so that everything that
        # depends on the row only is computed once a row.
        ent = np.repeat(np.arange(start, stop), rows)
        yy = y0[ent] + (np.arange(len(ent)) - np.repeat(np.cumsum(rows) - rows, rows))
        dy1, dy2 = (yy - ay[ent]).astype(np.float64), (yy - by[ent]).astype(np.float64)
        cols = ncol[ent]
        t = np.arange(int(cols.sum())) - np.repeat(np.cumsum(cols) - cols, cols)
        # Integer differences: the same exact values the origin's box-relative floats hold.
        dx1 = np.repeat((x0[ent] - ax[ent]).astype(np.float64), cols) + t
        dx2 = np.repeat((x0[ent] - bx[ent]).astype(np.float64), cols) + t
        sd1 = dx1 * dx1
        sd1 += np.repeat(dy1 * dy1, cols)
        sd2 = dx2 * dx2
        sd2 += np.repeat(dy2 * dy2, cols)
        sd = np.repeat(seg[ent], cols)
        prod = sd1 * sd2
        with np.errstate(divide="ignore", invalid="ignore"):
            cosin = sd - sd1
            cosin -= sd2
            cosin /= 2 * np.sqrt(prod)
            square_sin = np.nan_to_num(1 - np.square(cosin), copy=False)
            d = prod * square_sin
            d /= sd
            np.sqrt(d, out=d)
        behind = cosin < 0
        d[behind] = np.sqrt(np.fmin(sd1, sd2)[behind])
        d /= np.repeat(dist[ent], cols)
        val = np.float32(1) - np.clip(d, 0, 1).astype(np.float32)
        pix = np.repeat(yy * w + x0[ent], cols) + t
        nan = np.isnan(val)
        if nan.any():
            # A NaN in a polygon's minimum hides that pixel from the whole polygon.
            key = np.repeat(job[ent], cols) * (h * w) + pix
            keep = ~np.isin(key, key[nan])
            pix, val = pix[keep], val[keep]
        np.maximum.at(flat, pix, val)
