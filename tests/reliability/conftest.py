"""Shared data of the reliability suite: two tiny datasets with the same file names and
different contents, their uncached references and a clean build."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

N_IMAGES = 8
SIZE = (240, 320)


@dataclass(frozen=True)
class Data:
    root: Path
    images: Path
    annotations: Path
    names: tuple[str, ...]


def _synth(root: Path, seed: int) -> Data:
    from diskcache_ocr.synth import split_paths, synthesize

    synthesize(root, N_IMAGES, seed=seed, min_words=3, max_words=10, size=SIZE)
    images, annotations = split_paths(root)
    return Data(root, images, annotations,
                tuple(sorted(p.name for p in images.iterdir())))


def _world_readable(path: Path) -> None:
    """So a child that dropped root (the permission tests) can read the data."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))


@pytest.fixture(scope="session")
def rel_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    # pytest's base temp dir is private to root; let a dropped-privilege child through.
    for parent in [root, *root.parents]:
        if parent == Path("/") or parent == Path(os.sep + "tmp"):
            break
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    return root


@pytest.fixture(scope="session")
def tiny(rel_root: Path) -> Data:
    data = _synth(rel_root / "tiny", seed=21)
    _world_readable(data.root)
    return data


@pytest.fixture(scope="session")
def tiny_alt(rel_root: Path, tiny: Data) -> Data:
    """The same file names with other contents (and other byte sizes, so the stat check
    can always tell the two apart)."""
    data = _synth(rel_root / "tiny_alt", seed=22)
    assert data.names == tiny.names
    for name in data.names:
        assert (data.images / name).stat().st_size != (tiny.images / name).stat().st_size, name
    return data


@pytest.fixture(scope="session")
def references(tiny: Data) -> dict[str, str]:
    """Digest of every sample computed without any cache, by file name."""
    from relhelp import sample_digest

    from diskcache_ocr.dataset import CachedOCRDataset

    ds = CachedOCRDataset(tiny.images, tiny.annotations, None, preset={"load_maps": True})
    return {ds.source(i): sample_digest(ds[i]) for i in range(len(ds))}


@pytest.fixture(scope="session")
def clean_build(rel_root: Path, tiny: Data) -> dict:
    """Snapshot of a clean, uninterrupted build of ``tiny`` (default transform)."""
    from relhelp import snapshot

    from diskcache_ocr.prebuild import prebuild

    cache = rel_root / "clean-cache"
    summary = prebuild(tiny.images, tiny.annotations, cache, workers=1, progress=False)
    assert summary.built == N_IMAGES and not summary.failed
    return snapshot(cache)
