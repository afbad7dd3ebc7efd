"""Batch memory in shared memory: slabs never outlive the processes that made them, however
the training loop ends, and a full /dev/shm degrades to fresh memory instead of failing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Data
from relhelp import Child, loader_exit, slabs_in

from diskcache_ocr import batchmem

pytestmark = pytest.mark.skipif(not os.path.isdir(batchmem.SHM_DIR), reason="no /dev/shm")


@pytest.fixture
def shm_dir():
    """A directory of its own in /dev/shm, so other processes' slabs are not counted."""
    path = Path(batchmem.SHM_DIR) / f"docr-test-{secrets.token_hex(4)}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def warm(tiny: Data, tmp_path_factory) -> Path:
    from diskcache_ocr.prebuild import prebuild

    cache = tmp_path_factory.mktemp("shm") / "cache"
    prebuild(tiny.images, tiny.annotations, cache, preset="validation_optimized",
             workers=1, progress=False)
    return cache


def _run(tiny: Data, cache: Path, shm_dir: Path, how: str, tmp_path: Path) -> tuple[int, dict]:
    out = tmp_path / f"{how}.json"
    child = Child(loader_exit, str(tiny.images), str(tiny.annotations), str(cache),
                  str(shm_dir), how, str(out), log=tmp_path / f"{how}.log")
    rc = child.join(300)
    assert out.exists(), child.log_text()
    return rc, json.loads(out.read_text())


@pytest.mark.parametrize("how", ["kill-worker", "raise"])
def test_no_slab_outlives_a_program_that_ends_with_an_error(tiny, warm, shm_dir, tmp_path,
                                                            how):
    rc, report = _run(tiny, warm, shm_dir, how, tmp_path)
    assert rc == 1  # the error ended the program
    assert report["during"], "the workers made no slabs: nothing was tested"
    assert slabs_in(str(shm_dir)) == [], (report, Path(tmp_path / f"{how}.log").read_text())


def test_no_slab_outlives_the_iterator(tiny, warm, shm_dir, tmp_path):
    rc, report = _run(tiny, warm, shm_dir, "teardown", tmp_path)
    assert rc == 0 and report["during"]
    assert report["after"] == []
    assert slabs_in(str(shm_dir)) == []


def test_a_new_loader_sweeps_the_slabs_of_a_killed_worker(tiny, warm, shm_dir, tmp_path):
    rc, report = _run(tiny, warm, shm_dir, "kill-worker-then-new-loader", tmp_path)
    assert rc == 0 and "error" in report, report
    killed = report["workers"][0]
    assert any(f"-{killed}-" in name for name in report["during"]), report
    # while the program still runs, only the new loader's workers have slabs
    owners = {int(name.split("-")[3]) for name in report["after"]}
    assert owners <= set(report["new workers"]), report
    assert slabs_in(str(shm_dir)) == []


SMALL_SHM_MIB = 180  # room for about five batches of three 640x640 samples with maps


def _epochs_in_small_shm(kind: str, tiny: Data, cache: Path, epochs: int,
                         tmp_path: Path) -> dict:
    """``relhelp.shm_epochs`` in a mount namespace of its own whose /dev/shm is a tmpfs of
    SMALL_SHM_MIB (a container's); skips without root or ``unshare``."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to give a process a small /dev/shm")
    out = tmp_path / f"{kind}.json"
    here = Path(__file__).parent
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import relhelp; "
            "relhelp.shm_epochs(*sys.argv[2:6], int(sys.argv[6]), sys.argv[7])")
    script = (f"mount -t tmpfs -o size={SMALL_SHM_MIB}m tmpfs /dev/shm && "
              f'exec "$0" -c "{code}" "$@"')
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          script, sys.executable, str(here), kind, str(tiny.images),
                          str(tiny.annotations), str(cache), str(epochs), str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(here.parents[1]), os.environ.get("PYTHONPATH", "")])})
    if not out.exists():
        if "unshare" in res.stderr or "mount" in res.stderr:
            pytest.skip(f"no private /dev/shm here: {res.stderr.strip()[-300:]}")
        raise AssertionError(f"{kind}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "log": res.stderr[-2000:]}


@pytest.mark.slow
def test_a_dev_shm_enough_for_a_stock_dataloader_is_enough_for_ours(tiny, warm, tmp_path):
    epochs = 3
    stock = _epochs_in_small_shm("stock", tiny, warm, epochs, tmp_path)
    if stock["error"]:
        pytest.skip(f"a stock DataLoader does not fit {SMALL_SHM_MIB} MiB here either: "
                    f"{stock['error']}")
    for kind in ("ours", "ours-no-reuse"):
        got = _epochs_in_small_shm(kind, tiny, warm, epochs, tmp_path)
        assert got["error"] is None, (kind, got)
        assert got["batches"] == stock["batches"], (kind, got)
        assert got["slabs"] == [], (kind, got)
