"""DBNet training targets: the shrunk-text probability map and the border threshold map.

Follows the published DBNet data pipeline (segmentation-target and border-map steps) as
pure numpy functions without OpenCV.  Results depend only on the arguments, so maps can be
cached under a key built from the polygons and ``MapConfig.to_dict()``.

Rasterising: outline vertices are floored to integers (the reference truncates, the same
thing for clipped, non-negative coordinates), then every pixel whose centre lies inside
(even-odd) or on the outline is filled, as the reference's OpenCV fill does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pyclipper

MAP_NAMES = ("prob_map", "prob_mask", "thresh_map", "thresh_mask")

Points = list[tuple[float, float]]
_CHUNK = 1 << 16  # pixels per batch of the border pass: temporaries stay small and cached


@dataclass(frozen=True)
class MapConfig:
    """Parameters of the DBNet targets; ``version`` changes whenever the algorithm does."""

    shrink_ratio: float = 0.4
    thresh_min: float = 0.3
    thresh_max: float = 0.7
    min_text_size: float = 8.0
    version: str = "1"

    def __post_init__(self) -> None:
        for name in ("shrink_ratio", "thresh_min", "thresh_max", "min_text_size"):
            value = getattr(self, name)
            real = isinstance(value, (int, float, np.integer, np.floating))
            if isinstance(value, bool) or not real or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite real number, got {value!r}")
            # Canonical floats: MapConfig(min_text_size=8) equals (and hashes like) the default.
            object.__setattr__(self, name, float(value))
        if not 0.0 < self.shrink_ratio < 1.0:
            raise ValueError(f"shrink_ratio: expected 0 < value < 1, got {self.shrink_ratio!r}")
        if not 0.0 <= self.thresh_min < self.thresh_max <= 1.0:
            raise ValueError(
                "thresh_min/thresh_max: expected 0 <= thresh_min < thresh_max <= 1, "
                f"got thresh_min={self.thresh_min!r}, thresh_max={self.thresh_max!r}"
            )
        if self.min_text_size < 0.0:
            raise ValueError(f"min_text_size: expected value >= 0, got {self.min_text_size!r}")
        if not isinstance(self.version, str) or not self.version:
            raise ValueError(f"version: expected a non-empty str, got {self.version!r}")

    def to_dict(self) -> dict[str, object]:
        """All fields as a plain dict (floats and a str)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> MapConfig:
        """Inverse of ``to_dict``; missing keys take defaults, unknown keys are rejected."""
        if not isinstance(d, Mapping):
            raise ValueError(f"MapConfig.from_dict: expected a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(f"MapConfig: unknown key {key!r}, expected one of {known}")
        return cls(**d)  # type: ignore[arg-type]


def polygon_area(points: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Signed shoelace area; positive when the points run clockwise on screen (y down)."""
    q = _vertices(points)
    # fsum: the very same value whichever vertex comes first (and negated when reversed).
    edges = zip(q, q[1:] + q[:1], strict=True)
    return 0.5 * math.fsum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in edges)


def polygon_perimeter(points: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Length of the closed outline (the last point joins back to the first)."""
    q = _vertices(points)
    edges = zip(q, q[1:] + q[:1], strict=True)
    return math.fsum(math.hypot(x1 - x0, y1 - y0) for (x0, y0), (x1, y1) in edges)


def _vertices(points: np.ndarray | Sequence[Sequence[float]]) -> Points:
    # A word has few vertices: plain floats beat per-call numpy overhead by far.
    return [(x, y) for x, y in np.asarray(points, np.float64).reshape(-1, 2).tolist()]


def make_maps(
    polygons: Sequence[np.ndarray],
    ignore: np.ndarray | Sequence[bool],
    height: int,
    width: int,
    config: MapConfig = MapConfig(),  # noqa: B008 - frozen, so sharing it is safe
) -> dict[str, np.ndarray]:
    """Returns the four maps, each C-contiguous float32 of shape (1, height, width).

    Unusable words (non-finite, degenerate, self-intersecting, below ``min_text_size``, or
    vanishing when shrunk) never raise: like ``ignore`` words they are masked in ``prob_mask``.
    """
    h, w = _check_size(height, "height"), _check_size(width, "width")
    if not isinstance(config, MapConfig):
        raise TypeError(f"config: expected MapConfig, got {type(config).__name__}")
    polys = [_as_points(p, i) for i, p in enumerate(polygons)]
    flags = np.asarray(ignore, dtype=bool)
    if flags.shape != (len(polys),):
        raise ValueError(f"ignore: expected {len(polys)} flags, got shape {flags.shape}")

    shrunk_all: list[np.ndarray] = []  # shrunk outlines: prob_map
    masked_all: list[np.ndarray] = []  # ignored / unusable outlines: prob_mask
    padded_all: list[np.ndarray] = []  # padded outlines: thresh_mask
    kept: list[np.ndarray] = []  # outlines drawn into thresh_map, with their offsets
    dists: list[float] = []
    keep = 1.0 - config.shrink_ratio**2
    for pts, ignored in zip(polys, flags.tolist(), strict=True):
        q, area = _clean(pts, h, w)
        xs, ys = [x for x, _ in q], [y for _, y in q]
        small = area and min(max(xs) - min(xs), max(ys) - min(ys)) < config.min_text_size
        if area and not ignored and not small:
            dist = area * keep / polygon_perimeter(q)
            shrunk = _offset(q, -dist)
            if shrunk is not None:
                shrunk_all.append(shrunk)
                padded = _offset(q, dist)
                if padded is not None:
                    padded_all.append(padded)
                    kept.append(np.array(q))
                    dists.append(dist)
                continue
        # Masked outlines get their vertices floored like every other filled outline.
        masked_all.append(np.array([(math.floor(x), math.floor(y)) for x, y in q], np.int64))

    masked = _coverage(masked_all, h, w)
    # Clearing positives under the mask is loss-neutral (DB losses weight gt by the mask) and
    # keeps "ignored => no positive" true where a kept word overlaps an ignored one.
    prob = _coverage(shrunk_all, h, w) & ~masked
    thresh = _border_canvas(kept, padded_all, dists, h, w)
    # float32 like the reference; the clamp removes its one-ulp overshoot (0.4f + 0.3f > 0.7f).
    thresh *= np.float32(config.thresh_max - config.thresh_min)
    thresh += np.float32(config.thresh_min)
    np.minimum(thresh, np.float32(config.thresh_max), out=thresh)
    maps = (prob, ~masked, thresh, _coverage(padded_all, h, w))
    return {k: np.asarray(m, np.float32).reshape(1, h, w)
            for k, m in zip(MAP_NAMES, maps, strict=True)}


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _as_points(poly: object, index: int) -> Points:
    try:
        p = np.asarray(poly, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"polygons[{index}]: expected a numeric (k, 2) array ({exc})") from None
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"polygons[{index}]: expected shape (k, 2), got {p.shape}")
    return [(x, y) for x, y in p.tolist()]  # a copy: the caller's arrays are never touched


def _clean(pts: Points, h: int, w: int) -> tuple[Points, float]:
    """Clip into the image and canonicalise; returns (points, area), area 0.0 if unusable.

    Unusable polygons still come back as their finite clipped vertices, to be masked.
    """
    xm, ym = float(w - 1), float(h - 1)
    finite = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    q = [(min(max(x, 0.0), xm), min(max(y, 0.0), ym)) for x, y in finite]
    if len(q) != len(pts):
        return q, 0.0
    # Drop repeated consecutive vertices (clipping creates them): they add no edge or area.
    q = [v for i, v in enumerate(q) if v != q[i - 1]] or q[:1]
    area = polygon_area(q) if len(q) >= 3 else 0.0
    if abs(area) < 1.0:
        return q, 0.0
    # Fixed orientation and first vertex: nothing below can depend, even by float rounding,
    # on how the annotation listed the points.
    if area < 0:
        q.reverse()
    k = min(range(len(q)), key=lambda i: (q[i][1], q[i][0]))
    q = q[k:] + q[:k]
    return (q, abs(area)) if _is_simple(q) else (q, 0.0)


def polygon_is_simple(points: np.ndarray | Sequence[Sequence[float]]) -> bool:
    """False if two non-adjacent edges of the polygon properly cross."""
    return _is_simple(_vertices(points))


def _is_simple(q: Points) -> bool:
    """False if two non-adjacent edges properly cross (touching/collinear is tolerated)."""
    n = len(q)
    crosses, turning = [], 0.0
    for i in range(n):
        (x0, y0), (x1, y1), (x2, y2) = q[i - 1], q[i], q[(i + 1) % n]
        c = (x1 - x0) * (y2 - y1) - (y1 - y0) * (x2 - x1)
        crosses.append(c)
        turning += math.atan2(c, (x1 - x0) * (x2 - x1) + (y1 - y0) * (y2 - y1))
    # Fast path: strictly convex turns winding once make a convex, hence simple, polygon.
    if (min(crosses) > 0 or max(crosses) < 0) and abs(turning) < 3 * math.pi:
        return True
    p = np.array(q)
    e = _next(p) - p
    # side[i, j]: on which side of edge i vertex j lies (cross of e_i and p_j - p_i).
    side = np.sign(
        np.outer(e[:, 0], p[:, 1])
        - np.outer(e[:, 1], p[:, 0])
        - (e[:, 0] * p[:, 1] - e[:, 1] * p[:, 0])[:, None]
    )
    straddle = side * _next(side.T).T < 0  # [i, j]: edge j's ends lie on both sides of edge i
    gap = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    return not np.any(straddle & straddle.T & (gap > 1) & (gap < n - 1))


def _next(p: np.ndarray) -> np.ndarray:
    """Each row's successor around the closed outline (np.roll is far slower at this size)."""
    return np.concatenate((p[1:], p[:1]))


def _offset(q: Points, delta: float) -> np.ndarray | None:
    """First polygon of the round-joined offset by ``delta`` (negative shrinks), or None."""
    # Floored vertices: the integer engine would truncate them anyway, and clipped
    # coordinates are >= 0, so this is the reference's truncation, made explicit.
    path = [(math.floor(x), math.floor(y)) for x, y in q]
    pco = pyclipper.PyclipperOffset()
    try:
        pco.AddPath(path, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        out = pco.Execute(delta)
    except pyclipper.ClipperException:
        return None
    return np.asarray(out[0], dtype=np.int64) if out and len(out[0]) >= 3 else None


def _coverage(polys: list[np.ndarray], hgt: int, wid: int) -> np.ndarray:
    """Pixels whose centre lies inside (even-odd) or on the outline of any integer polygon.

    Own scanline fill rather than PIL: exact integer geometry reproduces the reference's
    boundary-inclusive fill and cannot drift with the imaging library's version.
    """
    polys = [p for p in polys if len(p)]
    if not polys:
        return np.zeros((hgt, wid), bool)
    sizes = np.array([len(p) for p in polys])
    first = np.cumsum(sizes) - sizes
    pts = np.concatenate(polys).astype(np.int64)
    nxt = np.arange(1, len(pts) + 1)
    nxt[first + sizes - 1] = first  # each polygon closes onto its own first vertex
    owner = np.repeat(np.arange(len(polys)), sizes)
    x0, y0, x1, y1 = pts[:, 0], pts[:, 1], pts[nxt, 0], pts[nxt, 1]
    # Interior: a non-horizontal edge crosses rows [min y, max y); half-open, so per
    # (polygon, row) the sorted crossings pair up as entering / leaving.
    top, dy = np.maximum(np.minimum(y0, y1), 0), y1 - y0
    count = np.where(dy != 0, np.maximum(np.minimum(np.maximum(y0, y1), hgt) - top, 0), 0)
    edge = np.repeat(np.arange(len(pts)), count)
    row = top[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(count) - count, count)
    # Integer numerator, one division: exact whenever a crossing hits a pixel centre.
    xc = x0[edge] + ((row - y0[edge]) * (x1 - x0)[edge]) / dy[edge]
    # (polygon, row) then x: complex keys sort lexicographically, much faster than lexsort.
    order = np.argsort((owner[edge] * hgt + row) + 1j * xc)
    xc, row = xc[order], row[order]
    # Outline pixels the pairs miss: vertices (an edge's last row) and horizontal edges.
    flat = dy == 0
    rows = np.concatenate([row[0::2], y0, y0])
    lo = np.concatenate([np.ceil(xc[0::2]), x0, np.where(flat, np.minimum(x0, x1), x0)])
    hi = np.concatenate([np.floor(xc[1::2]), x0, np.where(flat, np.maximum(x0, x1), x0)])
    lo, hi = np.maximum(lo, 0).astype(np.int64), np.minimum(hi, wid - 1).astype(np.int64)
    good = (lo <= hi) & (rows >= 0) & (rows < hgt)
    out = np.zeros((hgt, wid), bool)
    if not good.any():
        return out
    # Union of the spans over the rows they touch: +1 at each start, -1 after each end,
    # running sum > 0.
    rows, lo, hi = rows[good], lo[good], hi[good]
    top, bot = int(rows.min()), int(rows.max()) + 1
    base = (rows - top) * (wid + 1)
    marks = np.concatenate([base + lo, base + hi + 1])
    diff = np.bincount(marks, np.repeat([1.0, -1.0], len(base)), minlength=(bot - top) * (wid + 1))
    np.cumsum(diff, out=diff)
    out[top:bot] = diff.reshape(bot - top, wid + 1)[:, :-1] > 0.5
    return out


def _strip(v0: np.ndarray, k: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float bounds of the t with |v0 + t * k| < r (an empty range has lo > hi)."""
    flat = k == 0
    kk = np.where(flat, 1.0, k)
    t1, t2 = (-r - v0) / kk, (r - v0) / kk
    inside = np.abs(v0) < r
    lo = np.where(flat, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
    hi = np.where(flat, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
    return lo, hi


def _border_canvas(
    polys: list[np.ndarray], padded: list[np.ndarray], dists: list[float], hgt: int, wid: int
) -> np.ndarray:
    """Max over words of 1 - clip(d / dist, 0, 1) in the padded bbox (d: to the outline).

    An edge can bring d below ``dist`` only inside the rectangle around it grown by ``dist``,
    so each edge is evaluated there alone and max-combined: max commutes with the
    reference's per-pixel min over edges (and with float32 rounding), giving the same values
    without per-word Python loops.  d is the exact clamped projection, in the edge's frame
    and in units of ``dist``, instead of the reference's law of cosines (0/0 at vertices).
    """
    canvas = np.zeros(hgt * wid, np.float32)
    if not polys:
        return canvas.reshape(hgt, wid)
    sizes = [len(p) for p in polys]
    a = np.concatenate(polys)
    b = np.concatenate([_next(p) for p in polys])
    dist = np.repeat(np.asarray(dists), sizes)
    pad = np.concatenate(padded)
    starts = np.cumsum([0] + [len(q) for q in padded[:-1]])
    box_lo = np.repeat(np.minimum.reduceat(pad, starts), sizes, axis=0)
    box_hi = np.repeat(np.maximum.reduceat(pad, starts), sizes, axis=0)
    lo = np.maximum(np.floor(np.minimum(a, b) - dist[:, None]), np.maximum(box_lo, 0))
    hi = np.minimum(np.ceil(np.maximum(a, b) + dist[:, None]), box_hi)
    lo, hi = lo.astype(np.int64), np.minimum(hi, (wid - 1, hgt - 1)).astype(np.int64)
    length = np.hypot(*(b - a).T)  # > 0: _clean dropped repeated vertices
    ux, uy = (b - a).T / length
    nrow = np.where(hi[:, 0] >= lo[:, 0], np.maximum(hi[:, 1] - lo[:, 1] + 1, 0), 0)
    # One entry per (edge, row), at the row's first column, relative to the edge, over dist.
    j = np.repeat(np.arange(len(a)), nrow)
    ry = lo[j, 1] + np.arange(len(j)) - np.repeat(np.cumsum(nrow) - nrow, nrow)
    inv = 1.0 / dist[j]
    dx, dy = (lo[j, 0] - a[j, 0]) * inv, (ry - a[j, 1]) * inv
    half = length[j] * inv / 2
    ka, kc = ux[j] * inv, uy[j] * inv  # change of along / across per pixel to the right
    along0 = dx * ux[j] + dy * uy[j] - half  # along the edge, from its midpoint
    across0 = dx * uy[j] - dy * ux[j]
    # Only columns in the rectangle |along| < half + 1, |across| < 1 can matter.
    lo1, hi1 = _strip(along0, ka, half + 1)
    lo2, hi2 = _strip(across0, kc, np.ones_like(half))
    first = np.ceil(np.clip(np.maximum(lo1, lo2), 0, wid)).astype(np.int64)
    last = np.floor(np.clip(np.minimum(hi1, hi2), -1, hi[j, 0] - lo[j, 0])).astype(np.int64)
    n = np.maximum(last - first + 1, 0)
    ends = np.cumsum(n)
    start = 0
    while start < len(n):
        stop = max(int(np.searchsorted(ends, ends[start] - n[start] + _CHUNK)), start + 1)
        cnt, sl = n[start:stop], slice(start, stop)
        t = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt - first[sl], cnt)
        over = np.repeat(along0[sl], cnt) + t * np.repeat(ka[sl], cnt)
        np.abs(over, out=over)
        over -= np.repeat(half[sl], cnt)
        np.maximum(over, 0.0, out=over)  # beyond an end: distance along; else 0
        across = np.repeat(across0[sl], cnt) + t * np.repeat(kc[sl], cnt)
        over *= over
        across *= across
        over += across
        np.sqrt(over, out=over)
        # float32 like the reference's distance map, so 1 - d rounds the same way.
        val = np.float32(1.0) - np.minimum(over, 1.0).astype(np.float32)
        np.maximum.at(canvas, np.repeat(ry[sl] * wid + lo[j[sl], 0], cnt) + t, val)
        start = stop
    return canvas.reshape(hgt, wid)
