"""The drop-in's items against the origin pipeline's own outputs on its edge cases
(tests/data/origin-reference/more: an RGBA PNG, a grayscale JPEG, EXIF orientations 3 and 6
annotated in the stored frame, three receipts), cold and read back from the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from diskcache_ocr import CachedOCRDataset

MORE = Path(__file__).parents[1] / "data" / "origin-reference" / "more"
JSON = MORE / "inputs" / "jsons" / "val.json"


def _reference(file: str) -> dict[str, np.ndarray]:
    return dict(np.load(MORE / "outputs" / f"{Path(file).stem}.npz"))


@pytest.fixture(scope="module", params=["minimal", "validation_optimized"])
def items(request, tmp_path_factory):
    """Two epochs of every item, in order, under one preset."""
    ds = CachedOCRDataset(MORE / "inputs" / "images" / "val", JSON,
                          tmp_path_factory.mktemp("cache"), preset=request.param,
                          convention="origin", load_maps=True)
    return [[ds[i] for i in range(len(ds))] for _ in range(2)]


def test_items_follow_the_json_order(items):
    order = list(json.loads(JSON.read_text())["images"])
    for epoch in items:
        assert [s["metadata"]["filename"] for s in epoch] == order


@pytest.mark.parametrize("epoch", [0, 1])
def test_every_field_equals_the_origin(items, epoch):
    for sample in items[epoch]:
        ref = _reference(sample["metadata"]["filename"])
        image = sample["image"].numpy()
        assert image.dtype == np.float32 and image.shape == (3, 640, 640)
        assert hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() == str(
            ref["image_sha256"]), sample["metadata"]["filename"]
        polys = sample["polygons"]
        assert all(p.dtype == np.float32 and p.ndim == 2 for p in polys)
        assert [len(p) for p in polys] == ref["poly_sizes"].tolist()
        np.testing.assert_array_equal(np.concatenate(polys), ref["poly_points"])
        assert sample["inverse_matrix"].dtype == np.float32
        np.testing.assert_array_equal(sample["inverse_matrix"], ref["inverse_matrix"])
        for name in ("prob_map", "thresh_map"):
            np.testing.assert_array_equal(sample[name], ref[name])
        assert sample["metadata"]["orientation"] == int(ref["orientation"])


def test_metadata_is_the_origin_datasets(items):
    by_name = {s["metadata"]["filename"]: s["metadata"] for s in items[1]}
    exif6 = by_name["edge_exif6.jpg"]
    assert list(exif6) == ["filename", "path", "original_shape", "orientation", "is_normalized",
                           "dtype", "raw_size", "polygon_frame", "cache_source", "cache_hits",
                           "cache_misses"]
    assert exif6["raw_size"] == (1111, 777) and exif6["original_shape"] == (1111, 777)
    assert exif6["polygon_frame"] == "canonical" and exif6["dtype"] == "uint8"
    assert by_name["edge_gray.jpg"]["polygon_frame"] == "raw"
    assert exif6["path"].endswith("edge_exif6.jpg") and isinstance(exif6["path"], str)
