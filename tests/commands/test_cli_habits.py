"""The origin project's cache_manager habits, each as its users type it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from testkit import build_small, command, private_copy, run_cli, run_together, snapshot

from diskcache_ocr import cli
from diskcache_ocr.store import KINDS
from diskcache_ocr.synth import split_paths

N = 3
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    return build_small(tmp_path_factory.mktemp("habits"), N, seed=33)


@pytest.fixture
def mine(built, tmp_path) -> tuple[Path, Path]:
    return private_copy(*built, tmp_path)


def run_json(capsys, *argv: object) -> tuple[int, dict]:
    rc, out, err = run_cli(capsys, *argv, "--json")
    assert out, err
    return rc, json.loads(out)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- no cache yet -----------------------------------------------------------------------------
def test_status_and_health_of_no_cache_are_empty_and_healthy(tmp_path, capsys):
    nowhere = tmp_path / "never-written"
    rc, data = run_json(capsys, "status", "--cache", nowhere)
    assert rc == 0 and data["empty"] is True
    assert {k: v["entries"] for k, v in data["kinds"].items()} == dict.fromkeys(KINDS, 0)
    assert data["index"] == {"sources": 0, "failed": 0} and data["stats"] == {}
    rc, data = run_json(capsys, "health", "--cache", nowhere)
    assert (rc, data["ok"], data["problems"]) == (0, True, [])
    rc, out, _ = run_cli(capsys, "health", "--cache", nowhere)
    assert rc == 0 and out.startswith(f"healthy: {nowhere}") and "empty" in out
    rc, out, _ = run_cli(capsys, "status", "--cache", nowhere)
    assert rc == 0 and "empty" in out
    assert not nowhere.exists()  # looking created nothing


def test_the_habits_without_cache_flag_use_the_env_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(tmp_path / "default"))
    for argv in (["status"], ["health"], ["clear", "--all"]):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, (argv, err)
        assert str(tmp_path / "default") in out or out.startswith("removed: nothing"), out
    assert not (tmp_path / "default").exists()


# -- clear --all ------------------------------------------------------------------------------
def test_clear_all_deletes_the_cache_and_frees_the_disk(mine, capsys):
    _, cache = mine
    size = sum(p.stat().st_blocks * 512 for p in cache.rglob("*") if p.is_file())
    rc, data = run_json(capsys, "clear", "--all", "--cache", cache, "--dry-run")
    assert rc == 0 and data["removed"] == {**dict.fromkeys(KINDS, N), "index": N}
    assert (cache / "data.mdb").exists()
    rc, data = run_json(capsys, "clear", "--all", "--cache", cache)
    assert rc == 0 and data["freed_bytes"] == size > 0
    names = sorted(str(Path(f).relative_to(cache)) for f in data["files"])
    # the records, and the annotation index (a file per content, and its stat shortcut)
    assert [str(Path(n).parent) for n in names] == ["annotations"] * 2 + ["."] * 2
    assert sorted(Path(n).suffix for n in names[:2]) == [".idx", ".src"]
    assert not cache.exists()
    rc, out, _ = run_cli(capsys, "clear", "--all", "--cache", cache)
    assert rc == 0 and out.startswith("removed: nothing")


def test_clear_all_removes_an_empty_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, _ = run_cli(capsys, "clear", "--all", "--cache", tmp_path / "empty")
    assert rc == 0 and not (tmp_path / "empty").exists()


def test_clear_all_refuses_a_directory_that_is_not_a_cache(mine, tmp_path, capsys):
    _, cache = mine
    (cache / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "clear", "--all", "--cache", cache)
    assert rc == 2 and "notes.txt" in one_error_line(err) and "nothing removed" in err
    assert (cache / "data.mdb").exists() and (cache / "notes.txt").exists()

    import lmdb  # somebody else's LMDB environment, named like ours

    other = tmp_path / "other"
    env = lmdb.open(str(other), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    rc, _, err = run_cli(capsys, "clear", "--all", "--cache", other)
    assert rc == 2 and "not a diskcache-ocr cache" in one_error_line(err)
    assert (other / "data.mdb").exists()


HOLD = textwrap.dedent("""\
    import sys, time
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "reader":
        from diskcache_ocr.store import CacheStore
        store = CacheStore(path, readonly=True)
        with store.reader() as r:
            print("ready", flush=True)
            time.sleep(60)
    else:
        import lmdb
        env = lmdb.open(path, max_dbs=8)
        txn = env.begin(write=True)
        print("ready", flush=True)
        time.sleep(60)
    """)


@pytest.mark.parametrize("mode, message", [
    ("reader", "have the cache open"),
    pytest.param("writer", "a writer holds the cache", marks=pytest.mark.full)])
def test_clear_all_leaves_a_cache_in_use(mine, capsys, mode, message):
    _, cache = mine
    before = snapshot(cache)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, mode, str(cache)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        rc, _, err = run_cli(capsys, "clear", "--all", "--cache", cache)
        assert rc == 2 and message in one_error_line(err) and "nothing removed" in err
        if mode == "reader":
            assert str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(cache) == before


# -- the other habits -------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, kind", [("--type", "tensor", "tensors"),
                                               ("--type", "maps", "maps"),
                                               ("--kind", "image", "images")])
def test_clear_type_is_kind(mine, capsys, flag, value, kind):
    _, cache = mine
    rc, data = run_json(capsys, "clear", flag, value, "--cache", cache)
    assert rc == 0 and data["removed"] == {kind: N}
    after = snapshot(cache)
    assert {k: len(v) for k, v in after.items() if k in KINDS} == {
        k: 0 if k == kind else N for k in KINDS}


def test_validate_is_verify(built, capsys):
    _, cache = built
    assert run_json(capsys, "validate", "--cache", cache) == run_json(capsys, "verify",
                                                                     "--cache", cache)
    rc, data = run_json(capsys, "validate", "--cache", cache)
    assert rc == 0 and data["checked"] == N * len(KINDS)


def test_export_writes_status_and_statistics(mine, tmp_path, capsys):
    data_dir, cache = mine
    from diskcache_ocr.dataset import CachedOCRDataset

    ds = CachedOCRDataset(*split_paths(data_dir), cache, preset="validation_optimized")
    for i in range(len(ds)):
        ds[i]
    ds.close()  # counters are flushed on close
    out = tmp_path / "stats.json"
    rc, _, err = run_cli(capsys, "export", str(out), "--cache", cache)
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["status"]["kinds"]["images"]["entries"] == N
    per_kind = data["statistics"]["per_kind"]
    assert set(per_kind) == set(KINDS)
    counters = data["statistics"]["counters"]
    t = per_kind["tensors"]
    assert t["hits"] == counters["tensors.hits"] == N  # the reads above all hit
    assert t["hit_rate"] == N / (N + counters.get("tensors.misses", 0))
    assert data["statistics"]["counters"] == data["status"]["stats"]
    rc, _, err = run_cli(capsys, "export", str(tmp_path / "no" / "dir.json"), "--cache", cache)
    assert rc == 2 and "dir.json" in one_error_line(err)


def test_cache_flag_before_or_after_the_command(built, tmp_path, capsys):
    _, cache = built
    rc, before = run_json(capsys, "--cache", cache, "status")
    rc2, after = run_json(capsys, "status", "--cache", cache)
    assert rc == rc2 == 0 and before == after and before["path"] == str(cache)
    # given both ways, the one after the command wins
    rc, data = run_json(capsys, "--cache", tmp_path / "elsewhere", "status", "--cache", cache)
    assert data["path"] == str(cache)
    args = cli.build_parser().parse_args(["--cache", str(cache), "-v", "health"])
    assert args.cache == cache and args.verbose


@pytest.mark.full
def test_verbose_shows_progress_logs(built, tmp_path):
    data_dir, _ = built
    images, annotations = split_paths(data_dir)
    preset = tmp_path / "origin.yaml"
    preset.write_text("cache_config:\n  cache_images: true\n"
                      "image_loading_config:\n  use_turbojpeg: true\n")
    base = command() + ["prebuild", "--images", str(images), "--annotations", str(annotations),
                        "--preset", str(preset), "--json"]
    quiet, loud = run_together(base + ["--cache", str(tmp_path / "a")],
                               base + ["--cache", str(tmp_path / "b"), "-v"])
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    assert "use_turbojpeg has no effect here" in loud.stderr
    assert "no effect" not in quiet.stderr


# -- edge values: one line, exit 2, no traceback ----------------------------------------------
@pytest.mark.parametrize("argv", [
    ["health", "--max-age-days", "inf"], ["health", "--max-age-days", "nan"],
    ["health", "--max-age-days", "-1"], ["watch", "--images", ".", "--debounce", "inf"],
    ["watch", "--images", ".", "--debounce", "nan"],
    ["watch", "--images", ".", "--debounce", "-0.5"],
])
def test_edge_values_are_refused_at_the_edge(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--cache", str(tmp_path / "c")])
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"diskcache-ocr {argv[0]}: error: argument ") and argv[-1] in line
    assert not (tmp_path / "c").exists()


@pytest.mark.full
def test_a_deeply_nested_preset_is_one_error_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("cache_config: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n")
    done = subprocess.run(command() + ["prebuild", "--images", str(tmp_path), "--preset",
                                       str(deep), "--cache", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "deep.yaml" in line and "nested too deeply" in line
    assert not (tmp_path / "c").exists()


# -- the script, from a checkout that is not installed ----------------------------------------
@pytest.mark.full
def test_cache_manager_script_runs_from_a_checkout(built, tmp_path):
    _, cache = built
    checkout = tmp_path / "checkout"
    for name in ("diskcache_ocr", "presets", "scripts"):
        shutil.copytree(REPO / name, checkout / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    # -S: no .pth files, so the installed (editable) package is invisible; the dependencies
    # stay importable through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    env.pop("DISKCACHE_OCR_DIR", None)
    script = [sys.executable, "-S", str(checkout / "scripts" / "cache_manager.py")]
    probe = subprocess.run([sys.executable, "-S", "-c", "import diskcache_ocr"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0  # not installed, as far as this interpreter knows
    status, prebuild = run_together(
        script + ["status", "--cache", str(cache), "--json"],
        script + ["prebuild", "--images", str(tmp_path / "none"), "--cache", str(tmp_path / "c")],
        env=env, cwd=tmp_path)
    done = status
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kinds"]["images"]["entries"] == N
    # prebuild's default preset comes from the checkout's presets/ (its images are missing)
    done = prebuild
    assert done.returncode == 2 and "preset" not in done.stderr, done.stderr
    assert "images directory does not exist" in one_error_line(done.stderr)


# -- the README's cache_manager lines ---------------------------------------------------------
def readme_commands() -> list[tuple[list[str], str]]:
    text = (REPO / "docs" / "coming-from-the-origin.md").read_text(encoding="utf-8")
    section = text.split("## Coming from the origin project\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    block = next(b for b in blocks if "cache_manager.py" in b)
    out = []
    for line in block.splitlines():
        command_text, _, comment = line.partition("#")
        words = command_text.split()
        assert words[:2] == ["python", "scripts/cache_manager.py"], line
        out.append((words[2:], comment.strip()))
    return out


def test_the_readme_cache_manager_lines(mine, tmp_path, monkeypatch, capsys):
    _, cache = mine
    lines = readme_commands()
    assert [argv[0] if not argv[0].startswith("-") else argv[-1] for argv, _ in lines] == [
        "status", "health", "clear", "validate", "export", "status", "clear"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(tmp_path / "no-cache-yet"))
    for argv, comment in lines[:2]:
        assert comment.startswith("no cache yet")
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0 and "empty" in out, (argv, out, err)
    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(cache))
    for argv, _ in lines[2:]:
        argv = [str(cache) if a == "DIR" else a for a in argv]
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, (argv, err)
    assert json.loads((tmp_path / "stats.json").read_text())["status"]["path"] == str(cache)
    assert not cache.exists()  # the last line: clear --all


def test_clear_all_refuses_a_cache_this_process_has_open(mine, capsys):
    from diskcache_ocr.store import CacheStore

    _, cache = mine
    store = CacheStore(cache, readonly=True)
    try:
        store.header()  # opens the environment
        rc, _, err = run_cli(capsys, "clear", "--all", "--cache", cache)
        assert rc == 2 and "this process has the cache open" in one_error_line(err)
    finally:
        store.close()
    assert (cache / "data.mdb").exists()


# -- the forms the origin project's own docs use ----------------------------------------------
def test_export_output_flag_and_its_default_file(built, tmp_path, capsys, monkeypatch):
    _, cache = built
    rc, _, err = run_cli(capsys, "export", "--output", tmp_path / "stats.json", "--cache", cache)
    assert rc == 0, err
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["status"]["kinds"]["images"]["entries"] == N
    monkeypatch.chdir(tmp_path)  # the origin's default file name, in the working directory
    rc, _, err = run_cli(capsys, "export", "--cache", cache)
    assert rc == 0, err
    assert json.loads((tmp_path / "cache_stats.json").read_text()) == data
    rc, _, err = run_cli(capsys, "export", "a.json", "--output", "b.json", "--cache", cache)
    assert rc == 2 and "give one" in one_error_line(err)


THEIR_PRESET = """\
# @package _global_.datasets.val_dataset.config
preload_images: true
preload_maps: true
prenormalize_images: false
load_maps: true
cache_config:
  _target_: ocr.datasets.schemas.CacheConfig
  cache_images: true
  cache_maps: true
  cache_transformed_tensors: true
  log_statistics_every_n: 100
image_loading_config:
  use_turbojpeg: true
  turbojpeg_fallback: true
"""

THEIR_DATA_CONFIG = """\
# @package _global_
dataset_base_path: "${hydra:runtime.cwd}/data/datasets/"
datasets:
  train_dataset:
    _target_: ${dataset_path}.ValidatedOCRDataset
    config:
      _target_: ${dataset_config_path}.DatasetConfig
      image_path: ${dataset_base_path}images/train
      annotation_path: ${dataset_base_path}jsons/train.json
      load_maps: false
      cache_config:
        _target_: ${dataset_config_path}.CacheConfig
        cache_images: true
        cache_transformed_tensors: TRAIN_TENSORS
    transform: ${transforms.train_transform}
  val_dataset:
    _target_: ${dataset_path}.ValidatedOCRDataset
    config:
      _target_: ${dataset_config_path}.DatasetConfig
      image_path: ${dataset_base_path}images/val
      annotation_path: ${dataset_base_path}jsons/val.json
      preload_images: false
      load_maps: false
      cache_config:
        _target_: ${dataset_config_path}.CacheConfig
        cache_transformed_tensors: false
        cache_images: true
        cache_maps: false
        log_statistics_every_n: null
    transform: ${transforms.val_transform}
"""


def test_validate_config_accepts_their_preset_and_data_files(tmp_path, capsys):
    preset = tmp_path / "validation_optimized.yaml"
    preset.write_text(THEIR_PRESET)
    rc, data = run_json(capsys, "validate", "--config", preset)
    assert rc == 0 and data["ok"] and data["problems"] == []
    assert data["package"] == "_global_.datasets.val_dataset.config"
    node = data["presets"]["datasets.val_dataset.config"]
    assert node["caches"] == ["images", "tensors", "maps"] and node["load_maps"] is True
    assert node["settings"]["cache_config"]["cache_transformed_tensors"] is True
    assert {n["code"] for n in data["notes"]} == {"no_effect"}  # turbojpeg: said, not fatal
    config = tmp_path / "base.yaml"
    config.write_text(THEIR_DATA_CONFIG.replace("TRAIN_TENSORS", "false"))
    rc, data = run_json(capsys, "validate", "--config", config)
    assert rc == 0 and data["ok"], data
    assert set(data["presets"]) == {"datasets.train_dataset.config",
                                    "datasets.val_dataset.config"}
    rc, out, _ = run_cli(capsys, "validate", "--config", config)
    assert rc == 0 and out.startswith(f"valid: {config}")


@pytest.mark.parametrize("change, code", [
    (("TRAIN_TENSORS", "true"), "unsafe_for_training"),
    (("cache_images: true\n        cache_maps", "cache_imgs: true\n        cache_maps"),
     "invalid_preset"),
    (("      preload_images: false", "      preload_image: false"), "invalid_preset"),
    (("log_statistics_every_n: null", "log_statistics_every_n: -3"), "invalid_preset"),
])
def test_validate_config_reports_problems_with_exit_1(tmp_path, capsys, change, code):
    config = tmp_path / "base.yaml"
    config.write_text(THEIR_DATA_CONFIG.replace(*change).replace("TRAIN_TENSORS", "false"))
    rc, data = run_json(capsys, "validate", "--config", config)
    assert rc == 1 and not data["ok"]
    assert [p["code"] for p in data["problems"]] == [code]
    rc, out, _ = run_cli(capsys, "validate", "--config", config)
    assert rc == 1 and out.startswith("problems in") and code in out


def test_validate_config_of_a_missing_or_broken_file_is_one_error_line(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "validate", "--config", tmp_path / "nope.yaml")
    assert rc == 2 and "nope.yaml" in one_error_line(err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache_config: [unclosed\n")
    rc, _, err = run_cli(capsys, "validate", "--config", bad)
    assert rc == 2 and "bad.yaml" in one_error_line(err)
    empty = tmp_path / "train.yaml"
    empty.write_text("defaults:\n  - data: base\n")
    rc, data = run_json(capsys, "validate", "--config", empty)
    assert rc == 1 and data["problems"][0]["code"] == "no_presets"
