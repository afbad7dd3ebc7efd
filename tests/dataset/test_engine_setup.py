"""The decisions between a dataset's arguments and its engine (``engine_setup``): each refusal
and its message, the pipeline chosen, the plan's overrides, what opening does to the cache;
the engine of an existing cache from its header; and the loader and the build working from an
engine alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.engine_setup import (
    EngineOptions,
    choose,
    engine_from_header,
    engine_of,
    header_pipeline,
    open_engine,
)
from diskcache_ocr.errors import CacheError, TrainingSafetyError
from diskcache_ocr.loader import BatchLoader
from diskcache_ocr.ocr.annotations import load_annotations
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.staged import StagePipeline
from diskcache_ocr.ocr.transform import TRAINING, VALIDATION, TransformConfig
from diskcache_ocr.prebuild import prebuild, prebuild_dataset
from diskcache_ocr.readthrough import ReadThrough
from diskcache_ocr.samples import Catalog
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths

N = 4
EVERYTHING = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}


@pytest.fixture(scope="module")
def data(synth_data):
    return synth_data(N, 31, min_words=2, max_words=5, size=(120, 160))


def catalog_of(data, rules="db"):
    return Catalog(load_annotations(*split_paths(data), rules))


def versioned(image, polygons):
    """A user's callable transform (deterministic): the image as float CHW in [0, 1]."""
    return (image.transpose(2, 0, 1).astype(np.float32) / 255, list(polygons),
            np.eye(3))


# -- refusals: each names what does not go together -------------------------------------------
@pytest.mark.parametrize("options, error, message", [
    ({"convention": "origin", "transform": TransformConfig()}, CacheError,
     r"imgs: a TransformConfig is the built-in transform of the 'db' convention; with "
     r"convention='origin' leave transform out"),
    ({"transform_version": "1"}, CacheError,
     "transform_version/maps_version are for a transform or maps callable you pass"),
    ({"maps_version": "1"}, CacheError, "transform_version/maps_version are for"),
    ({"item_keys": "yolo"}, CacheError, "item_keys must be 'db' or 'origin', got 'yolo'"),
    ({"convention": "origin", "map_config": MapConfig()}, CacheError,
     "map_config is the reference DBNet maker's; with convention='origin'"),
    ({"output": "float16"}, ValueError, "output must be 'float32' or 'compact', got 'float16'"),
])
def test_choose_refuses_arguments_that_do_not_go_together(options, error, message):
    with pytest.raises(error, match=message):
        choose(EngineOptions(images_dir="imgs", **options))


def test_choose_refuses_a_random_transform_whose_output_the_plan_caches():
    A = pytest.importorskip("albumentations")
    random_only = A.Compose([A.HorizontalFlip(p=0.5)],
                            keypoint_params=A.KeypointParams(format="xy"))
    options = EngineOptions(preset=EVERYTHING, split="train", transform=random_only)
    with pytest.raises(TrainingSafetyError, match="caches tensors/maps, but the 'train' split"):
        choose(options)
    with pytest.warns(UserWarning, match="not deterministic"):
        allowed = choose(EngineOptions(preset=EVERYTHING, split="train", transform=random_only,
                                       allow_random_tensor_cache=True))
    # A random transform's output is never cached, allowed or not: only the decoded images.
    assert allowed.plan.cached == frozenset({"images"})


def test_a_random_compose_caches_its_deterministic_prefix_in_place_of_the_image():
    A = pytest.importorskip("albumentations")
    compose = A.Compose([A.LongestMaxSize(64), A.HorizontalFlip(p=0.5)],
                        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
    choice = choose(EngineOptions(preset={"cache_config": {"cache_images": True}},
                                  split="train", transform=compose))
    assert choice.plan.cached == frozenset({"tensors"})


# -- the pipeline chosen -----------------------------------------------------------------------
@pytest.mark.parametrize("split, transform", [("train", TRAINING), ("val", VALIDATION),
                                              ("test", VALIDATION)])
def test_the_built_in_pipeline_takes_the_splits_transform(split, transform):
    choice = choose(EngineOptions(split=split))
    assert type(choice.pipeline) is Pipeline
    assert choice.pipeline.transform == transform and choice.pipeline.maps == MapConfig()
    assert (choice.item_keys, choice.rules) == ("db", "db")


def test_a_transform_config_and_map_config_keep_the_built_in_pipeline():
    config, maps = TransformConfig(size=320), MapConfig(shrink_ratio=0.5)
    choice = choose(EngineOptions(split="train", transform=config, map_config=maps,
                                  convention="db"))
    assert type(choice.pipeline) is Pipeline
    assert choice.pipeline.transform == config and choice.pipeline.maps == maps


@pytest.mark.parametrize("options, convention, keys", [
    ({"convention": "origin"}, "origin", "origin"),
    ({"convention": "origin", "item_keys": "db"}, "origin", "db"),
    ({"transform": versioned, "transform_version": "v1"}, "db", "db"),
    ({"maps": lambda polygons, h, w, ignore=None: {}, "maps_version": "m1"}, "db", "db"),
])
def test_a_convention_or_a_users_stage_chooses_stages(options, convention, keys):
    choice = choose(EngineOptions(**options))
    assert isinstance(choice.pipeline, StagePipeline)
    assert choice.pipeline.convention == convention and choice.item_keys == keys
    assert choice.rules == ("origin" if convention == "origin" else "db")


def test_choose_opens_nothing(tmp_path):
    choose(EngineOptions(cache_dir=tmp_path / "cache", preset="validation_optimized"))
    assert not (tmp_path / "cache").exists()


# -- the plan and its overrides ------------------------------------------------------------------
@pytest.mark.parametrize("load_maps", [None, True, False])
def test_load_maps_overrides_the_presets(load_maps):
    preset_says = choose(EngineOptions(preset="balanced")).plan.return_maps
    plan = choose(EngineOptions(preset="balanced", load_maps=load_maps)).plan
    assert plan.return_maps == (preset_says if load_maps is None else load_maps)
    assert plan.name == "balanced"


def test_output_follows_the_preset_unless_given():
    assert choose(EngineOptions(preset={"output": "compact"})).output == "compact"
    assert choose(EngineOptions(preset={"output": "compact"}, output="float32")).output \
        == "float32"
    assert choose(EngineOptions(output="compact")).output == "compact"


def test_compact_output_of_a_transform_without_a_final_normalize_is_float32():
    choice = choose(EngineOptions(transform=versioned, transform_version="v1",
                                  output="compact"))
    assert choice.output == "float32"
    assert choice.pipeline.compact  # (asked for; the pipeline itself has no form to finish)


# -- opening the engine ---------------------------------------------------------------------------
def test_a_plan_that_caches_nothing_opens_no_store(data, tmp_path):
    options = EngineOptions(cache_dir=tmp_path / "cache", preset="none")
    engine = open_engine(options, choose(options), catalog_of(data))
    assert engine.store is None and not (tmp_path / "cache").exists()
    assert len(engine.catalog) == N


def test_a_random_built_in_transform_is_refused_before_anything_opens(data, tmp_path):
    options = EngineOptions(cache_dir=tmp_path / "cache", preset="validation_optimized",
                            split="train")
    with pytest.raises(TrainingSafetyError, match="'validation_optimized' caches tensors/maps"):
        choose(options)
    assert not (tmp_path / "cache").exists()
    assert choose(EngineOptions(preset="balanced", split="train")).plan.name == "balanced"
    allowed = EngineOptions(cache_dir=tmp_path / "cache", preset="validation_optimized",
                            split="train", allow_random_tensor_cache=True, preload=False)
    with pytest.warns(UserWarning, match="not deterministic"):
        choice = choose(allowed)
    assert open_engine(allowed, choice, catalog_of(data)).store is not None


@pytest.mark.parametrize("pipeline", ["built-in", "stages"])
def test_an_allowed_random_cache_is_warned_about_at_the_datasets_caller(data, tmp_path,
                                                                        pipeline):
    transform = None
    if pipeline == "stages":
        A = pytest.importorskip("albumentations")
        transform = A.Compose([A.HorizontalFlip(p=0.5)],
                              keypoint_params=A.KeypointParams(format="xy"))
    with pytest.warns(UserWarning, match="not deterministic") as warned:
        CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset=EVERYTHING,
                         split="train", transform=transform, allow_random_tensor_cache=True,
                         preload=False).close()
    assert [w.filename for w in warned if "not deterministic" in str(w.message)] == [__file__]


def test_opening_stamps_the_header_preloads_and_closes_the_store(data, tmp_path):
    options = EngineOptions(cache_dir=tmp_path / "cache", preset="validation_optimized",
                            preload=True)
    catalog = catalog_of(data)
    engine = open_engine(options, choose(options), catalog)
    assert not engine.store.is_open  # nothing stays open across a fork
    assert engine.missing(range(N)) == ([], [])  # preloaded
    header = engine.store.header()
    assert header["dataset_root"] == str(catalog.images_dir)
    assert header["preset"] == "validation_optimized" and header["stage_pipeline"] is None
    assert TransformConfig.from_dict(header["pipeline"]["transform"]) == VALIDATION
    assert MapConfig.from_dict(header["pipeline"]["maps"]) == MapConfig()
    engine.store.close()


def test_a_read_only_open_stamps_nothing(data, tmp_path):
    writer = EngineOptions(cache_dir=tmp_path / "cache", preset="balanced", preload=False)
    open_engine(writer, choose(writer), catalog_of(data)).store.close()
    with CacheStore(tmp_path / "cache") as store:
        store.update_header(preset="someone else's")
    reader = EngineOptions(cache_dir=tmp_path / "cache", preset="balanced", readonly=True)
    open_engine(reader, choose(reader), catalog_of(data)).store.close()
    with CacheStore(tmp_path / "cache", readonly=True) as store:
        assert store.header()["preset"] == "someone else's"


def test_the_dataset_is_the_face_of_what_was_chosen(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset="balanced",
                          convention="origin", load_maps=True, preload=False)
    choice = choose(EngineOptions(preset="balanced", convention="origin", load_maps=True))
    assert (ds.plan, ds.output, ds.item_keys) == (choice.plan, choice.output, choice.item_keys)
    assert engine_of(ds) is ds.engine and ds.engine.plan == ds.plan
    assert ds.pipeline.describe() == choice.pipeline.describe()
    ds.close()


# -- the engine of an existing cache, from its header ---------------------------------------------
def recomputed_equals_cached(engine, cache):
    """Every record ``engine`` recomputes for each image equals the cached one."""
    with CacheStore(cache, readonly=True) as store:
        for index in range(len(engine.catalog)):
            path = engine.catalog.images_dir / engine.catalog.source(index)
            fresh = engine.recompute(index, path.read_bytes())
            assert set(fresh) == {"images", "tensors", "maps"}
            for kind, (key, arrays) in fresh.items():
                cached = store.get(kind, key)
                assert cached is not None, kind
                for name, array in arrays.items():
                    assert cached[name].dtype == array.dtype, (kind, name)
                    assert np.array_equal(cached[name], array), (kind, name)


@pytest.mark.parametrize("made_by", [
    {"transform": TransformConfig(size=96)},  # the built-in pipeline, with its parameters
    {"convention": "origin"},                 # a convention's own stages
])
def test_the_engine_of_a_cache_recomputes_by_the_pipeline_its_header_records(data, tmp_path,
                                                                             made_by):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset=EVERYTHING,
                          preload=True, **made_by)
    header = ds.store.header()
    ds.close()
    rules = choose(EngineOptions(**made_by)).rules  # (how its dataset read the annotations)
    engine = engine_from_header(header, catalog_of(data, rules), where=tmp_path / "cache")
    assert engine.store is None and not engine.plan.caches_anything
    assert type(engine.pipeline) is type(ds.pipeline)
    recomputed_equals_cached(engine, tmp_path / "cache")


def test_a_header_with_no_pipeline_means_the_default_one():
    assert header_pipeline({}) == Pipeline(transform=TransformConfig(), maps=MapConfig())


@pytest.mark.parametrize("stages", [
    {"convention": "origin", "transform": "x", "maps": "y"},
    {"convention": "nobody's", "transform": None, "maps": None},
])
def test_a_user_pipelines_cache_is_refused_with_where_to_recompute(data, stages):
    with pytest.raises(CacheError, match=r"^/c/x: built by a user pipeline .* cannot rebuild; "
                                         r"recompute through its dataset"):
        engine_from_header({"stage_pipeline": stages}, catalog_of(data), where="/c/x")


def test_a_convention_with_the_users_own_transform_is_refused(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset=EVERYTHING,
                          convention="origin", transform=versioned, transform_version="v1",
                          preload=False)
    header = ds.store.header()
    ds.close()
    assert header["stage_pipeline"]["convention"] == "origin"
    with pytest.raises(CacheError, match="cannot rebuild"):
        header_pipeline(header, where=tmp_path / "cache")


# -- the loader and the build, from an engine -----------------------------------------------------
def same(a, b):
    """Equal structures, arrays and tensors equal in dtype and every value."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_engine_of_takes_a_dataset_or_an_engine_and_nothing_else(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), None, preset="none")
    assert engine_of(ds) is ds.engine and engine_of(ds.engine) is ds.engine
    with pytest.raises(TypeError, match="BatchLoader takes a CachedOCRDataset or its engine "
                                        r"\(a ReadThrough\), got list"):
        engine_of([ds], "BatchLoader")
    with pytest.raises(TypeError, match="got list"):
        BatchLoader([ds])


@pytest.mark.parametrize("output", ["float32", "compact"])
def test_a_batch_loader_reads_from_an_engine_as_from_its_dataset(data, tmp_path, output):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset="validation_optimized",
                          output=output)
    by_dataset = list(BatchLoader(ds, batch_size=3, threads=1))
    engine = ds.engine
    assert isinstance(engine, ReadThrough)
    with BatchLoader(engine, batch_size=3, threads=1, output=output) as loader:
        by_engine = list(loader)
    assert len(by_engine) == len(by_dataset) == 2
    assert same(by_engine, by_dataset)
    ds.close()


def test_a_batch_loader_from_an_engine_yields_float32_unless_told(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset="validation_optimized",
                          output="compact")
    (batch, *_rest) = BatchLoader(ds.engine, batch_size=2, threads=1)
    assert batch["image"].dtype == torch.float32 and "finish" not in batch
    (compact, *_rest) = BatchLoader(ds, batch_size=2, threads=1)
    assert compact["image"].dtype == torch.uint8
    with pytest.raises(ValueError, match="output must be 'float32' or 'compact', got 'half'"):
        BatchLoader(ds.engine, output="half")
    ds.close()


def test_prebuild_builds_from_an_engine(data, tmp_path):
    ds = CachedOCRDataset(*split_paths(data), tmp_path / "cache", preset="validation_optimized",
                          preload=False)
    assert len(ds.engine.missing(range(N))[0]) == N
    summary = prebuild_dataset(ds.engine, progress=False)
    assert (summary.built, summary.total, summary.failed) == (N, N, [])
    assert ds.engine.missing(range(N)) == ([], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prebuild_dataset(ds, progress=False).skipped == N  # resumable: all there
    ds.close()


def test_prebuild_of_an_allowed_random_cache_warns_once(data, tmp_path):
    with pytest.warns(UserWarning, match="not deterministic") as warned:
        summary = prebuild(*split_paths(data), tmp_path / "cache", split="train",
                           allow_random_tensor_cache=True, progress=False)
    assert summary.built == N
    assert len([w for w in warned if "not deterministic" in str(w.message)]) == 1
    with pytest.raises(TrainingSafetyError):
        prebuild(*split_paths(data), tmp_path / "cache", split="train", progress=False)
