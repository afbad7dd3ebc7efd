"""The package loads lazily: the command line and the errors import no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import diskcache_ocr


@pytest.mark.parametrize("module", ["diskcache_ocr", "diskcache_ocr.errors", "diskcache_ocr.cli",
                                    "diskcache_ocr.store"])
def test_no_torch_until_a_dataset_is_made(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_resolves():
    for name in diskcache_ocr.__all__:
        assert getattr(diskcache_ocr, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diskcache_ocr.nope  # noqa: B018
