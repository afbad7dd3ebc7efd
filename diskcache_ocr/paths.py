"""Where a cache lives by default (shared by the dataset and the command line)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$DISKCACHE_OCR_DIR``, else ``$XDG_CACHE_HOME/diskcache-ocr`` (``~/.cache/...``)."""
    env = os.environ.get("DISKCACHE_OCR_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diskcache-ocr"


__all__ = ["default_cache_dir"]
