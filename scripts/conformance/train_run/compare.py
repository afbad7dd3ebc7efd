"""Print where two recorded train.py runs differ in what their evaluation received.

    python compare.py WORK_THEIRS WORK_OURS

Each WORK is a directory ``run_origin_train.run`` wrote (run.json, capture.json, output.log).
Exits 1 when anything differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _diff(a: Any, b: Any, path: str, out: list[str], limit: int = 200) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'ours' if k not in a else 'theirs'}")
            else:
                _diff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) \
            and any(isinstance(x, (dict, list)) for x in a):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path}: theirs {json.dumps(a)[:160]} | ours {json.dumps(b)[:160]}")


def compare(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Differences between two runs' records (run summaries with their captures)."""
    out: list[str] = []
    for key in ("rc", "no_predictions"):
        if theirs.get(key) != ours.get(key):
            out.append(f"{key}: theirs {theirs.get(key)!r} | ours {ours.get(key)!r}")
    a, b = theirs.get("capture") or {}, ours.get("capture") or {}
    for stage in sorted(set(a.get("stages", {})) | set(b.get("stages", {}))):
        sa, sb = a.get("stages", {}).get(stage), b.get("stages", {}).get(stage)
        if sa is None or sb is None:
            out.append(f"{stage}: only in {'ours' if sa is None else 'theirs'}")
            continue
        for part in ("evaluator", "batches", "metrics"):
            _diff(sa.get(part), sb.get(part), f"{stage}.{part}", out)
    return out


def _load(work: Path) -> dict[str, Any]:
    capture = work / "capture.json"
    return {**json.loads((work / "run.json").read_text()),
            "capture": json.loads(capture.read_text()) if capture.exists() else None}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__)
        return 2
    diffs = compare(_load(Path(args[0])), _load(Path(args[1])))
    print("\n".join(diffs) if diffs else "no differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
