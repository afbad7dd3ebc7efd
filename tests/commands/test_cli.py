"""The command line: help text everywhere, JSON shapes, exit codes, error lines, and what
clear / copy / synth / the cache_manager script do to a real cache."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import command, private_copy, run_cli, run_together, snapshot

from diskcache_ocr import cli
from diskcache_ocr.ops import HEALTH_CODES
from diskcache_ocr.schema import source_id
from diskcache_ocr.store import KINDS, CacheStore
from diskcache_ocr.synth import split_paths

N = 4
COMMANDS = ("prebuild", "status", "health", "clear", "verify", "copy", "watch", "synth", "demo")
REPO = Path(__file__).resolve().parents[2]


def run_json(capsys, *argv: object) -> tuple[int, dict]:
    rc, out, err = run_cli(capsys, *argv, "--json")
    try:
        return rc, json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON (rc {rc}): {out!r} {err!r}")


@pytest.fixture
def mine(built, tmp_path) -> tuple[Path, Path]:
    """A private copy of the dataset (stat-identical) and of the cache."""
    return private_copy(*built, tmp_path)


# -- help -------------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1
    return subs[0]


def _lacking_help(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        and (not a.help or a.help == argparse.SUPPRESS or not a.help.strip())
    ]


def test_every_command_and_argument_has_help():
    parser = cli.build_parser()
    assert _lacking_help(parser) == []
    sub = _subcommands(parser)
    assert set(COMMANDS) <= set(sub.choices)
    command_help = {a.dest: a.help for a in sub._choices_actions}
    primary = {id(p): name for name, p in reversed(sub.choices.items())}
    problems = []
    for name, p in sub.choices.items():
        name = primary[id(p)]  # an alias (validate) shares its command's parser and help
        if not (command_help.get(name) or "").strip():
            problems.append(f"{name}: no command help")
        if not (p.description or "").strip():
            problems.append(f"{name}: no description")
        problems += [f"{name} {arg}: no help" for arg in _lacking_help(p)]
    assert problems == []


@pytest.mark.parametrize("name", COMMANDS)
def test_help_prints_and_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diskcache-ocr " + name)


# -- JSON shapes ------------------------------------------------------------------------------
def test_status_json_shape(built, capsys):
    _, cache = built
    rc, data = run_json(capsys, "status", "--cache", cache)
    assert rc == 0
    assert set(data["kinds"]) == set(KINDS)
    for kind, entry in data["kinds"].items():
        assert isinstance(entry["entries"], int) and entry["entries"] == N, kind
        assert isinstance(entry["bytes"], int) and entry["bytes"] > 0, kind
        assert entry["stored_version"] == entry["current_version"]
        assert entry["up_to_date"] is True
    assert data["index"] == {"sources": N, "failed": 0}
    assert data["header"]["build"]["clean"] is True


def test_health_json_shape(built, mine, capsys):
    _, cache = built
    rc, data = run_json(capsys, "health", "--cache", cache)
    assert (rc, data) == (0, {"ok": True, "problems": []})

    data_dir, my_cache = mine
    images, _ = split_paths(data_dir)
    sorted(images.iterdir())[0].unlink()
    rc, data = run_json(capsys, "health", "--cache", my_cache, "--images", images,
                        "--max-age-days", "0")
    assert rc == 1
    assert data["ok"] is False
    assert isinstance(data["problems"], list) and data["problems"]
    for p in data["problems"]:
        assert set(p) == {"code", "detail"}
        assert p["code"] in HEALTH_CODES
        assert isinstance(p["detail"], str) and p["detail"]
    assert {p["code"] for p in data["problems"]} == {"stale_entries", "old_entries"}
    assert set(HEALTH_CODES) == {"version_mismatch", "stale_entries", "old_entries",
                                 "low_hit_rate", "failed_sources", "stale_readers", "corrupt",
                                 "incomplete_build"}


def test_verify_json_shape(built, capsys):
    data_dir, cache = built
    _, annotations = split_paths(data_dir)
    rc, data = run_json(capsys, "verify", "--cache", cache)
    assert rc == 0
    assert data["checked"] == N * len(KINDS)
    assert data["corrupt"] == [] and data["mismatched"] == []
    rc, data = run_json(capsys, "verify", "--cache", cache, "--sample", "1", "--recompute",
                        str(N), "--annotations", annotations)
    assert rc == 0
    assert data["checked"] == len(KINDS)
    assert (data["corrupt"], data["mismatched"], data["recomputed"]) == ([], [], N)


def test_verify_exit_code_1_on_corruption(mine, capsys):
    _, cache = mine
    with CacheStore(cache) as store:
        key = store.keys("images")[0]
        with store.reader() as r:
            raw = bytearray(r.get_raw("images", key))
        raw[-1] ^= 0xFF
        with store.writer() as w:
            w.put("images", key, bytes(raw))
    rc, data = run_json(capsys, "verify", "--cache", cache)
    assert rc == 1
    assert len(data["corrupt"]) == 1 and key.hex() in data["corrupt"][0]
    rc, out, _ = run_cli(capsys, "verify", "--cache", cache)
    assert rc == 1 and "1 corrupt" in out


# -- errors -----------------------------------------------------------------------------------
# (status, health and clear --all on a missing cache report an empty one: test_cli_habits.py)
@pytest.mark.parametrize("argv", [
    ["verify"], ["clear", "--kind", "maps"], ["clear", "--stale"], ["copy", "DEST"],
])
def test_missing_cache_is_one_error_line_and_exit_2(argv, tmp_path, capsys):
    missing = tmp_path / "no-cache"
    argv = [str(tmp_path / "dest") if a == "DEST" else a for a in argv]
    rc, out, err = run_cli(capsys, *argv, "--cache", missing)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"diskcache-ocr {argv[0]}: error: ")
    assert str(missing) in lines[0]
    assert "Traceback" not in err
    assert not missing.exists()  # nothing was created by looking
    assert not (tmp_path / "dest").exists()


def test_prebuild_command_keeps_freed_memory_in_its_own_process(tmp_path, built, capsys,
                                                               monkeypatch):
    from diskcache_ocr import batchmem

    calls = []
    monkeypatch.setattr(batchmem, "keep_freed_memory", lambda: calls.append(1) or True)
    images, annotations = split_paths(built[0])
    rc, _, _ = run_cli(capsys, "prebuild", "--images", images, "--annotations", annotations,
                       "--cache", tmp_path / "c", "--workers", "1", "--json")
    assert rc == 0 and calls == [1]


def test_prebuild_errors_exit_2(tmp_path, built, capsys):
    data_dir, _ = built
    images, annotations = split_paths(data_dir)
    rc, _, err = run_cli(capsys, "prebuild", "--images", tmp_path / "nope", "--cache",
                     tmp_path / "c")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    rc, _, err = run_cli(capsys, "prebuild", "--images", images, "--annotations", annotations,
                     "--cache", tmp_path / "c", "--preset", "minimal")
    assert rc == 2 and "caches nothing" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_and_still_exits_2(where, tmp_path, capsys):
    argv = ["verify", "--cache", str(tmp_path / "none")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert "CacheError" in err


@pytest.mark.full
def test_error_line_and_exit_codes_of_the_real_process(tmp_path, built):
    _, cache = built
    missing, health = run_together(command() + ["verify", "--cache", str(tmp_path / "none")],
                                   command() + ["health", "--cache", str(cache), "--json"])
    done = missing
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    done = health
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True


def test_usage_errors_exit_2(capsys):
    for argv in (["clear", "--all", "--stale"], ["clear"], ["nonsense"], []):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv


# -- clear ------------------------------------------------------------------------------------
def test_clear_all_dry_run_removes_nothing(mine, capsys):
    _, cache = mine
    before = snapshot(cache)
    rc, data = run_json(capsys, "clear", "--cache", cache, "--all", "--dry-run")
    assert rc == 0 and data["dry_run"] is True
    assert data["removed"] == {**{k: N for k in KINDS}, "index": N}
    assert snapshot(cache) == before


def test_clear_all_removes_everything_and_prebuild_works_again(mine, capsys):
    data_dir, cache = mine
    rc, data = run_json(capsys, "clear", "--cache", cache, "--all")
    assert rc == 0 and data["removed"]["index"] == N
    assert not cache.exists()  # the cache's files and its directory: the disk space is back
    rc, status = run_json(capsys, "status", "--cache", cache)
    assert all(status["kinds"][k]["entries"] == 0 for k in KINDS)
    assert status["stats"] == {}
    images, annotations = split_paths(data_dir)
    rc, summary = run_json(capsys, "prebuild", "--images", images, "--annotations",
                           annotations, "--cache", cache)
    assert rc == 0 and summary["built"] == N


def test_clear_kind_maps_removes_only_maps(mine, capsys):
    _, cache = mine
    before = snapshot(cache)
    rc, data = run_json(capsys, "clear", "--cache", cache, "--kind", "maps", "--dry-run")
    assert rc == 0 and data["removed"] == {"maps": N}
    assert snapshot(cache) == before
    rc, data = run_json(capsys, "clear", "--cache", cache, "--kind", "maps")
    assert rc == 0 and data == {"dry_run": False, "removed": {"maps": N}}
    after = snapshot(cache)
    assert after["maps"] == {}
    assert after["images"] == before["images"] and after["tensors"] == before["tensors"]
    assert after["index"] == before["index"]


def test_clear_stale_after_deleting_a_source(mine, capsys):
    data_dir, cache = mine
    images, _ = split_paths(data_dir)
    victim = sorted(images.iterdir())[2]
    vid = source_id(images, victim.name)  # the index knows a source by its path
    before = snapshot(cache)
    # (an entry names each record by kind and version: "tensors:1f0c...")
    victim_keys = {n.partition(":")[0]: k for n, k in before["index"][vid][4].items()}
    victim.unlink()

    rc, data = run_json(capsys, "clear", "--cache", cache, "--stale", "--images", images,
                        "--dry-run")
    assert rc == 0 and data["stale_sources"] == [vid]
    assert snapshot(cache) == before

    rc, data = run_json(capsys, "clear", "--cache", cache, "--stale", "--images", images)
    assert rc == 0
    assert data["stale_sources"] == [vid]
    assert data["removed"] == {"index": 1, "images": 1, "tensors": 1, "maps": 1}
    after = snapshot(cache)
    assert set(after["index"]) == set(before["index"]) - {vid}
    for kind in KINDS:
        assert set(after[kind]) == set(before[kind]) - {victim_keys[kind]}, kind
        assert all(after[kind][k] == before[kind][k] for k in after[kind])
    rc, health = run_json(capsys, "health", "--cache", cache, "--images", images)
    assert (rc, health["ok"]) == (0, True)


def test_clear_stale_after_changing_a_source_drops_its_old_records(mine, capsys):
    data_dir, cache = mine
    images, annotations = split_paths(data_dir)
    files = sorted(images.iterdir())
    first = source_id(images, files[0].name)  # the index knows a source by its path
    before = snapshot(cache)
    old_keys = {n.partition(":")[0]: k for n, k in before["index"][first][4].items()}
    files[0].write_bytes(files[1].read_bytes())  # same pixels as another source now
    rc, data = run_json(capsys, "clear", "--cache", cache, "--stale", "--images", images)
    assert rc == 0 and data["stale_sources"] == [first]
    after = snapshot(cache)
    for kind in KINDS:
        assert old_keys[kind] not in after[kind]
    assert len(after["index"]) == N - 1
    rc, summary = run_json(capsys, "prebuild", "--images", images, "--annotations",
                           annotations, "--cache", cache)
    assert (rc, summary["built"], summary["skipped"]) == (0, 1, N - 1)


# -- copy, synth ------------------------------------------------------------------------------
def test_copy_makes_a_readable_cache_with_the_same_records(built, tmp_path, capsys):
    _, cache = built
    dest = tmp_path / "copy"
    rc, data = run_json(capsys, "copy", "--cache", cache, dest)
    assert rc == 0 and Path(data["dest"]) == dest and data["bytes"] > 0
    assert snapshot(dest) == snapshot(cache)
    rc, status = run_json(capsys, "status", "--cache", dest)
    assert rc == 0 and all(status["kinds"][k]["entries"] == N for k in KINDS)
    rc, report = run_json(capsys, "verify", "--cache", dest)
    assert (rc, report["corrupt"]) == (0, [])
    rc, _, err = run_cli(capsys, "copy", "--cache", cache, dest)  # never over a cache
    assert rc == 2 and "already holds a cache" in err


def test_synth_writes_the_origin_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    rc, data = run_json(capsys, "synth", "--out", out, "--n", "3", "--seed", "4",
                        "--split", "test")
    assert rc == 0
    jpgs = sorted((out / "images" / "test").glob("*.jpg"))
    assert len(jpgs) == 3 and data["images"] == 3 and data["split"] == "test"
    ann = json.loads((out / "jsons" / "test.json").read_text())
    assert set(ann["images"]) == {p.name for p in jpgs}
    words = sum(len(v["words"]) for v in ann["images"].values())
    assert words == data["words"] > 0
    for entry in ann["images"].values():
        for word in entry["words"].values():
            assert len(word["points"]) >= 4
    assert Path(data["annotation_file"]) == out / "jsons" / "test.json"


# -- scripts/cache_manager.py -----------------------------------------------------------------
@pytest.mark.full
def test_cache_manager_script_uses_the_env_cache_dir(mine, monkeypatch, capsys):
    _, cache = mine
    script = REPO / "scripts" / "cache_manager.py"
    env = {**os.environ, "DISKCACHE_OCR_DIR": str(cache)}
    done = subprocess.run([sys.executable, str(script), "status", "--json"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kinds"]["images"]["entries"] == N

    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(cache))

    def script_main(*argv: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [str(script), *argv])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(script), run_name="__main__")
        return exc.value.code, capsys.readouterr().out

    rc, out = script_main("health", "--json")
    assert rc == 0 and json.loads(out)["ok"] is True
    rc, out = script_main("clear", "--all")
    assert rc == 0 and out.startswith("removed:")
    assert not (cache / "data.mdb").exists()
    rc, out = script_main("status")
    assert rc == 0 and str(cache) in out


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DISKCACHE_OCR_DIR", str(tmp_path / "x"))
    args = cli.build_parser().parse_args(["status"])
    assert args.cache == tmp_path / "x"
    monkeypatch.delenv("DISKCACHE_OCR_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = cli.build_parser().parse_args(["health"])
    assert args.cache == tmp_path / "xdg" / "diskcache-ocr"


# -- human output ------------------------------------------------------------------------------
def test_human_output_of_reporting_commands(built, capsys):
    _, cache = built
    rc, out, _ = run_cli(capsys, "status", "--cache", cache)
    assert rc == 0
    for kind in KINDS:
        assert kind in out
    assert "last build: clean" in out
    rc, out, _ = run_cli(capsys, "health", "--cache", cache)
    assert rc == 0 and out.startswith("healthy")
    rc, out, _ = run_cli(capsys, "verify", "--cache", cache)
    assert rc == 0 and f"checked {N * len(KINDS)} records: 0 corrupt" in out


def test_clear_stale_refuses_a_missing_images_directory(mine, tmp_path, capsys):
    _, cache = mine
    before = snapshot(cache)
    rc, _, err = run_cli(capsys, "clear", "--cache", cache, "--stale", "--images",
                     tmp_path / "typo")
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    assert snapshot(cache) == before
