from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from diskcache_ocr.errors import PresetError
from diskcache_ocr.presets import PRESET_NAMES, Preset, load_preset, preset_path

TABLE = {  # the design's table: images, tensors, maps, preload images, preload maps, load maps
    "none": (0, 0, 0, 0, 0, 0),
    "minimal": (0, 0, 0, 0, 0, 0),
    "balanced": (1, 0, 0, 0, 0, 0),
    "validation_optimized": (1, 1, 1, 1, 1, 1),
    "memory_efficient": (0, 0, 0, 0, 0, 0),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_each_preset_matches_the_table(name):
    p = load_preset(name)
    got = (p.cache_images, p.cache_tensors, p.cache_maps, p.preload_images, p.preload_maps,
           p.load_maps)
    assert tuple(map(int, got)) == TABLE[name]
    assert p.safe_for_training == (name != "validation_optimized")
    assert p.name == name


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_files_use_the_origin_keys(name):
    data = yaml.safe_load(preset_path(name).read_text())
    assert set(data["cache_config"]) == {"cache_images", "cache_transformed_tensors",
                                         "cache_maps", "log_statistics_every_n"}
    assert {"preload_images", "preload_maps", "prenormalize_images", "load_maps"} <= set(data)
    assert set(data["image_loading_config"]) == {"use_turbojpeg", "turbojpeg_fallback"}


# An origin preset file, written from the keys and values its users have.
ORIGIN_FILE = """\
# @package _global_.datasets.val_dataset.config
preload_images: true
preload_maps: true
prenormalize_images: false
load_maps: true
cache_config:
  cache_images: true
  cache_maps: true
  cache_transformed_tensors: true
  log_statistics_every_n: 100
image_loading_config:
  use_turbojpeg: true
  turbojpeg_fallback: true
"""


def test_an_origin_file_loads_as_it_is(tmp_path, caplog):
    path = tmp_path / "validation_optimized.yaml"
    path.write_text(ORIGIN_FILE)
    with caplog.at_level("INFO", logger="diskcache_ocr.presets"):
        p = load_preset(path)
    assert p == Preset(name="validation_optimized", cache_images=True, cache_tensors=True,
                       cache_maps=True, preload_images=True, preload_maps=True, load_maps=True,
                       use_turbojpeg=True, turbojpeg_fallback=True)
    assert set(p.no_effect()) == {"use_turbojpeg", "turbojpeg_fallback"}
    reported = [r.getMessage() for r in caplog.records]
    assert any("use_turbojpeg has no effect here" in m for m in reported), reported
    assert load_preset("validation_optimized").no_effect() == {}


def test_origin_and_our_spelling_of_tensor_caching(tmp_path):
    assert load_preset({"cache_config": {"cache_transformed_tensors": True}}).cache_tensors
    assert load_preset({"cache_config": {"cache_tensors": True}}).cache_tensors
    both = {"cache_config": {"cache_tensors": True, "cache_transformed_tensors": True}}
    assert load_preset(both).cache_tensors
    bad = tmp_path / "two.yaml"
    bad.write_text("cache_config:\n  cache_tensors: true\n  cache_transformed_tensors: false\n")
    with pytest.raises(PresetError, match="two.yaml.*same setting and disagree"):
        load_preset(bad)


def test_null_statistics_interval_means_never(tmp_path):
    f = tmp_path / "quiet.yaml"
    f.write_text("cache_config:\n  cache_images: true\n  log_statistics_every_n: null\n")
    p = load_preset(f)
    assert p.log_statistics_every_n == 0 and p.name == "quiet"
    assert p.to_dict()["cache_config"]["log_statistics_every_n"] == 0


@pytest.mark.parametrize("text, match", [
    ("image_loading_config:\n  use_libjpeg: true\n", "image_loading_config.use_libjpeg"),
    ("image_loading_config: true\n", "image_loading_config must be a mapping"),
    ("image_loading_config:\n  use_turbojpeg: 1\n", "use_turbojpeg must be true or false"),
    ("prenormalize_images: maybe\n", "prenormalize_images must be true or false"),
    ("prenormalise_images: true\n", "'prenormalise_images'"),
])
def test_origin_keys_are_still_checked(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(PresetError, match=match):
        load_preset(f)


def test_a_preset_nested_too_deeply_is_one_clear_error(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("cache_config: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(PresetError, match="deep.yaml: cannot read preset"):
        load_preset(deep)


def test_a_mapping_preset_takes_a_name():
    p = load_preset({"cache_config": {"cache_images": True}}, name="mine")
    assert p.name == "mine"
    assert load_preset({}).name == "custom"


def test_built_in_presets_load_from_a_source_tree(monkeypatch):
    """Without the installed ``diskcache_ocr.preset_files`` the repository's presets/ serve."""
    import importlib.resources

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    path = preset_path("balanced")
    assert path == Path(__file__).resolve().parents[2] / "presets" / "balanced.yaml"
    assert load_preset("balanced").cache_images


def test_memory_efficient_turns_read_ahead_off():
    assert not load_preset("memory_efficient").readahead and load_preset("minimal").readahead


def test_custom_copy_loads(tmp_path):
    custom = tmp_path / "custom.yaml"
    text = preset_path("balanced").read_text().replace("cache_maps: false", "cache_maps: true")
    custom.write_text(text)
    p = load_preset(custom)
    assert p.name == "custom" and p.cache_maps and p.cache_images and not p.cache_tensors
    other = tmp_path / "my_fast_val.yaml"
    other.write_text(text)
    assert load_preset(other).name == "my_fast_val"
    assert load_preset(str(custom)) == p


@pytest.mark.parametrize(
    "text, match",
    [
        ("cache_config:\n  cache_imgs: true\n", "cache_config.cache_imgs"),
        ("preload_image: true\n", "'preload_image'"),
        ("load_maps: yes please\n", "load_maps must be true or false"),
        ("cache_config: [1]\n", "cache_config must be a mapping"),
        ("cache_config:\n  log_statistics_every_n: -1\n", "log_statistics_every_n"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: [unclosed\n", "cannot read preset"),
    ],
)
def test_bad_files_are_rejected_naming_the_problem(tmp_path, text, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(PresetError, match=match) as info:
        load_preset(bad)
    assert "bad.yaml" in str(info.value)


def test_unknown_name_and_missing_file():
    with pytest.raises(PresetError, match="unknown preset 'fast'.*balanced"):
        load_preset("fast")
    with pytest.raises(PresetError, match="not found"):
        load_preset("/nonexistent/x.yaml")


def test_mapping_and_round_trip():
    p = load_preset("validation_optimized")
    assert Preset.from_dict(p.to_dict(), name=p.name) == p
    assert load_preset({"cache_config": {"cache_images": True}}).cache_images


def test_presets_ship_inside_the_package():
    import importlib.resources

    import tomllib

    files = importlib.resources.files("diskcache_ocr.preset_files")
    assert sorted(p.name for p in files.iterdir() if p.name.endswith(".yaml")) == sorted(
        f"{n}.yaml" for n in PRESET_NAMES)
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    setup = pyproject["tool"]["setuptools"]
    assert setup["package-dir"]["diskcache_ocr.preset_files"] == "presets"
    assert "*.yaml" in setup["package-data"]["diskcache_ocr.preset_files"]


HYDRA_APP = textwrap.dedent(
    """
    import hydra
    from omegaconf import OmegaConf
    from diskcache_ocr.hydra import register_presets
    from diskcache_ocr.presets import load_preset

    register_presets()

    @hydra.main(version_base=None, config_path="conf", config_name="train")
    def main(cfg):
        node = OmegaConf.to_container(cfg.data.performance_preset)
        p = load_preset(node)
        print("PRESET", p.cache_images, p.cache_tensors, p.load_maps)

    main()
    """
)


@pytest.mark.full
def test_hydra_group_override(tmp_path):
    pytest.importorskip("hydra")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "train.yaml").write_text("defaults:\n  - data/performance_preset: minimal\n"
                                     "  - _self_\n")
    (tmp_path / "app.py").write_text(HYDRA_APP)

    def run(*overrides: str) -> str:
        out = subprocess.run(
            [sys.executable, "app.py", "hydra.run.dir=.", "hydra/job_logging=none",
             "hydra/hydra_logging=none", *overrides],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if line.startswith("PRESET")][0]

    assert run() == "PRESET False False False"
    assert run("data/performance_preset=balanced") == "PRESET True False False"
    assert run("data/performance_preset=validation_optimized") == "PRESET True True True"
    bad = subprocess.run([sys.executable, "app.py", "data/performance_preset=fast"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "fast" in bad.stderr
    assert Path(tmp_path / "app.py").exists()


@pytest.mark.parametrize("name, cached, maps, preload, warm", [
    ("none", set(), False, False, True),
    ("minimal", set(), False, False, True),
    ("balanced", {"images"}, False, False, True),
    ("validation_optimized", {"images", "tensors", "maps"}, True, True, True),
    ("memory_efficient", set(), False, False, False),
])
def test_each_preset_resolves_into_its_cache_plan(name, cached, maps, preload, warm):
    from diskcache_ocr.presets import cache_plan

    plan = cache_plan(name)
    assert (plan.name, set(plan.cached), plan.return_maps, plan.preload, plan.warm) == (
        name, cached, maps, preload, warm)
    assert plan.caches_anything == bool(cached)
    assert plan.safe_for_training == (not {"tensors", "maps"} & cached)
    assert plan.build_kinds() == (maps or "maps" in cached, "tensors" in cached)
    with pytest.raises(AttributeError):
        plan.cached = frozenset()  # type: ignore[misc]  # frozen: resolved once


def test_a_plan_from_a_mapping_keeps_the_flags_it_was_given():
    from diskcache_ocr.presets import cache_plan

    plan = cache_plan({"cache_config": {"cache_maps": True, "log_statistics_every_n": 0},
                       "load_maps": False, "reuse_batch_memory": False})
    assert plan.cached == frozenset({"maps"}) and not plan.return_maps
    assert plan.build_kinds() == (True, False)  # the maps are built although not returned
    assert (plan.log_every, plan.reuse_batch_memory) == (0, False)
