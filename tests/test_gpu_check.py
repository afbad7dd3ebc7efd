"""benchmarks/gpu_check.py stays runnable: its --dry-run (tiny sizes, CPU) end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.full
def test_gpu_check_dry_run_writes_every_feed(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--data", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert result["compact_finish_equals_float32"] is True
    feeds = result["feeds"]
    assert [name[:3] for name in feeds][1:] == ["(a)", "(b)", "(c)", "(d)"]
    for name, feed in feeds.items():
        assert feed["images_per_s"] > 0, name
        assert feed["fraction_of_in_gpu"] > 0, name
    assert "(c) cached compact" in proc.stdout
