"""Prebuilding exactly what a dataset reads: ``prebuild_dataset`` on a user's pipeline (parallel,
resumable, failures reported), ``prebuild --config-name`` from a Hydra tree shaped like the
origin project's, and no build ever replacing records another pipeline wrote."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from testkit import run_cli, snapshot

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.origin import ValidatedOCRDataset
from diskcache_ocr.prebuild import prebuild, prebuild_dataset
from diskcache_ocr.store import CacheStore
from diskcache_ocr.synth import split_paths, synthesize

A = pytest.importorskip("albumentations")
pytest.importorskip("hydra")

from test_user_pipeline import SIDE, my_transform, val_transform  # noqa: E402

N = 5
EVERYTHING = {"load_maps": True, "cache_config": {
    "cache_images": True, "cache_transformed_tensors": True, "cache_maps": True}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prebuild-any")
    synthesize(root, N, seed=12, min_words=3, max_words=6, size=(150, 190), exif_fraction=0.4)
    return root


def albu_dataset(data, cache, **kw):
    return CachedOCRDataset(*split_paths(data), cache, preset=EVERYTHING, convention="origin",
                            transform=val_transform(), **kw)


def read_all(ds):
    """Every sample, then the counters of these reads alone (flushed by close)."""
    if ds.store is not None and (ds.store.path / "data.mdb").exists():
        with CacheStore(ds.store.path) as store:
            store.reset_stats()
    samples = [ds[i] for i in range(len(ds))]
    ds.close()
    with CacheStore(ds.store.path, readonly=True) as store:
        return samples, store.stats()


def equal(a, b):
    import numpy as np
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


# -- prebuild_dataset ---------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_prebuild_dataset_builds_exactly_what_the_dataset_reads(data, tmp_path, workers):
    summary = prebuild_dataset(albu_dataset(data, tmp_path / "c"), workers=workers,
                               progress=False)
    assert (summary.total, summary.built, summary.skipped, summary.failed) == (N, N, 0, [])
    with CacheStore(tmp_path / "c", readonly=True) as store:
        assert store.header()["build"]["clean"] is True
    # a fresh dataset of the same pipeline finds everything: every read hits
    samples, stats = read_all(albu_dataset(data, tmp_path / "c"))
    assert stats.get("tensors.misses", 0) == stats.get("maps.misses", 0) == 0
    assert stats["tensors.hits"] == stats["maps.hits"] == N
    # and the records are the ones a read-through pass writes
    read_all(albu_dataset(data, tmp_path / "rt"))
    assert _same_records(tmp_path / "c", tmp_path / "rt")
    uncached = CachedOCRDataset(*split_paths(data), None, preset="none", convention="origin",
                                transform=val_transform(), load_maps=True)
    assert equal(samples, [uncached[i] for i in range(N)])


def _same_records(a, b):
    sa, sb = snapshot(a), snapshot(b)
    return all(sa[k] == sb[k] for k in ("images", "tensors", "maps"))


def test_prebuild_dataset_resumes_and_reports_failures(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    images, _ = split_paths(root)
    broken = sorted(images.iterdir())[0]
    broken.write_bytes(b"not an image at all")
    ds = CachedOCRDataset(*split_paths(root), tmp_path / "c", preset=EVERYTHING,
                          transform=my_transform, transform_version={"side": SIDE})
    first = prebuild_dataset(ds, workers=2, progress=False)
    assert (first.built, first.skipped, [s for s, _ in first.failed]) == (
        N - 1, 0, [broken.name])
    again = prebuild_dataset(ds, progress=False)  # the same dataset object, built again
    assert (again.built, again.skipped, len(again.failed)) == (0, N - 1, 1)
    # lose one source's tensors record: exactly that one is built again
    with CacheStore(tmp_path / "c") as store:
        key = store.keys("tensors")[0]
        store.delete("tensors", key)
    third = prebuild_dataset(ds, progress=False)
    assert (third.built, third.skipped) == (1, N - 2)


def test_prebuild_dataset_refuses_what_it_cannot_build(data, tmp_path):
    with pytest.raises(ValueError, match="nothing"):
        prebuild_dataset(CachedOCRDataset(*split_paths(data), tmp_path / "c", preset="minimal"),
                         progress=False)
    with pytest.raises(TypeError, match="CachedOCRDataset"):
        prebuild_dataset(object(), progress=False)
    with pytest.raises(ValueError, match="workers"):
        prebuild_dataset(albu_dataset(data, tmp_path / "c"), workers=0)


# -- never replace another pipeline's records ---------------------------------------------------
def dropin_cache(data, cache, **extra):
    """The drop-in (the origin convention's stages) after one validation epoch."""
    images, annotations = split_paths(data)
    ds = ValidatedOCRDataset({"image_path": str(images), "annotation_path": str(annotations),
                              "cache_dir": str(cache), **EVERYTHING, **extra})
    read_all(ds)
    return cache


def test_builtin_prebuild_lives_beside_the_records_of_another_pipeline(data, tmp_path,
                                                                      capsys):
    """The drop-in (origin convention) and the built-in pipeline are pipelines of different
    roles: the built-in build adds its records and keeps every record of the drop-in's."""
    cache = dropin_cache(data, tmp_path / "c")
    before = snapshot(cache)
    assert prebuild(*split_paths(data), cache, progress=False).built == N
    after = snapshot(cache)
    for kind in ("images", "tensors", "maps"):
        assert before[kind].items() <= after[kind].items(), kind  # nothing replaced
    assert len(after["tensors"]) == 2 * N
    # the drop-in still opens its cache (no version error) and hits
    _, stats = read_all(ValidatedOCRDataset(
        {"image_path": str(split_paths(data)[0]), "annotation_path": str(split_paths(data)[1]),
         "cache_dir": str(cache), **EVERYTHING}))
    assert stats["tensors.hits"] >= N and stats.get("tensors.misses", 0) == 0
    rc, out, _ = run_cli(capsys, "status", "--cache", cache, "--json")
    assert rc == 0 and len(json.loads(out)["pipelines"]) == 2


def test_builtin_prebuild_refuses_the_role_a_user_pipeline_holds(data, tmp_path, capsys):
    """A user's Compose under the db convention reading the same images for the same split
    holds the role the built-in build would rebuild: refused, nothing changed."""
    cache = tmp_path / "c"
    read_all(CachedOCRDataset(*split_paths(data), cache, preset=EVERYTHING,
                              transform=val_transform()))
    before = snapshot(cache)
    with pytest.raises(CacheError, match="another pipeline") as caught:
        prebuild(*split_paths(data), cache, progress=False)
    assert "clear --kind tensors" in str(caught.value)
    rc, _, err = run_cli(capsys, "prebuild", "--images", split_paths(data)[0],
                         "--annotations", split_paths(data)[1], "--cache", cache)
    assert rc == 2 and "another pipeline" in err and len(err.strip().splitlines()) == 1
    assert snapshot(cache) == before  # nothing replaced
    # the way the message offers: clear those kinds, then the built-in build may go there
    for kind in ("tensors", "maps"):
        assert run_cli(capsys, "clear", "--cache", cache, "--kind", kind)[0] == 0
    assert prebuild(*split_paths(data), cache, progress=False).built == N


def test_builtin_prebuild_shares_the_images_of_another_pipeline(data, tmp_path, capsys):
    """A build that caches images only shares the decoded images of another pipeline of the
    same decode, and the tensors and maps stay that pipeline's."""
    cache = tmp_path / "c"
    read_all(CachedOCRDataset(*split_paths(data), cache, preset=EVERYTHING,
                              transform=val_transform()))
    summary = prebuild(*split_paths(data), cache, preset="balanced", progress=False)
    assert summary.skipped == N  # the user pipeline's decoded images are the same records
    rc, out, _ = run_cli(capsys, "status", "--cache", cache, "--json")
    status = json.loads(out)
    assert rc == 0 and status["pipeline"]["name"] == "user"
    assert status["kinds"]["tensors"]["up_to_date"] is None  # (not a built-in mismatch)
    rc, out, _ = run_cli(capsys, "health", "--cache", cache, "--json")
    assert rc == 0 and json.loads(out)["problems"] == []
    with pytest.raises(CacheError, match="another pipeline"):
        prebuild(*split_paths(data), cache, progress=False)


def test_builtin_prebuild_leaves_the_images_of_the_origin_rules_alone(data, tmp_path, capsys):
    """The origin's decoding drops alpha where the built-in one composites it: the drop-in's
    decoded images are its own (keyed by content and decode), and a built-in build that
    caches images adds its own beside them, replacing none."""
    cache = dropin_cache(data, tmp_path / "c", read_through_images=True)
    before = snapshot(cache)
    assert prebuild(*split_paths(data), cache, preset="balanced", progress=False).built == N
    after = snapshot(cache)
    for kind in ("images", "tensors", "maps"):
        assert before[kind].items() <= after[kind].items(), kind
    assert len(after["images"]) == 2 * len(before["images"]) == 2 * N
    rc, out, _ = run_cli(capsys, "health", "--cache", cache, "--json")
    assert rc == 0 and json.loads(out)["problems"] == []


# -- from a Hydra tree ----------------------------------------------------------------------------
def preset_file(images, tensors, maps, load_maps):
    b = lambda v: "true" if v else "false"  # noqa: E731
    return textwrap.dedent(f"""\
        # @package _global_.datasets.val_dataset.config
        preload_images: {b(images)}
        load_maps: {b(load_maps)}
        cache_config:
          cache_images: {b(images)}
          cache_transformed_tensors: {b(tensors)}
          cache_maps: {b(maps)}
          log_statistics_every_n: null
        """)


def hydra_tree(root, data, target="diskcache_ocr.origin.ValidatedOCRDataset"):
    """An origin-shaped tree: train.yaml picks `data: base` and a preset; the val dataset's
    transform is the project's own (a module beside configs/, as their `ocr` package is)."""
    images, annotations = split_paths(data)
    conf = root / "configs"
    (conf / "data" / "performance_preset").mkdir(parents=True)
    (root / "prebuild_tree_transforms.py").write_text(textwrap.dedent(f"""\
        import albumentations as A

        def val_compose():
            return A.Compose([A.LongestMaxSize({SIDE}),
                              A.PadIfNeeded({SIDE}, {SIDE}, border_mode=0, value=0),
                              A.Normalize((0.5602,) * 3, (0.2539,) * 3)],
                             keypoint_params=A.KeypointParams(format="xy",
                                                              remove_invisible=False))
        """))
    (conf / "train.yaml").write_text(textwrap.dedent("""\
        defaults:
          - data: base
          - data/performance_preset: none
          - _self_
        transforms:
          val_transform:
            _target_: prebuild_tree_transforms.val_compose
        """))
    (conf / "data" / "base.yaml").write_text(textwrap.dedent(f"""\
        # @package _global_
        datasets:
          val_dataset:
            _target_: {target}
            config:
              image_path: {images}
              annotation_path: {annotations}
              preload_images: false
              load_maps: false
              cache_config:
                cache_images: false
                cache_transformed_tensors: false
                cache_maps: false
            transform: ${{transforms.val_transform}}
        """))
    group = conf / "data" / "performance_preset"
    (group / "none.yaml").write_text(preset_file(0, 0, 0, 0))
    (group / "balanced.yaml").write_text(preset_file(1, 0, 0, 0))
    (group / "validation_optimized.yaml").write_text(preset_file(1, 1, 1, 1))
    return conf


def their_dataset(data, cache, preset="validation_optimized"):
    """What their training run makes of the val node (the preset merged into its config)."""
    images, annotations = split_paths(data)
    flags = {"validation_optimized": EVERYTHING,
             "balanced": {"cache_config": {"cache_images": True}}}[preset]
    return ValidatedOCRDataset({"image_path": str(images), "annotation_path": str(annotations),
                                "cache_dir": str(cache), "preset_name": preset, **flags},
                               transform=val_transform(), preload=False)


def test_prebuild_from_their_hydra_config(data, tmp_path, capsys):
    conf = hydra_tree(tmp_path, data)
    cache = tmp_path / "cache"
    rc, out, err = run_cli(capsys, "prebuild", "--config-dir", conf, "--config-name", "train",
                           "--cache", cache, "--workers", "2", "--json",
                           "data/performance_preset=validation_optimized")
    assert rc == 0, err
    (node,) = json.loads(out)["nodes"]
    assert (node["node"], node["cache"], node["built"], node["failed"]) == (
        "datasets.val_dataset", str(cache), N, [])
    with CacheStore(cache, readonly=True) as store:
        assert store.header()["preset"] == "validation_optimized"
    # their run's dataset reads only hits
    _, stats = read_all(their_dataset(data, cache))
    assert stats.get("tensors.misses", 0) == stats.get("maps.misses", 0) == 0
    assert stats["tensors.hits"] == N
    rc, out, _ = run_cli(capsys, "prebuild", "--config-dir", conf, "--config-name", "train",
                         "--cache", cache, "data/performance_preset=validation_optimized")
    assert rc == 0 and f"datasets.val_dataset -> {cache}:" in out and "0 built" in out


def test_prebuild_from_a_config_never_replaces_silently(data, tmp_path, capsys):
    """The config's dataset (the origin convention) is a pipeline of another role than the
    built-in one: its build adds its records beside the built-in pipeline's, replacing none."""
    conf = hydra_tree(tmp_path, data)
    cache = tmp_path / "cache"
    prebuild(*split_paths(data), cache, progress=False)  # the built-in pipeline's records
    before = snapshot(cache)
    argv = ["prebuild", "--config-dir", conf, "--config-name", "train", "--cache", cache,
            "data/performance_preset=validation_optimized"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    after = snapshot(cache)
    for kind in ("images", "tensors", "maps"):
        assert before[kind].items() <= after[kind].items(), kind
    _, stats = read_all(their_dataset(data, cache))
    assert stats.get("tensors.misses", 0) == 0 and stats["tensors.hits"] == N
    _, stats = read_all(CachedOCRDataset(*split_paths(data), cache,
                                         preset="validation_optimized"))
    assert stats.get("tensors.misses", 0) == 0 and stats["tensors.hits"] == N


@pytest.mark.parametrize("extra, message", [
    (["--node", "datasets.train_dataset"], "no dataset node 'datasets.train_dataset'"),
    (["data/performance_preset=none"], "caches nothing"),
    (["--images", "x"], "--images"),
    (["data/performance_preset=nonexistent"], "nonexistent"),
])
def test_prebuild_from_a_config_explains_what_it_cannot_do(data, tmp_path, capsys, extra,
                                                           message):
    conf = hydra_tree(tmp_path, data)
    rc, _, err = run_cli(capsys, "prebuild", "--config-dir", conf, "--config-name", "train",
                         "--cache", tmp_path / "cache", *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_prebuild_from_a_config_whose_dataset_is_not_ours(data, tmp_path, capsys):
    conf = hydra_tree(tmp_path, data, target="types.SimpleNamespace")
    rc, _, err = run_cli(capsys, "prebuild", "--config-dir", conf, "--config-name", "train",
                         "--cache", tmp_path / "cache")
    assert rc == 2 and "not a diskcache-ocr dataset" in err
    assert not (tmp_path / "cache").exists()


# -- verify --recompute through a user's pipeline ---------------------------------------------
def _spoil_one_tensor(cache):
    """A valid but wrong tensors record (one value changed, checksum rewritten)."""
    with CacheStore(cache) as store:
        entries = dict(store.iter_index())
        source = sorted(entries)[1]
        key = dict(entries[source].records())["tensors"]
        record = store.get("tensors", key)
        record["image"] = record["image"].copy()
        record["image"].flat[0] += 1
        with store.writer() as w:
            w.put("tensors", key, record)
    return source


def test_verify_recompute_through_a_user_pipeline(data, tmp_path, capsys):
    from diskcache_ocr.ops import verify

    cache = tmp_path / "c"
    prebuild_dataset(albu_dataset(data, cache), progress=False)
    report = verify(cache, recompute=N, dataset=albu_dataset(data, cache, readonly=True))
    assert (report["corrupt"], report["mismatched"]) == ([], [])
    source = _spoil_one_tensor(cache)
    assert verify(cache)["corrupt"] == []  # a valid record: only recomputing can tell
    report = verify(cache, recompute=N, dataset=albu_dataset(data, cache, readonly=True))
    assert report["mismatched"] == [f"{source} tensors.image"]
    # without the dataset, the command line says how to recompute such a cache
    rc, _, err = run_cli(capsys, "verify", "--cache", cache, "--recompute", "1")
    assert rc == 2 and "--config-name" in err


def test_verify_recompute_from_their_hydra_config(data, tmp_path, capsys):
    conf = hydra_tree(tmp_path, data)
    cache = tmp_path / "cache"
    argv = ["--config-dir", conf, "--config-name", "train", "--cache", cache,
            "data/performance_preset=validation_optimized"]
    assert run_cli(capsys, "prebuild", *argv)[0] == 0
    rc, out, err = run_cli(capsys, "verify", "--recompute", N, "--json", *argv)
    assert rc == 0, err
    data_ = json.loads(out)
    assert (data_["node"], data_["cache"], data_["mismatched"]) == (
        "datasets.val_dataset", str(cache), [])
    source = _spoil_one_tensor(cache)
    rc, out, _ = run_cli(capsys, "verify", "--recompute", N, *argv)
    assert rc == 1 and f"mismatch: {source} tensors.image" in out
