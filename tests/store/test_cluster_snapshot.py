"""A shared read-only snapshot: a cache on a network file system (told by the mount table's
file system type) is read without locks and never written; a write there is a clear error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from diskcache_ocr import ops
from diskcache_ocr.dataset import CachedOCRDataset
from diskcache_ocr.errors import CacheError
from diskcache_ocr.prebuild import prebuild
from diskcache_ocr.store import CacheStore
from diskcache_ocr.store import files as files_mod
from diskcache_ocr.synth import split_paths

N = 8


def _mountinfo(tmp_path: Path, mounts: list[tuple[str, str]]) -> Path:
    """A mount table in /proc/self/mountinfo's layout: (mount point, file system type)."""
    lines = []
    for n, (point, fstype) in enumerate(mounts, start=20):
        escaped = point.replace("\\", "\\134").replace(" ", "\\040")
        lines.append(f"{n} 1 0:{n} / {escaped} rw,relatime shared:{n} - {fstype} "
                     f"server:/export rw")
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """``tmp_path/shared`` mounted over NFS (as far as the mount table says)."""
    point = tmp_path / "shared"
    point.mkdir()
    table = _mountinfo(tmp_path, [("/", "ext4"), ("/tmp", "tmpfs"), (str(point), "nfs4")])
    monkeypatch.setattr(files_mod, "MOUNTINFO", table)
    return point


def test_network_file_systems_are_told_by_their_type(tmp_path, monkeypatch):
    spaced = tmp_path / "lustre scratch"
    table = _mountinfo(tmp_path, [("/", "ext4"), (str(tmp_path / "nfs"), "nfs"),
                                  (str(spaced), "lustre"), (str(tmp_path / "nfs" / "local"),
                                                            "xfs"),
                                  (str(tmp_path / "smb"), "cifs"),
                                  (str(tmp_path / "sshfs"), "fuse.sshfs")])
    monkeypatch.setattr(files_mod, "MOUNTINFO", table)
    found = files_mod.network_filesystem
    assert found(tmp_path / "nfs" / "cache") == "nfs"
    assert found(tmp_path / "nfs") == "nfs"
    assert found(spaced / "a" / "b") == "lustre"
    assert found(tmp_path / "nfs" / "local" / "cache") is None  # a local disk mounted inside
    assert found(tmp_path / "smb") == "cifs"
    assert found(tmp_path / "sshfs" / "x") == "fuse.sshfs"
    assert found(tmp_path / "nfsx") is None  # (a name that only begins like a mount point)
    assert found(tmp_path / "elsewhere") is None
    monkeypatch.setattr(files_mod, "MOUNTINFO", tmp_path / "no-such-table")
    assert found(tmp_path / "nfs") is None


def test_the_real_mount_table_reads():
    # (whatever this machine mounts: the call reads it without failing)
    assert files_mod.network_filesystem("/") in (None, *files_mod.NETWORK_FILESYSTEMS)


def test_any_write_onto_a_network_file_system_is_refused_with_what_to_do(
        synth_data, shared, tmp_path):
    images, annotations = split_paths(synth_data(N, 31, min_words=2, max_words=5,
                                                 size=(160, 224)))
    target = shared / "cache"
    with pytest.raises(CacheError, match="network file system") as err:
        prebuild(images, annotations, target, workers=1, progress=False)
    assert "readonly=True" in str(err.value) and "diskcache-ocr copy" in str(err.value)
    assert not (target / "data.mdb").exists()
    with pytest.raises(CacheError, match=r"network file system \(nfs4\)"):
        CacheStore(target).put("images", b"k" * 32, {"image": np.zeros((2, 2), np.uint8)})
    with pytest.raises(CacheError, match="network file system"):
        CachedOCRDataset(images, annotations, target, preset="validation_optimized")


def test_a_snapshot_there_is_read_without_locks_and_never_written(synth_data, shared,
                                                                   tmp_path):
    images, annotations = split_paths(synth_data(N, 31, min_words=2, max_words=5,
                                                 size=(160, 224)))
    local = tmp_path / "local"
    prebuild(images, annotations, local, workers=1, progress=False)
    ops.clear(local, kind="maps")  # (the snapshot lacks a kind: reads of it miss)
    snap = shared / "snapshot"
    done = ops.copy(local, snap)  # a compacted snapshot, written once
    assert done["bytes"] == (snap / "data.mdb").stat().st_size
    assert not (snap / "lock.mdb").exists()
    before = hashlib.sha256((snap / "data.mdb").read_bytes()).hexdigest()

    ds = CachedOCRDataset(images, annotations, snap, preset="validation_optimized",
                          readonly=True, preload=False)
    fresh = CachedOCRDataset(images, annotations, None, preset="validation_optimized")
    counted = ds.store.stats()  # (the counters the snapshot carries from its build)
    for i in range(N):
        got, want = ds[i], fresh[i]
        for name, value in want.items():
            if hasattr(value, "shape"):
                assert np.array_equal(np.asarray(got[name]), np.asarray(value)), name
    read = {k: v - counted.get(k, 0) for k, v in ds.store.stats().items()}
    assert read["tensors.hits"] == N and read["maps.misses"] == N  # computed, not written
    ds.store.close()
    assert ops.status(snap)["kinds"]["tensors"]["entries"] == N
    assert not (snap / "lock.mdb").exists()  # no lock taken, nothing created
    assert hashlib.sha256((snap / "data.mdb").read_bytes()).hexdigest() == before
