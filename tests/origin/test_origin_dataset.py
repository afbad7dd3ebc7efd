"""ValidatedOCRDataset: the origin's dataset config in its three shapes, the cache directory
rule shared with the command line, a test split without annotations, and transforms."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from diskcache_ocr import cli
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError, PresetError, TrainingSafetyError
from diskcache_ocr.ocr.stages import NotCacheableWarning
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.ops import default_cache_dir
from diskcache_ocr.origin import ValidatedOCRDataset, config_mapping, preset_from_config
from diskcache_ocr.synth import split_paths, synthesize

N = 3
VAL_PRESET = {  # what the origin's validation_optimized file merges into the config
    "preload_images": True, "preload_maps": True, "prenormalize_images": False,
    "load_maps": True,
    "cache_config": {"cache_images": True, "cache_maps": True,
                     "cache_transformed_tensors": True, "log_statistics_every_n": 100},
    "image_loading_config": {"use_turbojpeg": True, "turbojpeg_fallback": True},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("origin-ds")
    synthesize(root, N, seed=8, min_words=3, max_words=6, size=(200, 260))
    synthesize(root, 2, split="test", seed=9, min_words=3, max_words=6, size=(200, 260))
    split_paths(root, "test")[1].unlink()  # the test split has no annotation file
    return root


def _config(root, split="val", **extra):
    images, annotations = split_paths(root, split)
    return {"image_path": str(images), "annotation_path": str(annotations), **VAL_PRESET,
            **extra}


def _same_samples(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"])
        assert np.array_equal(np.asarray(x["prob_map"]), np.asarray(y["prob_map"]))
        assert np.array_equal(np.asarray(x["inverse_matrix"]), np.asarray(y["inverse_matrix"]))


@pytest.mark.parametrize("shape", ["dict", "omegaconf", "attributes"])
def test_their_config_in_each_shape(data_root, tmp_path, shape):
    data = _config(data_root, cache_dir=str(tmp_path / "c"))
    if shape == "omegaconf":
        omegaconf = pytest.importorskip("omegaconf")
        config = omegaconf.OmegaConf.create(data)
    elif shape == "attributes":  # as their pydantic DatasetConfig reads: attributes
        config = types.SimpleNamespace(**{**data, "cache_config": types.SimpleNamespace(
            **data["cache_config"])})
    else:
        config = data
    ds = ValidatedOCRDataset(config)
    p = ds.preset
    assert (p.cache_images, p.cache_tensors, p.cache_maps, p.load_maps) == (True,) * 4
    assert p.use_turbojpeg and set(p.no_effect()) == {"use_turbojpeg", "turbojpeg_fallback"}
    assert ds.store is not None and ds.store.path == tmp_path / "c"
    assert ds.store.header()["preset"] == "custom"
    assert ds.item_keys == "origin"  # the drop-in follows the origin's rules by default
    # the same samples, computed without the cache
    fresh = CachedOCRDataset(*split_paths(data_root), preset={"load_maps": True},
                             convention="origin")
    _same_samples(ds, fresh)


def test_preset_name_from_the_config(data_root, tmp_path, caplog):
    with caplog.at_level("INFO", logger="diskcache_ocr.presets"):
        ds = ValidatedOCRDataset(_config(data_root, cache_dir=str(tmp_path / "c"),
                                         preset_name="validation_optimized"))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "'validation_optimized': use_turbojpeg has no effect here" in said
    assert ds.preset.name == "validation_optimized"
    assert ds.store.header()["preset"] == "validation_optimized"


def test_cache_dir_follows_the_same_rule_as_the_command_line(data_root, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(tmp_path / "env"))
    ds = ValidatedOCRDataset(_config(data_root))
    assert ds.store.path == tmp_path / "env"
    assert cli.build_parser().parse_args(["status"]).cache == ds.store.path
    monkeypatch.delenv("DISKCACHE_OCR_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = ValidatedOCRDataset(_config(data_root))
    assert ds.store.path == default_cache_dir() == tmp_path / "xdg" / "diskcache-ocr"
    assert cli.build_parser().parse_args(["health"]).cache == ds.store.path


@pytest.mark.parametrize("annotation_path", ["absent", None])
def test_a_test_split_without_annotations(data_root, tmp_path, annotation_path):
    config = _config(data_root, split="test", cache_dir=str(tmp_path / "c"))
    if annotation_path == "absent":
        del config["annotation_path"]
    else:
        config["annotation_path"] = annotation_path
    config["load_maps"] = False
    config["cache_config"] = {"cache_images": True, "cache_transformed_tensors": True}
    ds = ValidatedOCRDataset(config)
    assert len(ds) == 2 and ds.split == "test"
    assert ds[0]["image"].shape[0] == 3
    polygons = ds[1]["polygons"]
    assert len(polygons) == 0


def test_split_comes_from_the_image_folder(data_root, tmp_path):
    config = _config(data_root, cache_dir=str(tmp_path / "c"))
    config["image_path"] = str(data_root / "images" / "train")
    assert preset_from_config(config).cache_tensors
    (data_root / "images" / "train").mkdir(exist_ok=True)
    # a random training transform is refused map caching by the dataset's own safety rule
    with pytest.raises(TrainingSafetyError), pytest.warns(NotCacheableWarning):
        ValidatedOCRDataset(config, transform=_random_flip)


def _random_flip(image, polygons):
    if random.random() < 0.5:
        return image, polygons, np.eye(3)
    w = image.shape[1]
    flipped = [np.column_stack([w - 1 - p[:, 0], p[:, 1]]) for p in polygons]
    return image[:, ::-1], flipped, np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]])


def test_bad_configs_name_the_problem(data_root, tmp_path):
    with pytest.raises(CacheError, match="image_path is missing"):
        ValidatedOCRDataset({"annotation_path": "x.json"})
    bad = _config(data_root, cache_dir=str(tmp_path / "c"))
    bad["cache_config"] = {**bad["cache_config"], "cache_imgs": True}
    with pytest.raises(PresetError, match="cache_config.cache_imgs"):
        ValidatedOCRDataset(bad)
    with pytest.raises(CacheError, match="expected a mapping"):
        config_mapping(42)


def test_transforms(data_root, tmp_path):
    config = _config(data_root, cache_dir=str(tmp_path / "c"))
    ds = ValidatedOCRDataset(config, transform=TransformConfig())  # our built-in, asked for
    assert ds.pipeline.transform == TransformConfig() and ds.item_keys == "db"

    def their_transform(image, polygons):  # a plain callable without a version
        return image, polygons, np.eye(3)

    # (its own directory: the origin rules decode images another way, alpha dropped)
    config = _config(data_root, cache_dir=str(tmp_path / "c2"))
    with pytest.warns(NotCacheableWarning):
        ds = ValidatedOCRDataset(config, transform=their_transform)
    assert ds.user_transform is their_transform
    sample = ds[0]
    assert sample["image"].shape[2] == 3  # their output, as it is: computed live
    assert not ds.engine.kind_versions().keys() & {"tensors", "maps"}
