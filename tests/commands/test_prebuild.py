"""Prebuild: resumable after SIGKILL, sharded across torchrun ranks, per-file failures
recorded (and not retried), and exactly the affected kind rebuilt after a version change."""

from __future__ import annotations

import importlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import command, run_cli, snapshot

from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheVersionError
from diskcache_ocr.ocr.maps import MapConfig
from diskcache_ocr.ocr.pipeline import Pipeline
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.schema import source_id
from diskcache_ocr.store import KINDS, CacheStore, WriteBatch
from diskcache_ocr.synth import split_paths

KILL_N = 32  # enough images that a build spans a kill or two
SMALL_N = 6
# The module itself (the package re-exports its function under the same name).
prebuild_mod = importlib.import_module("diskcache_ocr.prebuild")
build_mod = importlib.import_module("diskcache_ocr.build")


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kill_data(synth_data) -> Path:
    return synth_data(KILL_N, 11, min_words=3, max_words=10, size=(240, 320))


@pytest.fixture(scope="module")
def small_data(synth_data) -> Path:
    return synth_data(SMALL_N, 5, min_words=3, max_words=10, size=(240, 320))


@pytest.fixture
def data_copy(small_data, tmp_path) -> Path:
    """A private copy of the small dataset (stat-identical), for tests that change files."""
    dest = tmp_path / "data"
    shutil.copytree(small_data, dest)
    return dest


# -- 1. resumable under SIGKILL ------------------------------------------------------------
class _Child:
    """A prebuild subprocess in its own session (so its pool dies with it), with its
    stderr (the progress bar) collected."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.started = time.monotonic()
        self.err = b""

    def _drain(self, timeout: float) -> None:
        fd = self.proc.stderr.fileno()
        ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
        if ready:
            chunk = os.read(fd, 65536)
            self.err += chunk
            if not chunk:  # EOF: the process is gone
                time.sleep(min(timeout, 0.01))

    def wait_until(self, predicate, deadline: float) -> None:
        while time.monotonic() < deadline and self.proc.poll() is None and not predicate():
            self._drain(0.02)

    def kill(self) -> bool:
        """SIGKILL the whole process group; False if it had already finished."""
        if self.proc.poll() is not None:
            self.proc.wait()
            return False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        # The pool workers share the group: wait until none is left holding the cache.
        for _ in range(500):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        self.proc.stderr.close()
        return True


def _bar_counts(err: bytes) -> list[bytes]:
    """The "k/N" fields of every progress-bar refresh tqdm wrote."""
    counts = []
    for line in err.replace(b"\r", b"\n").split(b"\n"):
        if b"|" in line and b"prebuild" in line:
            parts = line.split(b"|")
            if len(parts) >= 3:
                counts.append(parts[2].strip().split(b" ")[0])
    return counts


def _done_images(err: bytes) -> int:
    best = 0
    for c in _bar_counts(err):
        head = c.split(b"/")[0]
        if head.isdigit():
            best = max(best, int(head))
    return best


def _complete_sources(images: Path, annotations: Path, cache: Path) -> int:
    """How many sources a resumed prebuild will skip: what ``missing`` does not list."""
    if not (cache / "data.mdb").exists():
        return 0
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                          readonly=True, on_mismatch="ignore", preload=False)
    try:
        todo, failed = ds.missing(range(len(ds)))
    finally:
        ds.close()
    return len(ds) - len(todo) - len(failed)


@pytest.mark.full
def test_prebuild_survives_sigkill_at_random_moments_and_resumes(kill_data, tmp_path, capsys):
    images, annotations = split_paths(kill_data)
    cache = tmp_path / "cache"
    argv = command() + ["prebuild", "--images", str(images), "--annotations", str(annotations),
                        "--cache", str(cache), "--workers", "2"]
    rng = random.Random(20240611)
    kills = 0
    for attempt in range(4):
        child = _Child(argv)
        if attempt % 2 == 0:
            # Anywhere: interpreter start, opening and stamping the cache, or building.
            delay = rng.uniform(0.2, 2.5)
            child.wait_until(lambda: False, child.started + delay)
        else:
            # Inside the build: once the bar shows work done, a little later.
            child.wait_until(lambda c=child: _done_images(c.err) > 0, child.started + 60)
            extra = rng.uniform(0.0, 0.4)
            child.wait_until(lambda: False, time.monotonic() + extra)
        kills += child.kill()
        if (cache / "data.mdb").exists():
            rc, out, err = run_cli(capsys, "verify", "--cache", cache, "--json")
            report = json.loads(out)
            assert report["corrupt"] == [], f"after kill {attempt}: {report['corrupt']}"
            assert rc == 0, err
    assert kills >= 1, "every prebuild finished before it could be killed"

    expected_skips = _complete_sources(images, annotations, cache)
    done = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["total"] == KILL_N
    assert summary["failed"] == []
    assert summary["skipped"] == expected_skips
    assert summary["built"] == KILL_N - expected_skips

    clean = tmp_path / "clean"
    prebuild(images, annotations, clean, workers=1, progress=False)
    resumed, reference = snapshot(cache), snapshot(clean)
    for kind in KINDS:
        assert len(reference[kind]) == KILL_N
        assert resumed[kind].keys() == reference[kind].keys(), kind
        assert resumed[kind] == reference[kind], f"{kind}: records differ in content"
    assert resumed["index"] == reference["index"]
    with CacheStore(cache, readonly=True) as store:
        assert store.header()["build"]["clean"] is True


def test_resumed_prebuild_reports_skipped_and_builds_only_the_missing(small_data, tmp_path):
    images, annotations = split_paths(small_data)
    cache = tmp_path / "cache"
    first = prebuild(images, annotations, cache, workers=1, progress=False)
    assert (first.total, first.built, first.skipped, first.failed) == (SMALL_N, SMALL_N, 0, [])
    with CacheStore(cache) as store:
        gone = store.keys("tensors")[:2]
        before = {k: store.get("tensors", k)["image"].tobytes() for k in gone}
        with store.writer() as w:
            for key in gone:
                w.delete("tensors", key)
    again = prebuild(images, annotations, cache, workers=1, progress=False)
    assert (again.built, again.skipped, again.failed) == (2, SMALL_N - 2, [])
    with CacheStore(cache, readonly=True) as store:
        assert len(store.keys("tensors")) == SMALL_N
        for key in gone:
            assert store.get("tensors", key)["image"].tobytes() == before[key]
    third = prebuild(images, annotations, cache, workers=1, progress=False)
    assert (third.built, third.skipped) == (0, SMALL_N)


# -- 2. torchrun ranks -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend "
                    "is not available in this torch build")
@pytest.mark.full
def test_torchrun_two_ranks_equal_single_process_build(small_data, tmp_path):
    images, annotations = split_paths(small_data)
    cache = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "diskcache_ocr.cli", "prebuild", "--images", str(images),
         "--annotations", str(annotations), "--cache", str(cache), "--json"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    single = tmp_path / "single"
    prebuild(images, annotations, single, workers=1, progress=False)
    got, want = snapshot(cache), snapshot(single)
    for kind in KINDS:
        assert len(want[kind]) == SMALL_N
        assert got[kind] == want[kind], kind
    assert got["index"] == want["index"]
    with CacheStore(cache, readonly=True) as store:
        build = store.header()["build"]
    assert build["clean"] is True and build["world_size"] == 2


def test_each_rank_builds_its_share(small_data, tmp_path, monkeypatch):
    images, annotations = split_paths(small_data)
    cache = tmp_path / "cache"
    sources = sorted(p.name for p in images.iterdir())

    def as_rank(rank):
        for module in (prebuild_mod, build_mod):  # (the build's own rank and barriers too)
            monkeypatch.setattr(module, "barrier", lambda world: None)
            monkeypatch.setattr(module, "dist_info", lambda: (rank, 2))

    as_rank(0)
    s0 = prebuild(images, annotations, cache, workers=1, progress=False)
    assert (s0.rank, s0.world_size, s0.total, s0.built) == (0, 2, 3, 3)
    with CacheStore(cache, readonly=True) as store:
        indexed = sorted(s for s, _ in store.iter_index())
        assert len(store.keys("maps")) == 3
        assert store.header()["build"]["clean"] is True  # rank 0 marks the end
    ds = CachedOCRDataset(images, annotations, None)
    assert indexed == sorted(source_id(images, ds.source(i)) for i in range(0, SMALL_N, 2))

    as_rank(1)
    s1 = prebuild(images, annotations, cache, workers=1, progress=False)
    assert (s1.rank, s1.total, s1.built, s1.skipped) == (1, 3, 3, 0)
    with CacheStore(cache, readonly=True) as store:
        assert sorted(s for s, _ in store.iter_index()) == [source_id(images, s)
                                                             for s in sources]
        assert all(len(store.keys(kind)) == SMALL_N for kind in KINDS)


# -- 3. per-file failures --------------------------------------------------------------------
def test_corrupt_images_are_recorded_reported_and_not_retried(data_copy, tmp_path, capsys):
    images, annotations = split_paths(data_copy)
    files = sorted(images.iterdir())
    garbage, truncated = files[1], files[4]
    original = truncated.read_bytes()
    garbage.write_bytes(b"this is not a jpeg at all")
    truncated.write_bytes(original[: len(original) // 3])
    cache = tmp_path / "cache"
    args = ["prebuild", "--images", images, "--annotations", annotations, "--cache", cache,
            "--json"]

    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["built"] == SMALL_N - 2 and summary["skipped"] == 0
    failed = {f["source"]: f["reason"] for f in summary["failed"]}
    assert set(failed) == {garbage.name, truncated.name}
    assert all(reason.strip() for reason in failed.values())
    with CacheStore(cache, readonly=True) as store:
        assert all(len(store.keys(kind)) == SMALL_N - 2 for kind in KINDS)
        status = {s: e.status for s, e in store.iter_index()}
    assert status[source_id(images, garbage.name)].startswith("failed: ")
    assert status[source_id(images, truncated.name)].startswith("failed: ")

    rc, out, _ = run_cli(capsys, "health", "--cache", cache, "--json")
    assert rc == 1
    report = json.loads(out)
    assert report["ok"] is False
    details = [p["detail"] for p in report["problems"] if p["code"] == "failed_sources"]
    assert len(details) == 1
    assert garbage.name in details[0] and truncated.name in details[0]

    # The second run does not try them again: reported as failed, same reasons, no crash.
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    again = json.loads(out)
    assert (again["built"], again["skipped"]) == (0, SMALL_N - 2)
    assert {f["source"]: f["reason"] for f in again["failed"]} == failed

    # A repaired file is a changed source: the next run builds it.
    truncated.write_bytes(original)
    rc, out, _ = run_cli(capsys, *args)
    third = json.loads(out)
    assert (third["built"], third["skipped"]) == (1, SMALL_N - 2)
    assert [f["source"] for f in third["failed"]] == [garbage.name]


# -- 4. version bump per kind ----------------------------------------------------------------
def test_version_bump_rebuilds_exactly_the_affected_kinds(small_data, tmp_path, capsys):
    images, annotations = split_paths(small_data)
    cache = tmp_path / "cache"
    prebuild(images, annotations, cache, workers=1, progress=False)
    base = snapshot(cache)
    assert all(len(base[k]) == SMALL_N for k in KINDS)

    new_transform = TransformConfig(mean=(0.5, 0.5, 0.5))
    with pytest.raises(CacheVersionError):
        CachedOCRDataset(images, annotations, cache, preset="validation_optimized",
                         transform=new_transform, on_mismatch="error")
    assert snapshot(cache) == base  # refusing changed nothing

    with CacheStore(cache, readonly=True) as store:
        misses_before = store.stats().get("images.misses", 0)
    s = prebuild(images, annotations, cache, workers=1, progress=False, transform=new_transform)
    assert (s.built, s.skipped, s.failed) == (SMALL_N, 0, [])
    after_t = snapshot(cache)
    assert after_t["images"] == base["images"]  # same keys, same bytes
    for kind in ("tensors", "maps"):
        assert len(after_t[kind]) == SMALL_N
        assert not set(after_t[kind]) & set(base[kind]), f"{kind}: old records survived"
    with CacheStore(cache, readonly=True) as store:
        # The images were read from the cache, not decoded again.
        assert store.stats().get("images.misses", 0) == misses_before
    for _, (*_rest, keys) in after_t["index"].items():
        keys = {n.partition(":")[0]: k for n, k in keys.items()}  # (names: "tensors:1f0c...")
        assert keys["tensors"] in after_t["tensors"] and keys["maps"] in after_t["maps"]

    rc, out, _ = run_cli(capsys, "status", "--cache", cache, "--json")
    assert rc == 0
    kinds = json.loads(out)["kinds"]
    want = Pipeline(transform=new_transform).kind_versions()
    old = Pipeline().kind_versions()
    assert kinds["tensors"]["stored_version"] == str(want["tensors"]) != str(old["tensors"])
    assert kinds["tensors"]["current_version"] == str(want["tensors"])
    assert kinds["maps"]["stored_version"] == str(want["maps"])
    assert kinds["images"]["stored_version"] == str(old["images"])
    assert all(kinds[k]["up_to_date"] for k in KINDS)

    new_maps = MapConfig(shrink_ratio=0.5)
    s = prebuild(images, annotations, cache, workers=1, progress=False,
                 transform=new_transform, map_config=new_maps)
    assert (s.built, s.skipped) == (SMALL_N, 0)
    after_m = snapshot(cache)
    assert after_m["images"] == base["images"]
    assert after_m["tensors"] == after_t["tensors"]
    assert len(after_m["maps"]) == SMALL_N
    assert not set(after_m["maps"]) & set(after_t["maps"])

    rc, out, _ = run_cli(capsys, "status", "--cache", cache, "--json")
    kinds = json.loads(out)["kinds"]
    want = Pipeline(transform=new_transform, maps=new_maps).kind_versions()
    assert kinds["maps"]["stored_version"] == kinds["maps"]["current_version"] == str(
        want["maps"])
    assert kinds["tensors"]["stored_version"] == str(want["tensors"])


def test_prebuild_with_error_policy_refuses_a_version_change(small_data, tmp_path):
    images, annotations = split_paths(small_data)
    cache = tmp_path / "cache"
    prebuild(images, annotations, cache, workers=1, progress=False)
    base = snapshot(cache)
    with pytest.raises(CacheVersionError):
        prebuild(images, annotations, cache, workers=1, progress=False,
                 map_config=MapConfig(shrink_ratio=0.5), on_mismatch="error")
    assert snapshot(cache) == base


def test_prebuild_rejects_bad_arguments(small_data, tmp_path):
    images, annotations = split_paths(small_data)
    with pytest.raises(ValueError, match="workers"):
        prebuild(images, annotations, tmp_path / "c", workers=0, progress=False)
    with pytest.raises(ValueError, match="nothing"):
        prebuild(images, annotations, tmp_path / "c", preset="minimal", progress=False)


def test_damaged_record_is_replaced_by_a_read_through_read(small_data, tmp_path):
    images, annotations = split_paths(small_data)
    cache = tmp_path / "cache"
    prebuild(images, annotations, cache, workers=1, progress=False)
    base = snapshot(cache)
    with CacheStore(cache) as store:
        key = store.keys("maps")[0]
        batch = WriteBatch()
        batch.put("maps", key, b"\x00garbage\x00" * 8)
        store.commit(batch)
    ds = CachedOCRDataset(images, annotations, cache, preset="validation_optimized")
    for i in range(len(ds)):
        assert ds[i]["meta"]["error"] is None
    ds.close()
    assert snapshot(cache)["maps"] == base["maps"]
