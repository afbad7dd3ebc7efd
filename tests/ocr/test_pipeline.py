"""ocr/pipeline.py: kind versions, record layouts and the pipeline's stages."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diskcache_ocr.ocr.maps import MAP_NAMES, MapConfig
from diskcache_ocr.ocr.pipeline import BINARY_MAPS, Pipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig
from diskcache_ocr.schema import KindVersion

PACKAGE = Path(__file__).resolve().parents[2] / "diskcache_ocr"
BOX = np.array([[20.0, 30.0], [140.0, 30.0], [140.0, 70.0], [20.0, 70.0]])


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def pixels(h: int = 120, w: int = 180) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_each_kind_is_versioned_by_everything_upstream_of_it():
    base = Pipeline().kind_versions()
    assert set(base) == {"images", "tensors", "maps"}
    assert all(isinstance(v, KindVersion) for v in base.values())
    other_transform = Pipeline(transform=TransformConfig(size=512)).kind_versions()
    assert other_transform["images"] == base["images"]
    assert other_transform["tensors"] != base["tensors"]
    assert other_transform["maps"] != base["maps"]
    other_maps = Pipeline(maps=MapConfig(shrink_ratio=0.5)).kind_versions()
    assert other_maps["images"] == base["images"] and other_maps["tensors"] == base["tensors"]
    assert other_maps["maps"] != base["maps"]
    assert Pipeline().kind_versions() == base


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted((PACKAGE / "ocr").glob("*.py")) + [PACKAGE / "schema.py"],
                         ids=lambda p: p.name)
def test_the_ocr_stages_and_the_schema_import_nothing_above_them(path):
    """ocr/ knows images and polygons, schema knows rules: neither touches LMDB or the store."""
    allowed = {"diskcache_ocr.errors", "diskcache_ocr.keys", "diskcache_ocr.schema"}
    if path.parent.name == "ocr":  # (the schema sits below the stages)
        allowed.add("diskcache_ocr.ocr")
    ours = {m for m in imported_modules(path) if m.startswith("diskcache_ocr")}
    above = {m for m in ours if not any(m == a or m.startswith(a + ".") for a in allowed)}
    assert not above, f"{path.name} imports {sorted(above)}"
    assert "lmdb" not in imported_modules(path)


def test_decode_gives_the_rgb_pixels():
    arr = pixels()
    assert np.array_equal(Pipeline().decode(png(arr), "a.png"), arr)


@pytest.mark.parametrize("output", ["compact", "float32"])
def test_tensor_record_layout_and_its_finished_image(output):
    p = Pipeline(transform=TransformConfig(size=192, output=output))
    t = p.apply_transform(pixels(), [BOX], flip=False)
    rec = p.tensor_record(t)
    assert set(rec) == {"image", "matrix", "inverse_matrix", "orig_size"}
    assert rec["image"].dtype == (np.uint8 if output == "compact" else np.float32)
    assert np.allclose(rec["matrix"] @ rec["inverse_matrix"], np.eye(3))
    finished = np.empty((3, 192, 192), np.float32)
    p.finish_into(rec["image"], finished)
    # Stored compact or stored finished: the same float32 image comes out.
    reference = Pipeline(transform=TransformConfig(size=192, output="float32"))
    assert np.array_equal(finished, reference.tensor_record(t)["image"])


def test_maps_record_stores_binary_maps_exactly_as_uint8():
    p = Pipeline(transform=TransformConfig(size=192))
    t = p.apply_transform(pixels(), [BOX], flip=False)
    moved = p.transform_polygons([BOX], p.tensor_record(t)["matrix"])
    maps = p.make_maps(moved, [False])
    rec = p.maps_record(maps)
    assert set(rec) == set(MAP_NAMES)
    for name in MAP_NAMES:
        want = np.uint8 if name in BINARY_MAPS else np.float32
        assert rec[name].dtype == want, name
        assert np.array_equal(rec[name].astype(np.float32), maps[name].astype(np.float32))
    assert rec["prob_map"].any()
    bad = dict(maps, prob_map=maps["prob_map"] * 0.5)
    with pytest.raises(ValueError, match="prob_map is not binary"):
        p.maps_record(bad)


def test_transform_polygons_matches_the_transform_s_own_polygons():
    p = Pipeline(transform=TransformConfig(size=160))
    t = p.apply_transform(pixels(), [BOX, BOX + 5], flip=False)
    again = p.transform_polygons([BOX, BOX + 5], p.tensor_record(t)["matrix"])
    for a, b in zip(again, t.polygons):
        assert np.allclose(a, b, atol=1e-4)


def test_determinism_probe_tells_validation_from_training():
    assert Pipeline(transform=VALIDATION).is_deterministic()
    assert not Pipeline(transform=TRAINING).is_deterministic()
    # A declared flip probability counts as random even when it is tiny.
    assert not Pipeline(transform=TransformConfig(hflip_prob=1e-9)).is_deterministic()
