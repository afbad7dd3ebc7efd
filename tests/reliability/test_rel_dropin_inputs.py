"""Inputs of the drop-in that used to be read silently wrong: an annotations directory with no
ground-truth files or an empty annotation path (every image served with 0 words), a misspelt
config key (ignored), an image listed twice in the JSON (the last entry replacing the first
without a word)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from diskcache_ocr.errors import AnnotationError
from diskcache_ocr.ocr.annotations import load_annotations
from diskcache_ocr.origin import ValidatedOCRDataset
from diskcache_ocr.synth import split_paths, synthesize

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]


def make_images(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"not decoded by the loader")
    return root


def write_json(path: Path, images: Any) -> Path:
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropin-inputs")
    synthesize(root, 2, seed=41, min_words=3, max_words=5, size=(150, 190))
    return root


def _node(root, **extra):
    images, annotations = split_paths(root)
    return {"image_path": str(images), "annotation_path": str(annotations), **extra}


def test_an_empty_annotation_path_is_an_error(tmp_path):
    images = make_images(tmp_path / "img", "a.jpg")
    with pytest.raises(AnnotationError, match="empty"):
        load_annotations(images, "")


def test_a_directory_without_ground_truth_files_is_an_error(tmp_path):
    images = make_images(tmp_path / "img", "a.jpg")
    jsons = tmp_path / "jsons"
    jsons.mkdir()
    (jsons / "val.json").write_text("{}")
    with pytest.raises(AnnotationError, match="no ground-truth") as err:
        load_annotations(images, jsons)
    assert str(jsons) in str(err.value)


def test_an_image_listed_twice_keeps_its_last_entry_and_says_so(tmp_path, caplog):
    images = make_images(tmp_path / "img", "a.jpg", "b.jpg")
    path = tmp_path / "v.json"
    first = {"words": {"1": {"points": SQUARE}, "2": {"points": SQUARE}}}
    text = '{"images": {"a.jpg": FIRST, "b.jpg": {}, "a.jpg": {"words": {}}}}'
    path.write_text(text.replace("FIRST", json.dumps(first)), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="diskcache_ocr.annotations"):
        ann = load_annotations(images, path)
    assert [(i.file, len(i.polygons)) for i in ann.items] == [("a.jpg", 0), ("b.jpg", 0)]
    said = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(said) == 1 and "'a.jpg'" in said[0] and str(path) in said[0]


def test_a_misspelt_key_is_reported(root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="diskcache_ocr.origin"):
        ValidatedOCRDataset(_node(root, cache_dir=str(tmp_path / "c"), laod_maps=True))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "'laod_maps'" in said and "'load_maps'" in said


def test_the_drop_in_refuses_an_annotations_directory_and_an_empty_path(root, tmp_path):
    jsons = split_paths(root)[1].parent
    with pytest.raises(AnnotationError, match="no ground-truth"):
        ValidatedOCRDataset(_node(root, cache_dir=str(tmp_path / "c"),
                                  annotation_path=str(jsons)))
    with pytest.raises(AnnotationError, match="empty"):
        ValidatedOCRDataset(_node(root, cache_dir=str(tmp_path / "c"), annotation_path=""))
