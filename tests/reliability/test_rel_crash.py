"""Crashes: a prebuild, a read-through epoch and the watch service, each killed with SIGKILL
at seeded random moments; after every kill the cache opens, holds no damaged record and no
index entry without its records, and a resumed run completes to a cache equal to a clean
build."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from relhelp import (
    Child,
    check_after_crash,
    copy_images,
    diff_snapshots,
    replace_atomically,
    run_cli,
    run_epoch,
    run_watch,
    snapshot,
    wait_for,
)
from testkit import rebase_index

KILLS = 20
SOAK_KILLS = 100
RUN_TIMEOUT_S = 180.0


def prebuild_argv(data, cache: Path, workers: int = 2) -> list[str]:
    return ["prebuild", "--images", str(data.images), "--annotations", str(data.annotations),
            "--cache", str(cache), "--workers", str(workers), "--json"]


def _calibrate(start, tmp_path: Path) -> float:
    """How long one uninterrupted run takes here (kill moments are drawn within it)."""
    child = start(tmp_path / "calibration", "calibration")
    rc = child.join(RUN_TIMEOUT_S)
    assert rc == 0, child.log_text()
    return time.monotonic() - child.t0


def _kill_and_resume(start, tmp_path: Path, clean_build: dict, kills: int, seed: int) -> None:
    """Kill runs at random moments; every second run resumes the cache the previous one was
    killed on. After each pair, one run to completion must give the clean build."""
    rng = random.Random(seed)
    duration = _calibrate(start, tmp_path)
    landed = 0
    cache = tmp_path / "unused"
    for k in range(kills):
        if k % 2 == 0:
            cache = tmp_path / f"cache-{k}"
        child = start(cache, f"kill-{k}")
        time.sleep(rng.uniform(0.0, 0.9 * duration))
        child.kill()
        rc = child.join(RUN_TIMEOUT_S)
        assert rc in (0, -signal.SIGKILL), f"run {k} failed before the kill:\n{child.log_text()}"
        landed += rc == -signal.SIGKILL
        check_after_crash(cache)
        if k % 2 == 1:
            resumed = start(cache, f"resume-{k}")
            assert resumed.join(RUN_TIMEOUT_S) == 0, resumed.log_text()
            problems = diff_snapshots(snapshot(cache), clean_build)
            assert not problems, f"after kill {k}: " + "\n".join(problems[:10])
            shutil.rmtree(cache)
    print(f"{landed} of {kills} kills hit a running process")
    # Most kills must hit a running process, or the test proves little.
    assert landed >= kills // 2, f"only {landed} of {kills} kills hit a running process"


def _prebuild_starter(data, logs: Path):
    def start(cache: Path, tag: str) -> Child:
        return Child(run_cli, prebuild_argv(data, cache), log=logs / f"{tag}.log")
    return start


def _epoch_starter(data, logs: Path):
    def start(cache: Path, tag: str) -> Child:
        return Child(run_epoch, str(data.images), str(data.annotations), str(cache), 2,
                     str(logs / f"{tag}.json"), log=logs / f"{tag}.log")
    return start


def test_prebuild_killed_at_random_moments_resumes_to_a_clean_build(tiny, clean_build, tmp_path):
    _kill_and_resume(_prebuild_starter(tiny, tmp_path / "logs"), tmp_path, clean_build,
                     KILLS, seed=101)


def test_read_through_epoch_killed_at_random_moments_resumes_to_a_clean_build(
        tiny, clean_build, tmp_path):
    _kill_and_resume(_epoch_starter(tiny, tmp_path / "logs"), tmp_path, clean_build,
                     KILLS, seed=202)
    # A completed epoch served every sample without error.
    done = json.loads((tmp_path / "logs" / "calibration.json").read_text())
    assert done == {"samples": len(tiny.names), "errors": []}


@pytest.mark.slow
def test_prebuild_soak(tiny, clean_build, tmp_path):
    _kill_and_resume(_prebuild_starter(tiny, tmp_path / "logs"), tmp_path, clean_build,
                     SOAK_KILLS, seed=303)


@pytest.mark.slow
def test_read_through_soak(tiny, clean_build, tmp_path):
    _kill_and_resume(_epoch_starter(tiny, tmp_path / "logs"), tmp_path, clean_build,
                     SOAK_KILLS, seed=404)


@pytest.mark.slow
def test_console_script_prebuild_killed(tiny, clean_build, tmp_path):
    """The installed ``diskcache-ocr`` script itself (a fresh interpreter each run)."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("diskcache-ocr")
    if not exe.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    rng = random.Random(505)
    cache = tmp_path / "cache"
    for k in range(10):
        with open(tmp_path / f"{k}.log", "wb") as log:
            proc = subprocess.Popen([str(exe), *prebuild_argv(tiny, cache)[0:]], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            time.sleep(rng.uniform(1.0, 3.5))
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            assert proc.wait(RUN_TIMEOUT_S) in (0, -signal.SIGKILL)
        check_after_crash(cache)
    proc = subprocess.run([str(exe), *prebuild_argv(tiny, cache)], capture_output=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert not diff_snapshots(snapshot(cache), clean_build)


# -- the watch service ----------------------------------------------------------------------
WATCH_ROUNDS = 20
CHANGED = 4  # files whose content changes in each round


@pytest.fixture(scope="module")
def watch_setup(tiny, tiny_alt, tmp_path_factory):
    """A cache built from ``tiny``, and the clean build of the changed contents."""
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.prebuild import prebuild

    base = tmp_path_factory.mktemp("watch")
    changed = tiny.names[:CHANGED]
    built = base / "built"
    assert not prebuild(tiny.images, tiny.annotations, built, progress=False).failed
    # The expected end state: the changed files have tiny_alt's contents.
    after = base / "after-images"
    copy_images(tiny.images, after)
    copy_images(tiny_alt.images, after, changed)
    ds = CachedOCRDataset(after, tiny.annotations, base / "after-cache",
                          preset="validation_optimized", preload=False)
    assert all(ds[i]["meta"]["error"] is None for i in range(len(ds)))
    ds.close()
    return built, snapshot(base / "after-cache"), changed


def _recover_and_compare(cache: Path, images: Path, data, expected: dict) -> None:
    """What a restarted service and the next epoch do: the cache then equals a clean build."""
    from diskcache_ocr.dataset import CachedOCRDataset
    from diskcache_ocr.watch import Watcher

    watcher = Watcher(cache, images, data.annotations)
    try:
        watcher.reconcile()
    finally:
        watcher.stop()
    ds = CachedOCRDataset(images, data.annotations, cache, preset="validation_optimized",
                          preload=False)
    errors = [ds[i]["meta"]["error"] for i in range(len(ds))]
    ds.close()
    assert errors == [None] * len(errors)
    problems = diff_snapshots(snapshot(cache), expected)
    assert not problems, "\n".join(problems[:10])


def _watch_rounds(tiny, tiny_alt, watch_setup, tmp_path: Path, rounds: int, seed: int) -> None:
    built, expected, changed = watch_setup
    rng = random.Random(seed)
    n_ops = CHANGED * 4  # per source: its index entry and three records
    modes = {"reconcile": 0, "event": 0}
    for k in range(rounds):
        mode = rng.choice(["reconcile", "event"])
        modes[mode] += 1
        kill_at = rng.randint(0, n_ops + 1)  # n_ops + 1: after the commit
        images, cache = tmp_path / f"images-{k}", tmp_path / f"cache-{k}"
        copy_images(tiny.images, images)  # mtimes kept: the cache matches these files
        cache.mkdir()
        shutil.copyfile(built / "data.mdb", cache / "data.mdb")
        rebase_index(cache, tiny.images, images)  # (as if built from the copies)
        if mode == "reconcile":  # changed while the service was down
            for name in changed:
                replace_atomically(tiny_alt.images / name, images / name, "r")
        ready = tmp_path / f"ready-{k}"
        child = Child(run_watch, str(cache), str(images), str(tiny.annotations), str(ready),
                      None if kill_at > n_ops else kill_at, kill_at > n_ops,
                      log=tmp_path / f"watch-{k}.log")
        if mode == "event":
            wait_for(lambda r=ready, c=child: r.exists() or c.proc.exitcode is not None, 60,
                     "the service to start")
            for name in changed:  # changed while it watches
                replace_atomically(tiny_alt.images / name, images / name, "e")
        rc = child.join(60)
        assert rc == -signal.SIGKILL, f"round {k} ({mode}): the service was not killed " \
                                      f"mid-invalidation (rc {rc}):\n{child.log_text()}"
        check_after_crash(cache)
        _recover_and_compare(cache, images, tiny, expected)
        shutil.rmtree(cache)
        shutil.rmtree(images)
    assert min(modes.values()) > 0, modes


def test_watch_service_killed_mid_invalidation(tiny, tiny_alt, watch_setup, tmp_path):
    _watch_rounds(tiny, tiny_alt, watch_setup, tmp_path, WATCH_ROUNDS, seed=606)


@pytest.mark.slow
def test_watch_service_soak(tiny, tiny_alt, watch_setup, tmp_path):
    _watch_rounds(tiny, tiny_alt, watch_setup, tmp_path, 100, seed=707)
