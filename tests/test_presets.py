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


def test_files_use_the_origin_keys():
    data = yaml.safe_load(preset_path("balanced").read_text())
    assert set(data["cache_config"]) == {"cache_images", "cache_tensors", "cache_maps",
                                         "log_statistics_every_n"}
    assert {"preload_images", "preload_maps", "load_maps"} <= set(data)


def test_memory_efficient_turns_read_ahead_off():
    assert not load_preset("memory_efficient").readahead and load_preset("minimal").readahead


def test_custom_copy_loads(tmp_path):
    custom = tmp_path / "custom.yaml"
    text = preset_path("balanced").read_text().replace("cache_maps: false", "cache_maps: true")
    custom.write_text(text)
    p = load_preset(custom)
    assert p.name == "custom" and p.cache_maps and p.cache_images and not p.cache_tensors
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
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
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
