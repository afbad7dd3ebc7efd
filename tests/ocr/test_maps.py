"""Tests for the DBNet target maps (diskcache_ocr.ocr.maps)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyclipper
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskcache_ocr.ocr import maps as maps_module
from diskcache_ocr.ocr.maps import (
    MAP_NAMES,
    MapConfig,
    make_maps,
    polygon_area,
    polygon_perimeter,
)

RAW = MapConfig(thresh_min=0.0, thresh_max=1.0)  # thresh_map is then the raw border canvas


def box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Axis-aligned box, clockwise on screen (y down)."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def rotated_box(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return corners @ np.array([[c, s], [-s, c]]) + [cx, cy]


def shrink_dist(poly: np.ndarray, r: float = 0.4) -> float:
    x, y = poly[:, 0], poly[:, 1]
    area = abs(0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    perim = np.sum(np.hypot(*(np.roll(poly, -1, axis=0) - poly).T))
    return float(area * (1 - r * r) / perim)


def clipper_offset(poly: np.ndarray, delta: float) -> np.ndarray:
    pco = pyclipper.PyclipperOffset()
    path = np.floor(poly).astype(np.int64).tolist()
    pco.AddPath(path, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return np.array(pco.Execute(delta)[0], dtype=np.int64)


def brute_cover(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel centres inside (even-odd) or exactly on the outline; exact integer arithmetic."""
    p = np.asarray(poly, dtype=np.int64)
    ys, xs = np.mgrid[0:h, 0:w]
    inside = np.zeros((h, w), bool)
    on = np.zeros((h, w), bool)
    for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        on |= (cross == 0) & (xs >= min(x0, x1)) & (xs <= max(x0, x1)) & (
            (ys >= min(y0, y1)) & (ys <= max(y0, y1))
        )
        if y0 != y1:
            spans = (ys >= min(y0, y1)) & (ys < max(y0, y1))
            # crossing strictly right of the pixel: x < x0 + (y - y0) * (x1 - x0) / (y1 - y0)
            right = (xs - x0) * (y1 - y0) < (ys - y0) * (x1 - x0)
            if y1 < y0:
                right = (xs - x0) * (y1 - y0) > (ys - y0) * (x1 - x0)
            inside ^= spans & right
    return inside | on


def reference_distance(xs: np.ndarray, ys: np.ndarray, p: np.ndarray, q: np.ndarray):
    """Point-to-edge distance by the law of cosines, as the DBNet reference computes it.

    Returns (distance, exact): ``exact`` marks pixels where that formula is the true
    Euclidean distance to the segment (inside its Thales circle, or projecting beyond an end).
    """
    s1 = (xs - p[0]) ** 2 + (ys - p[1]) ** 2
    s2 = (xs - q[0]) ** 2 + (ys - q[1]) ** 2
    s = float((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        neg_cos = (s - s1 - s2) / (2 * np.sqrt(s1 * s2))
        sin2 = np.nan_to_num(1 - neg_cos**2)
        dist = np.sqrt(s1 * s2 * sin2 / s)
    near_end = neg_cos < 0
    dist[near_end] = np.sqrt(np.minimum(s1, s2))[near_end]
    t = ((xs - p[0]) * (q[0] - p[0]) + (ys - p[1]) * (q[1] - p[1])) / s
    exact = ~near_end | (t <= 0) | (t >= 1)
    return dist, exact & (s1 > 0) & (s2 > 0)


def reference_canvas(poly: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw border canvas computed the reference way, and where it is exact."""
    d = shrink_dist(poly)
    padded = clipper_offset(poly, d)
    x0, y0 = np.maximum(padded.min(axis=0), 0)
    x1, y1 = np.minimum(padded.max(axis=0), (w - 1, h - 1))
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    rel = np.ones(xs.shape, np.float32)
    exact = np.ones(xs.shape, bool)
    for p, q in zip(poly, np.roll(poly, -1, axis=0)):
        dist, ok = reference_distance(xs, ys, p, q)
        rel = np.minimum(rel, np.clip(dist / d, 0, 1).astype(np.float32))
        exact &= ok
    canvas = np.zeros((h, w), np.float32)
    ok_map = np.ones((h, w), bool)
    canvas[y0 : y1 + 1, x0 : x1 + 1] = 1 - rel
    ok_map[y0 : y1 + 1, x0 : x1 + 1] = exact
    return canvas, ok_map


def check_invariants(maps: dict[str, np.ndarray], h: int, w: int) -> None:
    assert tuple(maps) == MAP_NAMES
    for name, m in maps.items():
        assert m.dtype == np.float32, name
        assert m.shape == (1, h, w), name
        assert m.flags.c_contiguous, name
        assert np.isfinite(m).all(), name
    for name in ("prob_map", "prob_mask", "thresh_mask"):
        assert set(np.unique(maps[name]).tolist()) <= {0.0, 1.0}, name
    t = maps["thresh_map"]
    assert t.min() >= 0.3 and t.max() <= 0.7
    assert not maps["prob_map"][maps["prob_mask"] == 0].any()


def only_masked(maps: dict[str, np.ndarray]) -> None:
    """The word drew nothing: no positives, no border."""
    assert not maps["prob_map"].any()
    assert not maps["thresh_mask"].any()
    assert (maps["thresh_map"] == np.float32(0.3)).all()


# --------------------------------------------------------------------------- hand-computed


def test_rectangle_matches_hand_computation() -> None:
    poly = box(100, 200, 300, 260)
    d = 200 * 60 * (1 - 0.4**2) / (2 * (200 + 60))  # A (1 - r^2) / L = 19.3846...
    m = {k: v[0] for k, v in make_maps([poly], [False], 640, 640).items()}
    check_invariants({k: v[None] for k, v in m.items()}, 640, 640)

    prob = m["prob_map"]
    # Shrunk box [100 + d, 300 - d] x [200 + d, 260 - d], one pixel of slack for rounding.
    assert prob[221:240, 121:280].all()
    assert not prob[:, : math.floor(100 + d - 1) + 1].any()
    assert not prob[:, math.ceil(300 - d + 1) :].any()
    assert not prob[: math.floor(200 + d - 1) + 1].any()
    assert not prob[math.ceil(260 - d + 1) :].any()
    assert m["prob_mask"].all()

    def expect(dist: float) -> float:
        return 0.3 + 0.4 * (1 - min(dist / d, 1.0))

    t = m["thresh_map"]
    assert t[200, 150] == pytest.approx(0.7, abs=1e-6)  # on the top edge
    assert t[260, 300] == pytest.approx(0.7, abs=1e-6)  # on a vertex
    assert t[230, 200] == pytest.approx(0.3, abs=1e-6)  # 30 px inside >= d
    assert t[210, 150] == pytest.approx(expect(10), abs=1e-6)  # 10 px inside the top edge
    assert t[190, 150] == pytest.approx(expect(10), abs=1e-6)  # 10 px above it
    assert t[230, 90] == pytest.approx(expect(10), abs=1e-6)  # left of the left edge
    assert t[270, 310] == pytest.approx(expect(math.hypot(10, 10)), abs=1e-6)  # by a corner
    assert t[230, 310] == pytest.approx(expect(10), abs=1e-6)
    assert t[205, 295] == pytest.approx(expect(5), abs=1e-6)  # nearer the top than the right
    # Outside the padded box nothing is drawn.
    assert (t[:170] == np.float32(0.3)).all() and (t[:, 330:] == np.float32(0.3)).all()

    tm = m["thresh_mask"]
    assert tm[200 - 18, 200] and tm[260 + 18, 200] and tm[230, 100 - 18] and tm[230, 300 + 18]
    assert not (tm[200 - 21, 200] or tm[260 + 21, 200] or tm[230, 100 - 21] or tm[230, 300 + 21])
    assert tm[260 + 13, 300 + 13]  # round join: 18.4 px from the corner
    assert not tm[260 + 15, 300 + 15]  # 21.2 px from the corner
    assert tm[200:261, 100:301].all()


def test_square_half_distance_is_midpoint() -> None:
    poly = box(100, 100, 300, 300)  # d = 40000 * 0.84 / 800 = 42
    t = make_maps([poly], [False], 400, 400)["thresh_map"][0]
    assert t[100 - 21, 200] == pytest.approx(0.5, abs=1e-6)
    assert t[200, 300 + 21] == pytest.approx(0.5, abs=1e-6)
    assert t[100 + 21, 200] == pytest.approx(0.5, abs=1e-6)
    assert t[100 - 42, 200] == pytest.approx(0.3, abs=1e-6)


def test_fills_are_the_offset_polygons_exactly() -> None:
    for poly in (box(100, 200, 300, 260), rotated_box(200.3, 150.7, 150, 40, 0.35)):
        d = shrink_dist(poly)
        m = make_maps([poly], [False], 320, 400)
        shrunk, padded = clipper_offset(poly, -d), clipper_offset(poly, d)
        assert np.array_equal(m["prob_map"][0] > 0, brute_cover(shrunk, 320, 400))
        assert np.array_equal(m["thresh_mask"][0] > 0, brute_cover(padded, 320, 400))


def arc_band(cx: float, cy: float, r_in: float, r_out: float, n: int) -> np.ndarray:
    """Curved-text style outline: n points along an outer arc, n back along an inner one."""
    ang = np.linspace(math.pi * 1.15, math.pi * 1.85, n)
    outer = np.c_[cx + r_out * np.cos(ang), cy + r_out * np.sin(ang)]
    inner = np.c_[cx + r_in * np.cos(ang), cy + r_in * np.sin(ang)][::-1]
    return np.concatenate([outer, inner])


def word_shape(kind: int) -> np.ndarray:
    if kind == 0:  # regular hexagon: obtuse corners
        ang = np.arange(6) * math.pi / 3 + 0.2
        return np.c_[100 + 50 * np.cos(ang), 80 + 40 * np.sin(ang)]
    if kind == 1:  # curved word, concave side included
        return arc_band(100, 150, 70, 110, 7)
    if kind == 2:  # a sharp (29 degree) tip
        return np.array([[20.5, 20.2], [180.3, 60.1], [30.2, 100.7]])
    rng = np.random.default_rng(kind)
    poly = rotated_box(100, 80, rng.uniform(40, 140), rng.uniform(12, 50), rng.uniform(-1, 1))
    return poly + rng.normal(0, 2, poly.shape)  # a general convex quad


@pytest.mark.parametrize("kind", range(9))
def test_border_agrees_with_reference_formula(kind: int) -> None:
    h, w = 160, 200
    poly = word_shape(kind)
    ours = make_maps([poly], [False], h, w, RAW)["thresh_map"][0]
    ref, exact = reference_canvas(poly, h, w)
    # Same values wherever the law of cosines is the true distance ...
    assert np.abs(ours - ref)[exact].max() <= 1e-5
    # ... elsewhere it overestimates the distance (projection on the edge but outside its
    # Thales circle), so the reference canvas is never larger than the exact one.
    assert (ours >= ref - 1e-6).all()


# --------------------------------------------------------------------------- invariants


def random_words(rng: np.random.Generator, n: int, h: int, w: int) -> list[np.ndarray]:
    words = []
    for _ in range(n):
        if rng.random() < 0.75:
            words.append(
                rotated_box(
                    rng.uniform(-10, w + 10),
                    rng.uniform(-10, h + 10),
                    rng.uniform(4, 80),
                    rng.uniform(4, 30),
                    rng.uniform(-0.6, 0.6),
                )
            )
        else:  # arbitrary quad: may be concave or self-intersecting
            c = rng.uniform(0, [w, h])
            words.append(c + rng.uniform(-30, 30, (4, 2)))
    return words


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 12))
def test_invariants_on_random_words(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = 96, 128
    words = random_words(rng, n, h, w)
    ignore = (rng.random(n) < 0.3).tolist()
    words_before = [p.copy() for p in words]
    ignore_before = list(ignore)

    maps = make_maps(words, ignore, h, w)
    check_invariants(maps, h, w)
    # Pure: inputs untouched, same bytes on a second call.
    assert all(np.array_equal(a, b) for a, b in zip(words, words_before))
    assert ignore == ignore_before
    again = make_maps(words, np.array(ignore), h, w)
    assert all(maps[k].tobytes() == again[k].tobytes() for k in MAP_NAMES)
    # Point order does not matter: reversed (other orientation) and rotated start vertex.
    for k in range(4):
        reordered = [np.roll(p[::-1] if k % 2 else p, k, axis=0) for p in words]
        other = make_maps(reordered, ignore, h, w)
        assert all(maps[name].tobytes() == other[name].tobytes() for name in MAP_NAMES)


@pytest.mark.parametrize("seed", range(5))
def test_ignored_word_masks_and_leaves_thresh_alone(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h, w = 120, 160
    words = random_words(rng, 8, h, w)
    target = rotated_box(80, 60, 60, 24, rng.uniform(-0.5, 0.5))
    with_ignored = make_maps(words + [target], [False] * 8 + [True], h, w)
    without = make_maps(words, [False] * 8, h, w)
    for name in ("thresh_map", "thresh_mask"):
        assert with_ignored[name].tobytes() == without[name].tobytes()
    mask = with_ignored["prob_mask"][0]
    cover = brute_cover(np.floor(target), h, w)
    assert not mask[cover].any()  # the whole (floored) polygon is masked, outline included
    assert np.array_equal(with_ignored["prob_map"], without["prob_map"] * with_ignored["prob_mask"])


@given(
    pts=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 23)), min_size=1, max_size=8)
)
def test_ignored_fill_rule_is_inside_or_on_outline(pts: list[tuple[int, int]]) -> None:
    poly = np.array(pts, dtype=np.float64)
    mask = make_maps([poly], [True], 24, 30)["prob_mask"][0]
    assert np.array_equal(mask == 0, brute_cover(poly, 24, 30))


def properly_cross(a, b, c, d) -> bool:
    def orient(p, q, r) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    return orient(a, b, c) * orient(a, b, d) < 0 and orient(c, d, a) * orient(c, d, b) < 0


@given(pts=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=4, max_size=4))
def test_self_intersecting_quads_are_ignored(pts: list[tuple[int, int]]) -> None:
    a, b, c, d = pts
    poly = np.array(pts, dtype=np.float64) + 0.25
    as_word = make_maps([poly], [False], 64, 64)
    as_ignored = make_maps([poly], [True], 64, 64)
    same = all(as_word[k].tobytes() == as_ignored[k].tobytes() for k in MAP_NAMES)
    if properly_cross(a, b, c, d) or properly_cross(b, c, d, a):
        assert same
    else:
        turns = [
            (q[0] - p[0]) * (r[1] - q[1]) - (q[1] - p[1]) * (r[0] - q[0])
            for p, q, r in zip(pts, pts[1:] + pts[:1], pts[2:] + pts[:2])
        ]
        convex = min(turns) > 0 or max(turns) < 0
        if convex and abs(polygon_area(poly)) >= 1 and min(np.ptp(poly, axis=0)) >= 8:
            assert as_word["thresh_mask"].any()  # a convex, big enough quad is drawn


def test_min_text_size_boundary() -> None:
    exactly = make_maps([box(10, 10, 18, 30)], [False], 40, 40)  # 8 px wide: kept
    assert exactly["thresh_mask"].any() and exactly["prob_mask"].all()
    below = make_maps([box(10, 10, 17.9, 30)], [False], 40, 40)
    only_masked(below)


@given(seed=st.integers(0, 2**32 - 1))
def test_overlapping_words_fill_their_union(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = 80, 100
    words = [rotated_box(*rng.uniform([30, 25, 20, 10, -1], [70, 55, 60, 30, 1])) for _ in range(4)]
    words = [np.clip(p, 0, [w - 1, h - 1]) for p in words]  # as the maps code clips them
    ignore = [False, False, True, True]
    maps = make_maps(words, ignore, h, w)
    masked = brute_cover(np.floor(words[2]), h, w) | brute_cover(np.floor(words[3]), h, w)
    assert np.array_equal(maps["prob_mask"][0] == 0, masked)
    padded = [brute_cover(clipper_offset(p, shrink_dist(p)), h, w) for p in words[:2]]
    assert np.array_equal(maps["thresh_mask"][0] > 0, padded[0] | padded[1])


def test_batching_does_not_change_the_border(monkeypatch: pytest.MonkeyPatch) -> None:
    words = random_words(np.random.default_rng(7), 30, 200, 240) + [box(5, 5, 230, 190)]
    whole = make_maps(words, [False] * len(words), 200, 240)
    monkeypatch.setattr(maps_module, "_CHUNK", 37)
    batched = make_maps(words, [False] * len(words), 200, 240)
    assert all(whole[k].tobytes() == batched[k].tobytes() for k in MAP_NAMES)


# --------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize(
    "poly, masked_pixel",
    [
        (np.array([[10, 10], [40, 10], [70, 10], [40, 10]], float), (10, 55)),  # zero area
        (np.array([[20, 20]] * 4, float), (20, 20)),  # a single point
        (np.array([[10, 10], [50, 10], [50, np.nan], [10, 50]], float), (20, 15)),  # NaN vertex
        (np.array([[10, 10], [50, 10], [np.inf, 50], [10, 50]], float), (20, 15)),
        (np.array([[10, 10], [15, 10], [15, 15], [10, 15]], float), (12, 12)),  # below min size
        (np.array([[10, 10], [50, 50], [50, 10], [10, 50]], float), (30, 15)),  # bow tie
        (np.array([[4, 4], [60, 40], [60, 4], [4, 56]], float), (20, 8)),  # lopsided bow tie
        (np.array([[10, 10], [50, 10]], float), (10, 30)),  # two points
    ],
)
def test_degenerate_words_are_masked_not_raised(poly: np.ndarray, masked_pixel) -> None:
    maps = make_maps([poly], [False], 64, 64)
    check_invariants(maps, 64, 64)
    only_masked(maps)
    y, x = masked_pixel
    assert maps["prob_mask"][0, y, x] == 0


def test_unlocatable_and_empty_words_change_nothing() -> None:
    for poly in (np.full((4, 2), np.nan), np.zeros((0, 2))):
        maps = make_maps([poly], [False], 32, 32)
        check_invariants(maps, 32, 32)
        only_masked(maps)
        assert maps["prob_mask"].all()


def test_word_partly_outside_is_clipped_and_kept() -> None:
    poly = box(-50, 10, 100, 60)
    maps = make_maps([poly], [False], 80, 120)
    check_invariants(maps, 80, 120)
    same = make_maps([box(0, 10, 100, 60)], [False], 80, 120)  # the reference clips first
    assert all(maps[k].tobytes() == same[k].tobytes() for k in MAP_NAMES)
    assert maps["prob_map"][0, 35, 50] == 1 and maps["prob_mask"].all()
    assert maps["thresh_map"][0, 10, 50] == pytest.approx(0.7, abs=1e-6)


def test_word_fully_outside_is_masked_at_the_border() -> None:
    maps = make_maps([box(200, 10, 260, 40)], [False], 64, 64)  # clips to a line at x = 63
    only_masked(maps)
    assert not maps["prob_mask"][0, 10:41, 63].any() and maps["prob_mask"][0, :, :63].all()


def test_config_changes_the_maps() -> None:
    poly = box(20, 20, 120, 60)
    base = make_maps([poly], [False], 100, 140)
    wider = make_maps([poly], [False], 100, 140, MapConfig(shrink_ratio=0.8))
    assert wider["prob_map"].sum() > base["prob_map"].sum()
    assert wider["thresh_mask"].sum() < base["thresh_mask"].sum()
    t = make_maps([poly], [False], 100, 140, MapConfig(thresh_min=0.2, thresh_max=0.9))
    assert t["thresh_map"][0, 20, 50] == pytest.approx(0.9, abs=1e-6)
    assert t["thresh_map"][0, 40, 70] == pytest.approx(0.2, abs=1e-6)
    tiny = box(10, 10, 16, 16)
    assert not make_maps([tiny], [False], 40, 40)["prob_map"].any()
    assert make_maps([tiny], [False], 40, 40, MapConfig(min_text_size=0))["prob_map"].any()


def test_no_words() -> None:
    maps = make_maps([], [], 8, 10)
    check_invariants(maps, 8, 10)
    assert maps["prob_mask"].all() and not maps["thresh_mask"].any()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "height, width, name",
    [(0, 5, "height"), (5, -1, "width"), (5.0, 5, "height"), (True, 5, "height")],
)
def test_bad_size_raises(height, width, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_maps([], [], height, width)


@pytest.mark.parametrize("poly", [np.zeros((4, 3)), np.zeros(8), np.zeros((2, 2, 2)), [[1, "x"]]])
def test_bad_polygon_shape_raises(poly) -> None:
    with pytest.raises(ValueError, match=r"polygons\[1\]"):
        make_maps([box(0, 0, 9, 9), poly], [False, False], 16, 16)


def test_bad_ignore_and_config_raise() -> None:
    with pytest.raises(ValueError, match="ignore"):
        make_maps([box(0, 0, 9, 9)], [False, True], 16, 16)
    with pytest.raises(TypeError, match="config"):
        make_maps([], [], 16, 16, {"shrink_ratio": 0.4})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- MapConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"shrink_ratio": 0.0}, "shrink_ratio"),
        ({"shrink_ratio": 1.0}, "shrink_ratio"),
        ({"shrink_ratio": float("nan")}, "shrink_ratio"),
        ({"shrink_ratio": "0.4"}, "shrink_ratio"),
        ({"thresh_min": 0.7, "thresh_max": 0.7}, "thresh_min"),
        ({"thresh_min": -0.1}, "thresh_min"),
        ({"thresh_max": 1.5}, "thresh_max"),
        ({"min_text_size": -1}, "min_text_size"),
        ({"min_text_size": True}, "min_text_size"),
        ({"version": ""}, "version"),
    ],
)
def test_mapconfig_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        MapConfig(**kwargs)
    assert "expected" in str(info.value) and "got" in str(info.value)


def test_mapconfig_round_trip_and_unknown_key() -> None:
    cfg = MapConfig(
        shrink_ratio=0.5, thresh_min=0.25, thresh_max=0.75, min_text_size=4, version="2"
    )
    d = cfg.to_dict()
    assert d == {
        "shrink_ratio": 0.5,
        "thresh_min": 0.25,
        "thresh_max": 0.75,
        "min_text_size": 4.0,
        "version": "2",
    }
    assert type(d["min_text_size"]) is float
    assert MapConfig.from_dict(d) == cfg
    assert MapConfig.from_dict({}) == MapConfig()
    assert MapConfig(min_text_size=8).to_dict() == MapConfig().to_dict()
    with pytest.raises(ValueError, match="bogus"):
        MapConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shrink_ratio = 0.1  # type: ignore[misc]


# --------------------------------------------------------------------------- helpers


def test_polygon_area_and_perimeter() -> None:
    rect = [(0, 0), (10, 0), (10, 5), (0, 5)]  # clockwise on screen
    assert polygon_area(rect) == 50.0
    assert polygon_area(rect[::-1]) == -50.0
    assert polygon_area(np.array(rect[1:] + rect[:1], float)) == 50.0
    assert polygon_perimeter(rect) == 30.0
    assert polygon_perimeter(np.array([[0, 0], [3, 4], [0, 4]])) == 12.0
    assert polygon_area([(1, 1), (2, 2)]) == 0.0 and polygon_perimeter([]) == 0.0
