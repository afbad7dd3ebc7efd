"""The "origin" convention against the origin pipeline's outputs (tests/data/origin-reference)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diskcache_ocr.ocr.conventions import (
    OriginTransform,
    get_convention,
    raw_to_upright,
    round_points,
    upright_size,
)
from diskcache_ocr.ocr.decode import decode_image
from diskcache_ocr.ocr.origin_maps import (
    OriginMapConfig,
    make_origin_maps,
    make_origin_maps_literal,
)

REF = Path(__file__).parents[1] / "data" / "origin-reference"
STEMS = sorted(p.stem for p in (REF / "outputs").glob("*.npz"))


def _split(points: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(points, np.cumsum(sizes)[:-1])


def _origin_sample(stem: str):
    """decode → annotation rule → EXIF rule → transform → maps, with the origin convention."""
    conv = get_convention("origin")
    path = REF / "images" / f"{stem}.jpg"
    data = path.read_bytes()
    image = decode_image(data, str(path))
    with Image.open(io.BytesIO(data)) as im:
        raw_size = im.size
        orientation = im.getexif().get(0x0112, 1)
    words = json.loads((REF / "val.json").read_text())["images"][f"{stem}.jpg"]["words"]
    polygons = [conv.load_points(w["points"]) for w in words.values()]
    polygons = conv.upright_polygons(polygons, orientation, raw_size)
    out, moved, inverse = conv.transform(image, polygons)
    maps = conv.maps(moved, out.shape[1], out.shape[2])
    return orientation, out, moved, inverse, maps


@pytest.mark.parametrize("stem", STEMS)
def test_origin_pipeline_reproduces_reference(stem):
    ref = np.load(REF / "outputs" / f"{stem}.npz")
    orientation, image, polygons, inverse, maps = _origin_sample(stem)
    assert orientation == int(ref["orientation"])
    assert image.dtype == np.float32 and image.shape == (3, 640, 640)
    assert hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() == str(
        ref["image_sha256"])
    assert [len(p) for p in polygons] == ref["poly_sizes"].tolist()
    np.testing.assert_array_equal(np.concatenate(polygons).astype(np.float32),
                                  ref["poly_points"])
    np.testing.assert_array_equal(inverse, ref["inverse_matrix"])
    np.testing.assert_array_equal(maps["prob_map"], ref["prob_map"])
    np.testing.assert_array_equal(maps["thresh_map"], ref["thresh_map"])


def test_reference_includes_exif_rotated_images():
    orientations = {int(np.load(REF / "outputs" / f"{s}.npz")["orientation"]) for s in STEMS}
    assert {6, 8} <= orientations


def test_maps_match_reference_on_random_polygon_sets():
    ref = np.load(REF / "maps-only.npz")
    polys = _split(ref["points"], ref["sizes"])
    h, w = ref["canvas"].tolist()
    start = 0
    for i, count in enumerate(ref["polygons_per_set"].tolist()):
        prob, thresh = make_origin_maps(polys[start:start + count], h, w)
        start += count
        np.testing.assert_array_equal(prob, ref["prob_maps"][i])
        np.testing.assert_array_equal(thresh, ref["thresh_maps"][i])


def _random_polygons(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 9))
        centre = rng.uniform(-40, size + 40, 2)
        radius = rng.uniform(0.5, 60, k)
        angle = np.sort(rng.uniform(0, 2 * np.pi, k))
        out.append(np.stack([centre[0] + radius * np.cos(angle),
                             centre[1] + radius * np.sin(angle)], 1))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_fast_maps_equal_the_literal_form(seed):
    rng = np.random.default_rng(seed)
    size = 160
    polys = _random_polygons(rng, 30, size)
    # Cases with their own code paths: a repeated vertex (the formula's NaN on that pixel),
    # a box wholly off the canvas, a tiny and a zero-area polygon, a long diagonal edge.
    polys += [np.array([[20, 20], [60, 20], [60, 20], [60, 40], [20, 40]], float),
              np.array([[size + 30, 10], [size + 60, 10], [size + 60, 30], [size + 30, 30]],
                       float),
              np.array([[5, 5], [6.5, 5], [6.5, 6.9]]),
              np.array([[1, 1], [5, 5], [9, 9]], float),
              np.array([[3, 150], [150, 3], [158, 12], [12, 158]], float)]
    config = OriginMapConfig(shrink_ratio=float(rng.uniform(0.2, 0.6)))
    fast = make_origin_maps(polys, size, size + 7, config)
    slow = make_origin_maps_literal(polys, size, size + 7, config)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])
    assert fast[1].max() > config.thresh_min  # the border was drawn


def test_maps_of_nothing_are_the_floor():
    prob, thresh = make_origin_maps([], 8, 9)
    assert prob.shape == thresh.shape == (8, 9) and not prob.any()
    assert np.all(thresh == np.float32(0.3))


def test_maps_reject_bad_polygons():
    with pytest.raises(ValueError, match=r"polygons\[1\]"):
        make_origin_maps([np.zeros((4, 2)), np.zeros((4, 3))], 10, 10)
    with pytest.raises(ValueError, match="thresh_min"):
        OriginMapConfig(thresh_min=0.8, thresh_max=0.7)


def test_round_points_is_int32_nearest():
    out = round_points([[1.4, 2.6], [3.5, 4.5]])
    assert out.dtype == np.int32
    assert out.tolist() == [[1, 3], [4, 4]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_to_upright_follows_the_pixels(orientation):
    raw_w, raw_h = 7, 5
    raw = np.arange(raw_w * raw_h * 3, dtype=np.uint8).reshape(raw_h, raw_w, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="PNG", exif=exif.tobytes())
    upright = decode_image(buf.getvalue(), "probe.png")
    assert upright.shape[1::-1] == upright_size(raw_w, raw_h, orientation)
    ys, xs = np.mgrid[0:raw_h, 0:raw_w]
    pts = np.stack([xs.ravel(), ys.ravel()], 1)
    moved = raw_to_upright(pts, orientation, raw_w, raw_h).astype(int)
    np.testing.assert_array_equal(upright[moved[:, 1], moved[:, 0]], raw[ys.ravel(), xs.ravel()])


def test_orientation_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="orientation"):
        raw_to_upright(np.zeros((1, 2)), 9, 4, 4)


def test_conventions_by_name():
    origin, db = get_convention("origin"), get_convention("db")
    assert origin.fingerprint() != db.fingerprint()
    assert origin.fingerprint()["maps"]["shrink_ratio"] == 0.4
    assert db.load_points([[1.6, 2.2]]).tolist() == [[1.6, 2.2]]
    assert origin.load_points([[1.6, 2.2]]).tolist() == [[2, 2]]
    with pytest.raises(ValueError, match="unknown convention 'nope'"):
        get_convention("nope")


def test_raw_frame_rule_rotates_polygons():
    conv = get_convention("origin")
    raw = type(conv)(conv.name, True, "raw", conv.transform, conv.maps)
    poly = np.array([[1.0, 2.0], [4.0, 2.0], [4.0, 3.0]])
    np.testing.assert_array_equal(raw.upright_polygons([poly], 6, (7, 5))[0],
                                  raw_to_upright(poly, 6, 7, 5))


# Stored 7 wide, 5 high; upright (orientation 6) 5 wide, 7 high.
FITS_BOTH = np.array([[1.0, 2.0], [3.0, 2.0], [3.0, 3.0]])
FITS_UPRIGHT_ONLY = np.array([[1.0, 5.0], [3.0, 6.0], [2.0, 6.0]])  # y > 4 + 1.5? no: 6 > 5.5
FITS_STORED_ONLY = np.array([[6.0, 1.0], [6.0, 2.0], [5.5, 2.0]])  # x = 6 > 4 + 1.5


@pytest.mark.parametrize(("polys", "kept"), [
    ([FITS_BOTH], False),  # fits the stored frame: remapped
    ([FITS_STORED_ONLY], False),
    ([FITS_UPRIGHT_ONLY], True),  # fits only the upright frame: taken as upright
    ([FITS_UPRIGHT_ONLY, FITS_STORED_ONLY], False),  # all words together decide
])
def test_origin_frame_is_decided_per_image(polys, kept):
    conv = get_convention("origin")
    out = conv.upright_polygons(polys, 6, (7, 5))
    expected = polys if kept else [raw_to_upright(p, 6, 7, 5) for p in polys]
    assert [o.dtype for o in out] == [np.float32] * len(polys)
    for o, e in zip(out, expected, strict=True):  # (clamped into the upright 5×7 image)
        np.testing.assert_array_equal(o, np.clip(np.asarray(e, np.float32), 0, [4, 6]))


def test_origin_orientation_3_is_always_remapped():
    conv = get_convention("origin")
    out = conv.upright_polygons([FITS_BOTH], 3, (7, 5))
    np.testing.assert_array_equal(out[0], raw_to_upright(FITS_BOTH, 3, 7, 5).astype(np.float32))


def test_origin_drops_words_of_fewer_than_3_points_before_and_thin_words_after():
    conv = get_convention("origin")
    two = np.array([[1.0, 1.0], [3.0, 3.0]])
    assert len(conv.upright_polygons([two, FITS_BOTH], 1, (7, 5))) == 1
    thin = np.array([[1.0, 1.0], [1.4, 5.0], [1.2, 3.0]], np.float32)  # under a pixel wide
    flat = np.array([[1.0, 1.0], [5.0, 1.4], [3.0, 1.2]], np.float32)  # rounds to one row
    assert [p.tolist() for p in conv.kept([thin, flat, FITS_BOTH])] == [FITS_BOTH.tolist()]
    db = get_convention("db")
    assert len(db.kept([thin, flat])) == 2


@pytest.mark.parametrize("shape", [(333, 517), (517, 333), (100, 60), (640, 640), (1, 900)])
def test_origin_transform_equals_albumentations(shape):
    A = pytest.importorskip("albumentations")
    if not A.__version__.startswith("1.3."):
        pytest.skip("the origin's arithmetic is albumentations 1.3's")
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    h, w = shape
    poly = np.array([[0.0, 0.0], [w - 1.0, 0.0], [w - 1.0, h - 1.0], [0.3, h / 2]])
    val = A.Compose([A.LongestMaxSize(640, interpolation=1),
                     A.PadIfNeeded(640, 640, border_mode=0),
                     A.Normalize(mean=(0.5602,) * 3, std=(0.2539,) * 3)],
                    keypoint_params=A.KeypointParams(format="xy", remove_invisible=True))
    # (the origin clamps every vertex into the image before its Compose)
    clamped = np.clip(poly, 0, [w - 1, h - 1])
    expected = val(image=image, keypoints=[tuple(p) for p in clamped.tolist()])
    out, polys, inverse = OriginTransform()(image, [poly])
    np.testing.assert_array_equal(out, expected["image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(polys[0], np.array(expected["keypoints"], np.float32))
    # The origin's inverse: truncated letterbox sizes, separate x and y scales, float32.
    s = 640 / max(w, h)
    nw, nh = max(1, int(w * s)), max(1, int(h * s))  # (the origin divides by 0 there)
    left, top = (640 - nw) // 2, (640 - nh) // 2
    assert inverse.dtype == np.float32
    np.testing.assert_array_equal(inverse, np.array(
        [[np.float32(w / nw), 0, np.float32(w / nw) * np.float32(-left)],
         [0, np.float32(h / nh), np.float32(h / nh) * np.float32(-top)], [0, 0, 1]],
        np.float32))


def test_origin_transform_rejects_non_rgb():
    with pytest.raises(ValueError, match="uint8"):
        OriginTransform()(np.zeros((4, 4), np.uint8), [])
