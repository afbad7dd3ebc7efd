"""The drop-in against figures recorded from the origin project's own training run.

``tests/data/origin-train-run/figures.json`` holds what the origin project's
``runners/train.py`` (AIBootcamp13/upstageailab-ocr-recsys-competition-ocr-2, its own dataset
class) handed its evaluation on a small synthesized dataset: the dataset's ``anns`` (file name
-> that image's polygons, rounded to int32, in the annotation file's order), the order of the
items, and each item's fields (metadata, raw size, inverse matrix, polygons). Their evaluator,
Lightning module and callbacks read exactly these; ``diskcache_ocr.origin.ValidatedOCRDataset``
must provide them the same way. The images are re-synthesized here (same seeds); the
annotation file is the recorded one. Regenerate both with
``scripts/conformance/train_run/record_figures.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from testkit import load_script

from diskcache_ocr.origin import ValidatedOCRDataset

ROOT = Path(__file__).resolve().parents[2]
FIGURES_DIR = ROOT / "tests" / "data" / "origin-train-run"
FIGURES = json.loads((FIGURES_DIR / "figures.json").read_text())
VAL = FIGURES["stages"]["val"]
NAMES = VAL["anns_keys"]
# Their val split's DatasetConfig as their config tree builds it (performance preset "none").
NONE_PRESET = {"preload_images": False, "load_maps": False,
               "cache_config": {"cache_transformed_tensors": False, "cache_images": False,
                                "cache_maps": False, "log_statistics_every_n": None}}


def _dataset_module() -> Any:
    return load_script(ROOT / "scripts" / "conformance" / "train_run" / "dataset.py",
                       "origin_train_run_dataset")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset_module().make_dataset(tmp_path_factory.mktemp("origin-train-run"),
                                          val_annotations=FIGURES_DIR / "val.json")


@pytest.fixture(scope="module")
def ds(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> ValidatedOCRDataset:
    config = {"image_path": str(data_root / "images" / "val"),
              "annotation_path": str(data_root / "jsons" / "val.json"),
              "cache_dir": str(tmp_path_factory.mktemp("cache")), **NONE_PRESET}
    return ValidatedOCRDataset(config)


@pytest.fixture(scope="module")
def items(ds: ValidatedOCRDataset) -> list[dict[str, Any]]:
    return [ds[i] for i in range(len(ds))]


def _meta(item: dict[str, Any]) -> dict[str, Any]:
    meta = item["metadata"]
    return meta.model_dump() if hasattr(meta, "model_dump") else dict(meta)


def _recorded(name: str) -> dict[str, Any]:
    return VAL["items"][name]


# -- the data is what the origin's run saw ------------------------------------------------
def test_synthesized_images_have_the_recorded_sizes(data_root: Path) -> None:
    from PIL import Image
    for name in NAMES:
        with Image.open(data_root / "images" / "val" / name) as im:
            assert list(im.size) == _recorded(name)["raw_size"], name


def test_length(ds: ValidatedOCRDataset) -> None:
    assert len(ds) == len(NAMES)


def test_not_mistaken_for_a_subset(ds: ValidatedOCRDataset) -> None:
    # Their evaluator and callbacks treat anything with `dataset` (and `indices`) as a
    # torch Subset and read `.dataset.anns` instead.
    assert not hasattr(ds, "indices")
    assert not hasattr(ds, "dataset") or ds.dataset is ds


# -- anns: what their evaluator, batch metrics and image-logging callback read ------------
def test_anns_keys_in_annotation_file_order(ds: ValidatedOCRDataset) -> None:
    assert list(ds.anns.keys()) == NAMES


def test_anns_values_are_rounded_int32_polygons(ds: ValidatedOCRDataset) -> None:
    for name in NAMES:
        polys = ds.anns[name]
        assert isinstance(polys, list), name
        assert all(isinstance(p, np.ndarray) and p.dtype == np.int32 and p.shape == (4, 2)
                   for p in polys), name
        assert [p.tolist() for p in polys] == VAL["gt"][name], name


def test_anns_get_and_membership(ds: ValidatedOCRDataset) -> None:
    assert ds.anns.get("not-there.jpg") is None
    assert all(name in ds.anns for name in NAMES)


def test_image_path_attribute(ds: ValidatedOCRDataset, data_root: Path) -> None:
    # their evaluator and loggers fall back to `dataset.image_path / filename`
    assert Path(ds.image_path) == data_root / "images" / "val"


# -- items, in order: what their DBCollateFN builds the batch from ------------------------
def test_item_order_is_the_annotation_files(items: list[dict[str, Any]]) -> None:
    assert [_meta(it)["filename"] for it in items] == VAL["item_order"]


def test_items_are_the_recorded_files(items: list[dict[str, Any]]) -> None:
    assert sorted(_meta(it)["filename"] for it in items) == sorted(VAL["item_order"])


def test_metadata_keys(items: list[dict[str, Any]]) -> None:
    for it in items:
        meta = _meta(it)
        assert sorted(meta) == _recorded(meta["filename"])["metadata"]["keys"], meta["filename"]


def test_metadata_fields_their_code_reads(items: list[dict[str, Any]], data_root: Path) -> None:
    # filename -> batch image_filename; path -> image_path; raw_size and orientation -> the
    # evaluator's ground-truth remapping.
    for it in items:
        meta = _meta(it)
        want = _recorded(meta["filename"])["metadata"]["values"]
        assert str(meta["path"]) == want["path"].replace("<data>", str(data_root))
        assert list(meta["raw_size"]) == want["raw_size"]
        assert meta["orientation"] == want["orientation"]


def test_metadata_values(items: list[dict[str, Any]], data_root: Path) -> None:
    for it in items:
        meta = _meta(it)
        want = _recorded(meta["filename"])["metadata"]
        for key in ("original_shape", "polygon_frame", "dtype", "is_normalized",
                    "cache_source", "cache_hits", "cache_misses"):
            got = meta[key]
            assert (list(got) if isinstance(got, tuple) else got) == want["values"][key], key
            assert type(got).__name__ == want["value_types"][key], key


def test_inverse_matrix(items: list[dict[str, Any]]) -> None:
    for it in items:
        want = _recorded(_meta(it)["filename"])["inverse_matrix"]
        assert str(it["inverse_matrix"].dtype) == want["dtype"]
        assert it["inverse_matrix"].tolist() == want["values"]


def test_inverse_matrix_values(items: list[dict[str, Any]]) -> None:
    for it in items:
        want = _recorded(_meta(it)["filename"])["inverse_matrix"]["values"]
        assert np.allclose(it["inverse_matrix"], want, rtol=0, atol=1e-4)


def test_polygon_counts(items: list[dict[str, Any]]) -> None:
    for it in items:
        want = _recorded(_meta(it)["filename"])["polygons"]
        assert len(it["polygons"]) == want["count"]


def test_polygon_dtype(items: list[dict[str, Any]]) -> None:
    for it in items:
        want = _recorded(_meta(it)["filename"])["polygons"]
        assert sorted({str(np.asarray(p).dtype) for p in it["polygons"]}) == want["dtypes"]
        assert sorted({str(np.asarray(p).shape) for p in it["polygons"]}) == want["shapes"]


def test_image_tensor(items: list[dict[str, Any]]) -> None:
    shape = VAL["images"]["shape"][1:]
    for it in items:
        assert list(it["image"].shape) == shape
        assert str(it["image"].dtype) == VAL["images"]["dtype"]


def test_subset_picks_the_first_annotated_files(ds: ValidatedOCRDataset) -> None:
    # their val_num_samples: Subset(dataset, range(k)); the evaluator maps indices to names
    # through `anns`' order
    from torch.utils.data import Subset
    sub = Subset(ds, range(3))
    names = list(sub.dataset.anns.keys())
    assert [names[i] for i in sub.indices] == NAMES[:3]
    assert [_meta(sub[i])["filename"] for i in range(3)] == NAMES[:3]
