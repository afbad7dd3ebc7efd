"""The origin project's Hydra tree, written here from what its users' configs hold, with and
without its own preset files: each ``data/performance_preset=X`` override reaches the dataset
with the right settings, with no deprecation warning and no duplicate keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from diskcache_ocr.presets import PRESET_NAMES
from diskcache_ocr.synth import split_paths, synthesize

hydra = pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diskcache_ocr.hydra import register_presets  # noqa: E402
from diskcache_ocr.origin import preset_from_config  # noqa: E402

# The origin's comparison table: images, tensors, maps, preload images, preload maps, load maps
TABLE = {
    "none": (0, 0, 0, 0, 0, 0),
    "minimal": (0, 0, 0, 0, 0, 0),
    "balanced": (1, 0, 0, 0, 0, 0),
    "validation_optimized": (1, 1, 1, 1, 1, 1),
    "memory_efficient": (0, 0, 0, 0, 0, 0),
    "custom": (1, 0, 1, 0, 0, 1),  # the README's custom.yaml
}
SPLITS = ("train", "val", "test", "predict")
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "coming-from-the-origin.md"
PRESETS_PAGE = GUIDE.parent / "presets.md"


def readme_blocks(title: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of one section of the origin guide, or of the presets page
    (``title="Presets"``)."""
    if title == "Presets":
        section = PRESETS_PAGE.read_text(encoding="utf-8")
    else:
        text = GUIDE.read_text(encoding="utf-8")
        section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split(f"```{lang}\n")[1:]]


def the_two_lines() -> dict:
    """What the guide tells an origin user to change in the val dataset's entry."""
    import yaml

    return yaml.safe_load(readme_blocks("Coming from the origin project", "yaml")[0])


def _dataset(split: str, data_root: Path, changed: dict) -> str:
    images, annotations = split_paths(data_root, split)
    target = changed.get("_target_", "their.Dataset")
    transform = changed.get("transform", "${transforms.val_transform}")
    transform = "null" if transform is None else transform
    return textwrap.dedent(f"""\
      {split}_dataset:
        _target_: {target}
        config:
          _target_: types.SimpleNamespace
          image_path: {images}
          annotation_path: {annotations}
          preload_images: false
          load_maps: false
          cache_config:
            cache_images: false
            cache_transformed_tensors: false
            cache_maps: false
            log_statistics_every_n: null
        transform: {transform}
    """)


def write_tree(root: Path, data_root: Path) -> Path:
    """configs/ shaped like the origin's: train.yaml picks `data: base` and a preset; base.yaml
    is `_global_` and defines the four datasets and the collate function."""
    conf = root / "configs"
    (conf / "data").mkdir(parents=True)
    (conf / "train.yaml").write_text(
        "defaults:\n  - data: base\n  - data/performance_preset: none\n  - _self_\n"
        "transforms:\n  val_transform: null\n")
    datasets = "".join(
        textwrap.indent(_dataset(s, data_root, the_two_lines() if s == "val" else {}), "  ")
        for s in SPLITS)
    (conf / "data" / "base.yaml").write_text(
        "# @package _global_\ndatasets:\n" + datasets
        + "collate_fn:\n  _target_: their.DBCollateFN\n  shrink_ratio: 0.4\n"
          "  thresh_min: 0.3\n  thresh_max: 0.7\n")
    return conf


def origin_preset_file(name: str) -> str:
    c = TABLE[name]
    b = lambda i: "true" if c[i] else "false"  # noqa: E731
    return textwrap.dedent(f"""\
        # @package _global_.datasets.val_dataset.config
        preload_images: {b(3)}
        preload_maps: {b(4)}
        prenormalize_images: false
        load_maps: {b(5)}
        cache_config:
          cache_images: {b(0)}
          cache_maps: {b(2)}
          cache_transformed_tensors: {b(1)}
          log_statistics_every_n: 100
        image_loading_config:
          use_turbojpeg: {b(0)}
          turbojpeg_fallback: {b(0)}
        """)


CUSTOM = textwrap.dedent("""\
    # @package _global_.datasets.val_dataset.config

    # My custom preset
    cache_config:
      cache_images: true
      cache_tensors: false  # Safe setting
      cache_maps: true
      log_statistics_every_n: 50  # More frequent logging

    preload_images: false  # Save startup time
    load_maps: true        # Enable evaluation
    """)


def write_their_presets(conf: Path) -> None:
    group = conf / "data" / "performance_preset"
    group.mkdir(parents=True)
    for name in PRESET_NAMES:
        (group / f"{name}.yaml").write_text(origin_preset_file(name))
    (group / "custom.yaml").write_text(CUSTOM)
    (group / "fast_val.yaml").write_text(CUSTOM)  # another copy: named after its file


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("origin-data")
    synthesize(root, 2, seed=5, min_words=3, max_words=6, size=(200, 260))
    return root


def _forget_presets() -> None:
    data = ConfigStore.instance().repo.get("data")
    if isinstance(data, dict):
        data.pop("performance_preset", None)
        data.pop("train_performance_preset", None)


@pytest.fixture
def clean_store():
    """ConfigStore is process-wide: each test starts and ends without preset groups."""
    _forget_presets()
    yield
    _forget_presets()
    GlobalHydra.instance().clear()


def _compose(conf: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg, [str(w.message) for w in caught]


def _flags(cfg_node) -> tuple[int, ...]:
    p = preset_from_config(cfg_node)
    return tuple(int(x) for x in (p.cache_images, p.cache_tensors, p.cache_maps,
                                  p.preload_images, p.preload_maps, p.load_maps))


def _untouched(cfg) -> None:
    for split in ("train", "test", "predict"):
        cache = cfg.datasets[f"{split}_dataset"].config.cache_config
        assert not (cache.cache_images or cache.cache_maps or cache.cache_transformed_tensors)


# -- (a) their tree with their own preset files -------------------------------------------
@pytest.mark.parametrize("name", [*PRESET_NAMES, "custom"])
def test_their_preset_files_win_without_warnings(tmp_path, data_root, clean_store, name):
    conf = write_tree(tmp_path, data_root)
    write_their_presets(conf)
    assert register_presets(config_dirs=[conf]) == []  # every name is theirs: steps aside
    cfg, caught = _compose(conf, f"data/performance_preset={name}")
    assert caught == []
    val = cfg.datasets.val_dataset.config
    assert _flags(val) == TABLE[name]
    # Their files and base config spell tensor caching one way; only the README's custom.yaml
    # spells it the other way, and the two keys then agree.
    tensor_keys = {"cache_tensors", "cache_transformed_tensors"} & set(val.cache_config)
    assert tensor_keys == ({"cache_tensors", "cache_transformed_tensors"} if name == "custom"
                           else {"cache_transformed_tensors"})
    _untouched(cfg)


def test_their_tree_with_only_some_files_gets_ours_in_the_same_place(tmp_path, data_root,
                                                                      clean_store):
    conf = write_tree(tmp_path, data_root)
    group = conf / "data" / "performance_preset"
    group.mkdir()
    (group / "none.yaml").write_text(origin_preset_file("none"))
    assert register_presets(config_dirs=[conf]) == [n for n in PRESET_NAMES if n != "none"]
    cfg, caught = _compose(conf, "data/performance_preset=validation_optimized")
    assert caught == []
    assert _flags(cfg.datasets.val_dataset.config) == TABLE["validation_optimized"]
    assert "data" not in cfg  # placed by their files' @package line, not under data.


# -- (b) a tree without preset files ----------------------------------------------------------
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_registered_group_reaches_the_val_dataset_of_a_global_tree(tmp_path, data_root,
                                                                   clean_store, name):
    conf = write_tree(tmp_path, data_root)
    stored = register_presets(package="_global_.datasets.val_dataset.config",
                              config_dirs=[conf])
    assert stored == list(PRESET_NAMES)
    cfg, caught = _compose(conf, f"data/performance_preset={name}")
    assert caught == []
    val = cfg.datasets.val_dataset.config
    assert _flags(val) == TABLE[name]
    assert "cache_tensors" not in val.cache_config  # our files use the origin's key names
    _untouched(cfg)


def test_defaults_line_inside_a_global_data_config(tmp_path, data_root, clean_store):
    """The preset chosen in the `_global_` base.yaml itself: the absolute group path keeps
    the short override working; ``_self_`` first, so the preset wins over the base values."""
    conf = write_tree(tmp_path, data_root)
    (conf / "train.yaml").write_text("defaults:\n  - data: base\n  - _self_\n"
                                     "transforms:\n  val_transform: null\n")
    base = (conf / "data" / "base.yaml").read_text()
    (conf / "data" / "base.yaml").write_text(base.replace(
        "# @package _global_\n",
        "# @package _global_\ndefaults:\n  - _self_\n  - /data/performance_preset: minimal\n"))
    register_presets(package="_global_.datasets.val_dataset.config", config_dirs=[conf])
    cfg, _ = _compose(conf)
    assert _flags(cfg.datasets.val_dataset.config) == TABLE["minimal"]
    cfg, caught = _compose(conf, "data/performance_preset=balanced")
    assert caught == [] and _flags(cfg.datasets.val_dataset.config) == TABLE["balanced"]


def test_one_group_per_dataset(tmp_path, data_root, clean_store):
    conf = write_tree(tmp_path, data_root)
    (conf / "train.yaml").write_text(
        "defaults:\n  - data: base\n  - data/performance_preset: validation_optimized\n"
        "  - data/train_performance_preset: minimal\n  - _self_\n"
        "transforms:\n  val_transform: null\n")
    register_presets(package="_global_.datasets.val_dataset.config", config_dirs=[conf])
    register_presets("data/train_performance_preset",
                     package="_global_.datasets.train_dataset.config", config_dirs=[conf])
    cfg, _ = _compose(conf)
    assert _flags(cfg.datasets.val_dataset.config) == TABLE["validation_optimized"]
    assert _flags(cfg.datasets.train_dataset.config) == TABLE["minimal"]
    cfg, caught = _compose(conf, "data/train_performance_preset=balanced",
                           "data/performance_preset=minimal")
    assert caught == []
    assert _flags(cfg.datasets.train_dataset.config) == TABLE["balanced"]
    assert _flags(cfg.datasets.val_dataset.config) == TABLE["minimal"]


def test_plain_data_layout_keeps_the_node_under_data(tmp_path, data_root, clean_store):
    conf = write_tree(tmp_path, data_root)
    register_presets(config_dirs=[conf])
    cfg, caught = _compose(conf, "data/performance_preset=balanced")
    assert caught == []
    node = OmegaConf.to_container(cfg.data.performance_preset)
    assert _flags(node) == TABLE["balanced"]


# -- a real Hydra app, instantiating the val dataset ------------------------------------------
APP = textwrap.dedent("""\
    import json
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from diskcache_ocr.hydra import register_presets

    REGISTER

    @hydra.main(version_base=None, config_path="configs", config_name="train")
    def main(cfg):
        ds = instantiate(cfg.datasets.val_dataset)
        p = ds.preset
        header = ds.store.header()["preset"] if ds.store is not None else None
        print("RESULT " + json.dumps({
            "choice": HydraConfig.get().runtime.choices["data/performance_preset"],
            "name": p.name, "header": header, "len": len(ds),
            "flags": [int(x) for x in (p.cache_images, p.cache_tensors, p.cache_maps,
                                       p.preload_images, p.preload_maps, p.load_maps)],
        }))

    main()
    """)


def _run_app(root: Path, register: str, names: list[str]) -> tuple[dict[str, dict], str]:
    (root / "app.py").write_text(APP.replace("REGISTER", register))
    env = {**os.environ, "DISKCACHE_OCR_DIR": str(root / "cache")}
    done = subprocess.run(
        [sys.executable, "app.py", "--multirun", f"data/performance_preset={','.join(names)}",
         f"hydra.sweep.dir={root / 'multirun'}", "hydra/job_logging=none",
         "hydra/hydra_logging=none"],
        cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line[7:]) for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    return {r["choice"]: r for r in results}, done.stderr


@pytest.mark.full
def test_their_app_with_their_files_and_the_changed_target(tmp_path, data_root):
    conf = write_tree(tmp_path, data_root)
    write_their_presets(conf)
    names = [*PRESET_NAMES, "custom", "fast_val"]
    # register_presets() as a user who follows our README would also call it: it steps aside.
    results, stderr = _run_app(tmp_path, "register_presets()", names)
    assert "deprecated" not in stderr and "schema" not in stderr, stderr[-2000:]
    assert sorted(results) == sorted(names)
    for name, r in results.items():
        assert tuple(r["flags"]) == TABLE[name.replace("fast_val", "custom")], name
        assert r["name"] == name and r["len"] == 2
        caches = any(TABLE[name.replace("fast_val", "custom")][:3])
        assert r["header"] == (name if caches else None)
    assert (tmp_path / "cache" / "data.mdb").exists()  # $DISKCACHE_OCR_DIR, as the CLI uses


@pytest.mark.full
def test_their_app_without_preset_files(tmp_path, data_root):
    write_tree(tmp_path, data_root)
    results, stderr = _run_app(
        tmp_path, 'register_presets(package="_global_.datasets.val_dataset.config")',
        list(PRESET_NAMES))
    assert "deprecated" not in stderr
    assert {n: tuple(r["flags"]) for n, r in results.items()} == {
        n: TABLE[n] for n in PRESET_NAMES}
    assert all(r["name"] == n for n, r in results.items())


def test_the_guide_lines_are_the_tested_ones():
    lines = the_two_lines()
    # one line changes; their transform stays theirs
    assert lines == {"_target_": "diskcache_ocr.origin.ValidatedOCRDataset",
                     "transform": "${transforms.val_transform}"}
    override = next(b for b in readme_blocks("Coming from the origin project", "bash")
                    if "data/performance_preset=" in b).split()
    assert override[-1] == "data/performance_preset=validation_optimized"
    presets = "".join(readme_blocks("Presets", "python"))
    for call in ('register_presets()', 'register_presets(package="_global_.datasets.'
                 'val_dataset.config")', 'register_presets("data/train_performance_preset", '
                 'package="_global_.datasets.train_dataset.config")'):
        assert call in presets, call
