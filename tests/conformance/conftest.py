"""Live conformance tests: the origin project's own code beside ours, on the same inputs.

Collected only when ``ORIGIN_SRC`` names a checkout of the origin project; run them in a
Python environment with the origin's pinned packages (see ``scripts/conformance/README.md``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

if os.environ.get("ORIGIN_SRC"):
    src = os.environ["ORIGIN_SRC"]
    if not (Path(src) / "ocr" / "datasets" / "base.py").is_file():
        raise pytest.UsageError(f"ORIGIN_SRC={src} is not a checkout of the origin project "
                                "(no ocr/datasets/base.py)")
    for path in (str(ROOT / "scripts" / "conformance"), src):
        if path not in sys.path:
            sys.path.insert(0, path)
