"""The small dataset the origin training-run comparison uses, in the origin's layout.

Images come from this project's synthesizer (8 receipts per split); the annotation files of
the evaluated splits are re-ordered so that their order is not the sorted order of the file
names (the origin keeps the annotation file's order). ``val.json`` may instead be given, e.g.
the copy committed beside the recorded figures: the synthesizer's word boxes follow the font
metrics of the installed Pillow, so another Pillow writes other polygons (same image sizes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diskcache_ocr.synth import synthesize

__all__ = ["SEEDS", "ORDER", "N", "make_dataset", "reorder"]

N = 8
SEEDS = {"train": 1, "val": 2, "test": 3}
ORDER = (3, 0, 6, 1, 7, 2, 5, 4)  # annotation-file order of the val and test splits


def reorder(ann: dict[str, Any], order: tuple[int, ...] = ORDER) -> dict[str, Any]:
    """The annotation mapping with its images in ``order`` (indices into its current order)."""
    names = list(ann["images"])
    if sorted(order) != list(range(len(names))):
        raise ValueError(f"order {order} is not a permutation of {len(names)} images")
    return {**ann, "images": {names[i]: ann["images"][names[i]] for i in order}}


def make_dataset(root: str | os.PathLike, *, val_annotations: str | os.PathLike | None = None
                 ) -> Path:
    """Write train/val/test under ``root`` (images/<split>/, jsons/<split>.json)."""
    root = Path(root)
    for split, seed in SEEDS.items():
        summary = synthesize(root, N, split=split, seed=seed)
        if split != "train":
            ann = json.loads(summary.annotation_file.read_text())
            summary.annotation_file.write_text(json.dumps(reorder(ann)))
    if val_annotations is not None:
        (root / "jsons" / "val.json").write_text(Path(val_annotations).read_text())
    return root
