from __future__ import annotations

import re

from diskcache_ocr.demo import run_demo


def test_demo_runs_end_to_end_and_reports_what_the_cache_did(tmp_path, capsys):
    n = 6
    run_demo(tmp_path / "demo", n=n, workers=2)
    out = capsys.readouterr().out
    assert f"synthesized {n} receipts" in out
    assert f"prebuild: {n} built, 0 already cached, 0 failed" in out
    rows = re.findall(r"^ +(no cache|cached), .*?([\d.]+) s +([\d.]+) s", out, re.M)
    assert [r[0] for r in rows] == ["no cache", "cached", "cached"]
    # Two DataLoader epochs and two BatchLoader epochs, every read a hit.
    reads = 4 * n
    assert f"tensors {reads}/{reads} hits (100%), maps {reads}/{reads} hits (100%)" in out
    assert re.search(r"0 corrupt; \d+ sources recomputed from scratch, 0 differ", out)
    assert (tmp_path / "demo" / "cache" / "data.mdb").is_file()
