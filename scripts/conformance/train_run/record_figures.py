"""Run the origin's ``runners/train.py`` with its own dataset class on the comparison dataset
and write what its evaluation received as figures (JSON) that tests check without the origin.

    python record_figures.py --origin /path/to/origin --python /path/to/origin-venv/bin/python \\
        --work /tmp/work --out tests/data/origin-train-run

Writes ``OUT/val.json`` (the annotation file the run used) and ``OUT/figures.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dataset as _dataset  # noqa: E402
import run_origin_train as _run  # noqa: E402

DATA = "<data>"


def _relative(value: Any, root: str) -> Any:
    """Absolute paths under the data root written as ``<data>/...``."""
    if isinstance(value, str):
        return value.replace(root, DATA)
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    return value


def figures(res: dict[str, Any], data_root: Path, origin: Path) -> dict[str, Any]:
    """The figures of one run (its ``run()`` result)."""
    root = str(data_root.resolve())
    stages = {}
    for stage, rec in res["capture"]["stages"].items():
        names = [n for b in rec["batches"] for n in b["image_filename"]]
        per_item: dict[str, dict[str, Any]] = {}
        for b in rec["batches"]:
            for i, name in enumerate(b["image_filename"]):
                per_item[name] = {
                    "raw_size": b["raw_size"][i], "orientation": b["orientation"][i],
                    "canonical_size": b["canonical_size"][i], "shape": b["shape"][i],
                    "image_path": b["image_path"][i],
                    "inverse_matrix": {"dtype": b["inverse_matrix"][i]["dtype"],
                                       "values": b["inverse_matrix"][i]["values"]},
                    "polygons": b["polygons"][i],
                    "metadata": {k: b["metadata"][i][k] for k in ("keys", "value_types", "values")},
                }
        files = rec["evaluator"]["files"]
        stages[stage] = {
            "dataset_type": rec["dataset"]["type"],
            "anns_type": rec["dataset"]["anns_type"],
            "anns_keys": rec["evaluator"]["filenames_to_check"],
            "item_order": names,
            "batch_keys": rec["batches"][0]["keys"],
            "images": rec["batches"][0]["images"],
            "gt": {n: f["gt"]["values"] for n, f in files.items()},
            "gt_types": {n: {k: f["gt"][k] for k in ("type", "count", "item_types", "dtypes",
                                                     "shapes")} for n, f in files.items()},
            "pred_boxes": {n: f["pred_boxes"] for n, f in files.items()},
            "items": per_item,
            "metrics": rec["metrics"],
        }
    for stage, rec in stages.items():
        if stage != "val" and "val" in stages:
            for key in ("gt", "gt_types", "items"):
                if rec[key] == stages["val"][key]:
                    rec[key] = {"same_as": "val"}
    commit = subprocess.run(["git", "-C", str(origin), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or None
    overrides = [a for a in res["command"][2:] if "callbacks.capture" not in a
                 and not a.startswith("hydra.run.dir=")]
    return _relative({
        "about": "What the origin project's runners/train.py (fast_dev_run, CPU, its own "
                 "dataset class) handed its evaluation, per stage: the dataset's anns keys "
                 "(order), the batch order, each file's ground truth as anns holds it, each "
                 "item's batch fields, and the logged metrics.",
        "origin_commit": commit,
        "overrides": overrides,
        "wall_s": res["wall_s"],
        "data": {"n": _dataset.N, "seeds": _dataset.SEEDS, "order": list(_dataset.ORDER),
                 "val_annotations": "val.json (beside this file)"},
        "stages": stages,
    }, root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--origin", required=True, type=Path)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--reuse", action="store_true",
                   help="read WORK/theirs (a finished run on WORK/data) instead of running")
    p.add_argument("extra", nargs="*", help="further Hydra overrides")
    a = p.parse_args(argv)
    if a.reuse:
        data_root = a.work / "data"
        res = _run.load(a.work / "theirs")
    else:
        data_root = _dataset.make_dataset(a.work / "data")
        res = _run.run(a.origin, data_root, a.work / "theirs", python=a.python,
                       extra=tuple(a.extra))
    if res["rc"] != 0 or res["capture"] is None:
        print(res["output"][-6000:])
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "val.json").write_text((data_root / "jsons" / "val.json").read_text())
    (a.out / "figures.json").write_text(
        json.dumps(figures(res, data_root, a.origin), separators=(",", ":")) + "\n")
    print(f"wrote {a.out}/figures.json ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
