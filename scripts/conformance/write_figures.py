"""Write what the origin project's own pipeline produces on the conformance inputs.

Runs their dataset (their Hydra tree, ``val_transform``, ``DBCollateFN``; no workers, first
epoch) for each preset on the inputs under ``OUT/inputs`` (generated there first when absent)
and writes ``OUT/figures.json`` (per image: hashes of the image and maps, polygons with dtype
and shapes, inverse matrix with dtype, metadata with value types, the batch fields; the
sample order; ``anns``; item and batch keys; the versions used) and ``OUT/arrays.npz`` (full
image and maps of a few images).

    ORIGIN_SRC=/path/to/origin PYTHONPATH=$PWD:<stubs>:$ORIGIN_SRC <origin venv>/bin/python \\
        scripts/conformance/write_figures.py tests/data/origin-conformance
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conformance_data  # noqa: E402
import conformance_harness as H  # noqa: E402

FULL_ARRAYS = ("receipt_00010.jpg", "exif6_st.jpg", "rgba_page.png")
COUNTERS = ("cache_hits", "cache_misses")  # their in-memory caches' counters, per preset
PACKAGES = ("numpy", "Pillow", "albumentations", "opencv-python-headless", "pyclipper",
            "torch", "hydra-core", "omegaconf", "pydantic")


def _json_value(value: Any, root: Path, key: str = "") -> Any:
    if key == "path":
        return H.relative_path(value, root)
    if isinstance(value, (tuple, list)):
        return [_json_value(v, root) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return H.relative_path(value, root)
    return value


def _polygons(polys: list[np.ndarray]) -> dict[str, Any]:
    arrays = H.polygons_list(polys)
    return {"count": len(arrays),
            "types": sorted({type(p).__name__ for p in polys}),
            "dtypes": sorted({str(p.dtype) for p in arrays}),
            "shapes": [list(p.shape) for p in arrays],
            "points": [[float(v) for v in p.ravel()] for p in arrays]}


def sample_figures(s: dict[str, Any], root: Path) -> dict[str, Any]:
    inv = H._np(s["inverse_matrix"])
    meta = s.get("metadata") or {}
    return {
        "image": {"sha256": H.sha256(s["image"]), "shape": list(s["image"].shape),
                  "dtype": str(s["image"].dtype)},
        "prob_maps": {"sha256": H.sha256(s["prob_maps"]), "shape": list(s["prob_maps"].shape),
                      "dtype": str(s["prob_maps"].dtype)},
        "thresh_maps": {"sha256": H.sha256(s["thresh_maps"]),
                        "shape": list(s["thresh_maps"].shape),
                        "dtype": str(s["thresh_maps"].dtype)},
        "polygons": _polygons(s.get("polygons") or []),
        "inverse_matrix": {"type": type(s["inverse_matrix"]).__name__, "dtype": str(inv.dtype),
                           "values": [float(v) for v in inv.ravel()]},
        "batch": {k: _json_value(s[k], root) if k != "image_path" else
                  H.relative_path(s[k], root)
                  for k in ("image_filename", "image_path", "raw_size", "orientation", "shape",
                            "canonical_size") if k in s},
        "batch_types": {k: type(s[k]).__name__ for k in ("raw_size", "orientation", "shape")
                        if k in s},
        "metadata": {k: _json_value(v, root, k) for k, v in meta.items()},
        "metadata_types": {k: type(v).__name__ for k, v in meta.items()},
    }


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "absent"
    src = H.origin_src()
    try:
        out["origin_commit"] = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"],
                                              capture_output=True, text=True,
                                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["origin_commit"] = "unknown"
    out["python"] = sys.version.split()[0]
    return out


def _dumps(figures: dict[str, Any]) -> str:
    """JSON with one line per image (readable diffs, small file)."""
    lines = ["{"]
    items = list(figures.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, dict) and key in ("samples", "anns", "presets"):
            lines.append(f" {json.dumps(key)}: {{")
            sub = list(value.items())
            for j, (k, v) in enumerate(sub):
                lines.append(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                             + ("," if j < len(sub) - 1 else ""))
            lines.append(" }" + comma)
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{comma}")
    return "\n".join(lines + ["}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--presets", nargs="+", default=list(H.PRESETS))
    args = ap.parse_args(argv)
    root = args.out / "inputs"
    if not (root / "jsons" / "val.json").exists():
        conformance_data.generate(root)
    figures: dict[str, Any] = {"versions": versions(), "seed": conformance_data.SEED,
                               "inputs": "inputs (images/val, jsons/val.json)",
                               "loader": {"batch_size": 4, "num_workers": 0, "epoch": 1},
                               "counters": list(COUNTERS), "presets": {}}
    arrays: dict[str, np.ndarray] = {}
    for preset in args.presets:
        cfg = H.compose(root, preset)
        ds, _tf, collate = H.origin_parts(cfg)
        samples, keys = H.epoch(H.loader(ds, collate, 0))
        item = ds[0]
        per_sample = {s["image_filename"]: sample_figures(s, root) for s in samples}
        for idx, name in enumerate(ds.anns):  # the item, before their collate
            per_sample[name]["item_polygons"] = _polygons(ds[idx]["polygons"])
        counters = {name: {k: [f["metadata"].pop(k, None), f["metadata_types"].pop(k, None)]
                           for k in COUNTERS}
                    for name, f in per_sample.items()}
        config = H.plain_config(cfg.datasets.val_dataset.config)
        for key in ("image_path", "annotation_path"):
            config[key] = H.relative_path(config[key], root)
        figures["presets"][preset] = {
            "config": config, "order": [s["image_filename"] for s in samples],
            "batch_keys": sorted(keys), "item_keys": list(item),
            "item_types": {k: type(v).__name__ for k, v in item.items()},
            "metadata_counters": counters}
        if "samples" not in figures:
            figures["samples"] = per_sample
            figures["anns_type"] = type(ds.anns).__name__
            figures["anns"] = {name: None if polys is None else
                               {"dtypes": sorted({str(p.dtype) for p in polys}),
                                "shapes": [list(p.shape) for p in polys],
                                "points": [p.ravel().tolist() for p in polys]}
                               for name, polys in ds.anns.items()}
            for s in samples:
                if s["image_filename"] in FULL_ARRAYS:
                    stem = Path(s["image_filename"]).stem
                    for key in ("image", "prob_maps", "thresh_maps"):
                        arrays[f"{stem}.{key}"] = s[key]
        elif per_sample != figures["samples"]:
            raise SystemExit(f"{preset}: the origin's samples differ from the first preset's "
                             "beyond the cache counters; store them per preset")
        print(f"{preset}: {len(samples)} images", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures.json").write_text(_dumps(figures))
    np.savez_compressed(args.out / "arrays.npz", **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
