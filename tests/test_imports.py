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


@pytest.mark.parametrize("command", ["status", "health"])
def test_a_command_on_a_cache_loads_no_torch(tmp_path, command):
    code = ("import sys\nfrom diskcache_ocr import cli\n"
            f"try:\n    cli.main([{command!r}, '--cache', {str(tmp_path / 'c')!r}, '--json'])\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr[-2000:]
