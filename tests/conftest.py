from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def store(tmp_path):
    from diskcache_ocr.store import CacheStore

    s = CacheStore(tmp_path / "cache")
    yield s
    s.close()
