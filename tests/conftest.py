"""Shared by the whole suite: test helpers on the import path, the Hypothesis profile, the
tiers (tests/README.md) and the session's datasets and caches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# Test modules import helpers by their bare names (``testkit``, ``relhelp``, a sibling test
# file's pipelines), wherever in tests/ either lives and whichever file pytest runs alone:
# tests/ and each folder of test modules are on the path. (Spawned workers inherit it.)
for _folder in (HERE, *sorted(p.parent for p in HERE.glob("*/test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import hypkit  # noqa: E402 - registers and loads the Hypothesis profile

hypkit.load()

# Folders whose every test belongs to the whole suite only (not to ``./dev.sh test --quick``).
FULL_ONLY = ("reliability", "conformance")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve()
        if path.is_relative_to(HERE) and path.relative_to(HERE).parts[0] in FULL_ONLY:
            item.add_marker(pytest.mark.full)


BUILT_N = 4  # images in the shared prebuilt cache


@pytest.fixture(scope="session", autouse=True)
def _default_cache_dir_of_the_session(tmp_path_factory):
    """A dataset made without ``cache_dir`` caches under ``$DISKCACHE_OCR_DIR``: point it at a
    directory of this session, so no test writes to the user's own cache (tests of the
    default itself set or remove the variable)."""
    before = os.environ.get("DISKCACHE_OCR_DIR")
    os.environ["DISKCACHE_OCR_DIR"] = str(tmp_path_factory.mktemp("default-cache"))
    yield
    if before is None:
        os.environ.pop("DISKCACHE_OCR_DIR", None)
    else:
        os.environ["DISKCACHE_OCR_DIR"] = before


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(dataset root, cache): a small synthetic dataset prebuilt once for the session (the
    ``validation_optimized`` preset). Tests that change either work on ``private_copy``."""
    from testkit import build_small

    return build_small(tmp_path_factory.mktemp("built"), BUILT_N, seed=21)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A factory of synthetic datasets, each made once per session per parameter set:
    ``synth_data(n, seed, **synthesize_options)`` -> dataset root."""
    from diskcache_ocr.synth import synthesize

    made = {}

    def make(n, seed, **options):
        key = (n, seed, tuple(sorted(options.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"data-{n}-{seed}")
            synthesize(root, n, seed=seed, **options)
            made[key] = root
        return made[key]

    return make


@pytest.fixture
def store(tmp_path):
    from diskcache_ocr.store import CacheStore

    s = CacheStore(tmp_path / "cache")
    yield s
    s.close()
