"""The drop-in as the origin's own code uses it: its config nodes (Hydra keys, its config
class's defaults, misspelt keys), its transform objects, what its evaluation reads of the
dataset (``anns``, ``config``), and the hit counters of a dataset made inside a function."""

from __future__ import annotations

import gc
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from diskcache_ocr import CachedOCRDataset, CacheStore
from diskcache_ocr.origin import ValidatedOCRDataset, resolved_config
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropin")
    synthesize(root, 4, seed=31, min_words=3, max_words=6, size=(150, 190))
    return root


def _node(root, **extra):
    """Their dataset config node as their Hydra tree writes it (``_target_`` entries)."""
    images, annotations = split_paths(root)
    return {"_target_": "ocr.datasets.schemas.DatasetConfig", "image_path": str(images),
            "annotation_path": str(annotations),
            "cache_config": {"_target_": "ocr.datasets.schemas.CacheConfig",
                             "cache_images": True, "cache_maps": False,
                             "cache_transformed_tensors": False}, **extra}


class HoldsCompose:
    """A transform object shaped like the origin's: a Compose in ``.transform`` (ending in a
    CHW conversion), called with the image and polygons, returning an ordered mapping."""

    def __init__(self, transforms):
        self.transform = A.Compose(transforms, keypoint_params=A.KeypointParams(
            format="xy", remove_invisible=True))

    def __call__(self, image, polygons=None):
        h, w = image.shape[:2]
        kps = [(min(max(float(x), 0), w - 1), min(max(float(y), 0), h - 1))
               for p in polygons for x, y in p]
        out = self.transform(image=image, keypoints=kps)
        image_out = torch.from_numpy(out["image"].transpose(2, 0, 1))
        moved, k = [], 0
        for p in polygons:
            moved.append(np.asarray(out["keypoints"][k:k + len(p)], np.float32)[None])
            k += len(p)
        inverse = np.eye(3, dtype=np.float32)
        return OrderedDict(image=image_out, polygons=moved, inverse_matrix=inverse,
                           metadata={"original_shape": (h, w)})


def _val_pieces():
    return [A.LongestMaxSize(max_size=160, interpolation=1), A.PadIfNeeded(160, 160, border_mode=0),
            A.Normalize(mean=[0.5602] * 3, std=[0.2539] * 3)]


def test_their_config_node_with_hydra_keys_is_read(root, tmp_path):
    ds = ValidatedOCRDataset(_node(root, cache_dir=str(tmp_path / "c")))
    assert ds.preset.cache_images and not ds.preset.cache_tensors
    assert ds.config.cache_config.cache_images is True
    assert ds.image_path == split_paths(root)[0]


def test_left_out_keys_take_their_config_class_defaults():
    data = resolved_config({"image_path": "x"})
    assert data["cache_config"] == {"cache_images": True, "cache_maps": False,  # (no load_maps)
                                    "cache_transformed_tensors": False,
                                    "log_statistics_every_n": None}
    assert data["load_maps"] is False and data["image_extensions"] == [".jpg", ".jpeg", ".png"]


def test_cache_maps_without_load_maps_is_off_as_theirs_is(root, tmp_path):
    node = _node(root, cache_dir=str(tmp_path / "c"))
    node["cache_config"] = {"cache_images": True, "cache_maps": True}
    node["image_path"] = str(split_paths(root)[0])
    ds = ValidatedOCRDataset(node, split="train")  # their train config: no TrainingSafetyError
    assert not ds.preset.cache_maps and not ds.config.cache_config.cache_maps


def test_anns_is_what_their_evaluation_reads(root, tmp_path):
    ds = ValidatedOCRDataset(_node(root, cache_dir=str(tmp_path / "c")))
    order = list(json.loads(split_paths(root)[1].read_text())["images"])
    assert isinstance(ds.anns, OrderedDict) and list(ds.anns) == order
    words = json.loads(split_paths(root)[1].read_text())["images"][order[0]]["words"]
    first = ds.anns[order[0]]
    assert all(p.dtype == np.int32 for p in first)
    assert [p.tolist() for p in first] == [np.round(w["points"]).astype(int).tolist()
                                           for w in words.values()]
    assert [ds[i]["metadata"]["filename"] for i in range(len(ds))] == order


def test_their_transform_object_is_run_and_cached(root, tmp_path):
    holder = HoldsCompose(_val_pieces())
    node = _node(root, cache_dir=str(tmp_path / "c"), load_maps=True)
    node["cache_config"].update(cache_transformed_tensors=True, cache_maps=True)
    ds = ValidatedOCRDataset(node, transform=holder)
    assert set(ds.engine.kind_versions()) == {"images", "tensors", "maps"}
    cold = [ds[i] for i in range(len(ds))]
    warm = [ValidatedOCRDataset(node, transform=holder)[i] for i in range(len(ds))]
    live = ValidatedOCRDataset({**node, "cache_config": {"cache_images": False}},
                               transform=holder)
    for i, (a, b) in enumerate(zip(cold, warm, strict=True)):
        c = live[i]
        assert list(a) == ["image", "polygons", "metadata", "prob_map", "thresh_map",
                           "inverse_matrix"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert a["image"].shape == (3, 160, 160)
        for x, y, z in zip(a["polygons"], b["polygons"], c["polygons"], strict=True):
            assert x.dtype == np.float32 and x.shape[1] == 2
            assert np.array_equal(x, y) and np.array_equal(x, z)
        np.testing.assert_array_equal(a["prob_map"], b["prob_map"])
        assert a["inverse_matrix"].dtype == np.float32
        assert "original_shape" in a["metadata"] and a["metadata"]["filename"]


def test_a_random_transform_object_caches_images_only(root, tmp_path):
    holder = HoldsCompose([*_val_pieces()[:2], A.HorizontalFlip(p=0.5), _val_pieces()[2]])
    ds = ValidatedOCRDataset(_node(root, cache_dir=str(tmp_path / "c")), transform=holder,
                             split="train")
    assert set(ds.engine.kind_versions()) == {"images"}


def _two_epochs_in_a_function(root, cache):
    ds = CachedOCRDataset(*split_paths(root), cache, preset="balanced")
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]


def test_hit_counters_of_a_dataset_made_in_a_function_are_kept(root, tmp_path):
    _two_epochs_in_a_function(root, tmp_path / "c")
    gc.collect()
    with CacheStore(tmp_path / "c", readonly=True) as s:
        stats = s.stats()
    assert stats.get("images.hits") == 4 and stats.get("images.misses") == 4


def test_prebuild_builds_exactly_what_the_dataset_reads(root, tmp_path):
    holder = HoldsCompose(_val_pieces())
    node = _node(root, cache_dir=str(tmp_path / "c"), load_maps=True)
    node["cache_config"].update(cache_transformed_tensors=True, cache_maps=True)
    ds = ValidatedOCRDataset(node, transform=holder)
    summary = ds.prebuild(workers=2, progress=False)
    assert summary.built == len(ds) and summary.failed == []
    with CacheStore(tmp_path / "c", readonly=True) as s:
        for kind in ("images", "tensors", "maps"):
            assert s.kind_stats(kind)["entries"] == len(ds)
    again = ValidatedOCRDataset(node, transform=holder)
    assert again.prebuild(progress=False).built == 0
    before = again.stats()
    items = [again[i] for i in range(len(again))]  # every read a hit
    after = again.stats()
    assert after["tensors.hits"] - before.get("tensors.hits", 0) == len(ds)
    assert after["tensors.misses"] == before["tensors.misses"]
    live = ValidatedOCRDataset({**node, "cache_config": {"cache_images": False,
                                                         "cache_maps": False}},
                               transform=holder)
    for i, item in enumerate(items):
        assert torch.equal(item["image"], live[i]["image"])


@pytest.mark.parametrize("images_too", [None, True])
def test_the_first_epoch_writes_what_it_serves(root, tmp_path, images_too):
    """With tensors cached, the first epoch's reads write tensors and maps, not the decoded
    images (a build stores those), unless the config asks for them too."""
    node = _node(root, cache_dir=str(tmp_path / "c"), load_maps=True)
    node["cache_config"].update(cache_transformed_tensors=True, cache_maps=True)
    if images_too:
        node["read_through_images"] = True
    ds = ValidatedOCRDataset(node)
    items = [ds[i] for i in range(len(ds))]
    ds.close()
    with CacheStore(tmp_path / "c", readonly=True) as s:
        assert s.kind_stats("tensors")["entries"] == len(ds)
        assert s.kind_stats("images")["entries"] == (len(ds) if images_too else 0)
    again = ValidatedOCRDataset(node)
    for i, item in enumerate(items):
        assert torch.equal(again[i]["image"], item["image"])
    assert again.prebuild(progress=False).built == (0 if images_too else len(ds))
