"""A Lightning callback that records what the origin project's evaluation receives.

Added to the origin project's ``runners/train.py`` by a Hydra override (their code unchanged)::

    +callbacks.capture._target_=origin_capture.CaptureCallback +callbacks.capture.out=FILE

It writes FILE (JSON) after every validation/test batch and at the end of each stage, so a run
that crashes later still leaves what it saw: per stage, the batches' keys and per-item fields
(file names, shapes, dtypes, inverse matrices, metadata keys), the file names the evaluator will
check (the dataset's ``anns`` keys, in order), each file's ground-truth polygons as the
evaluator reads them, the number of predicted boxes per file, and the logged metrics.

Only duck typing on the origin's objects: this module imports nothing of theirs.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the origin venv has lightning
    Callback = object  # type: ignore[assignment,misc]

__all__ = ["CaptureCallback", "describe_array", "to_jsonable"]


def to_jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON values for numbers, arrays, tensors, paths and nested containers."""
    if depth > 6:
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else describe_array(value)
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        try:
            return {str(k): to_jsonable(v, depth + 1) for k, v in value.items()}
        except Exception:  # noqa: BLE001 - recording must not break the run
            return repr(value)
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump(), depth + 1)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, depth + 1) for v in value]
    return repr(value)


def describe_array(value: Any) -> dict[str, Any]:
    """Type, dtype and shape of an array-like (tensors included)."""
    kind = type(value).__module__.split(".")[0] + "." + type(value).__name__
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    return {"type": kind, "dtype": str(dtype) if dtype is not None else None,
            "shape": list(shape) if shape is not None else None}


def _polygons(polys: Any) -> dict[str, Any] | None:
    """Ground-truth polygons as the evaluator reads them: count, dtype, values."""
    if polys is None:
        return None
    items = list(polys)
    arrays = [np.asarray(p) for p in items]
    return {"type": type(polys).__name__,
            "count": len(items),
            "item_types": sorted({type(p).__name__ for p in items}),
            "dtypes": sorted({str(a.dtype) for a in arrays}),
            "shapes": sorted({str(tuple(a.shape)) for a in arrays}),
            "values": [a.tolist() for a in arrays]}


def _base_dataset(dataset: Any) -> Any:
    return dataset.dataset if hasattr(dataset, "indices") and hasattr(dataset, "dataset") \
        else dataset


class CaptureCallback(Callback):  # type: ignore[misc,valid-type]
    """Records the evaluation's inputs per stage into ``out`` (JSON)."""

    def __init__(self, out: str, max_batch_items: int = 64, probe: bool = False) -> None:
        super().__init__()
        self.out = Path(out)
        self.max_batch_items = max_batch_items
        self.probe = probe  # also record quantiles of the model's probability map (a forward)
        self.record: dict[str, Any] = {"stages": {}, "events": [], "exception": None}

    # -- writing ---------------------------------------------------------------------------
    def _save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=repr))
        os.replace(tmp, self.out)

    def _stage(self, name: str) -> dict[str, Any]:
        return self.record["stages"].setdefault(name, {"batches": [], "evaluator": None,
                                                       "dataset": None, "metrics": None})

    # -- what is recorded ------------------------------------------------------------------
    def _batch(self, batch: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"keys": sorted(map(str, batch.keys()))}
        for key, value in batch.items():
            if hasattr(value, "shape") and hasattr(value, "dtype"):
                out[key] = describe_array(value)
            elif isinstance(value, (list, tuple)):
                head = list(value)[: self.max_batch_items]
                if key in ("image_filename", "image_path", "orientation", "raw_size",
                           "canonical_size", "shape"):
                    out[key] = to_jsonable(head)
                elif key == "inverse_matrix":
                    out[key] = [{**describe_array(m), "values": to_jsonable(np.asarray(m))}
                                for m in head]
                elif key == "polygons":
                    out[key] = [{"type": type(p).__name__, "count": len(p),
                                 "dtypes": sorted({str(np.asarray(q).dtype) for q in p}),
                                 "shapes": sorted({str(np.asarray(q).shape) for q in p})}
                                for p in head]
                elif key == "metadata":
                    out[key] = [None if m is None else
                                {"type": type(m).__name__,
                                 "keys": sorted(map(str, dict(m).keys()))
                                 if hasattr(m, "keys") else None,
                                 "value_types": {str(k): type(v).__name__
                                                 for k, v in dict(m).items()}
                                 if hasattr(m, "keys") else None,
                                 "values": to_jsonable(m)}
                                for m in head]
                else:
                    out[key] = {"type": type(value).__name__, "len": len(value),
                                "item_types": sorted({type(v).__name__ for v in head})}
            else:
                out[key] = {"type": type(value).__name__, "repr": repr(value)[:200]}
        return out

    def _dataset(self, dataset: Any) -> dict[str, Any]:
        base = _base_dataset(dataset)
        anns = getattr(base, "anns", None)
        info: dict[str, Any] = {"type": f"{type(base).__module__}.{type(base).__name__}",
                                "subset": base is not dataset, "len": len(dataset),
                                "has_anns": anns is not None,
                                "anns_type": type(anns).__name__ if anns is not None else None,
                                "anns_keys": list(anns.keys()) if anns is not None else None,
                                "image_path": str(getattr(base, "image_path", None))}
        if hasattr(dataset, "indices"):
            info["indices"] = [int(i) for i in dataset.indices]
        return info

    def _evaluator(self, evaluator: Any) -> dict[str, Any]:
        dataset = evaluator.dataset
        base = _base_dataset(dataset)
        anns = getattr(base, "anns", None)
        names = list(anns.keys()) if anns is not None else []
        if hasattr(dataset, "indices") and anns is not None:
            names = [names[i] for i in dataset.indices]
        preds = evaluator.predictions
        processed = [n for n in names if n in preds]
        files = {}
        for name in processed:
            pred = preds[name]
            files[name] = {
                "gt": _polygons(anns.get(name)) if anns is not None else None,
                "pred_boxes": len(getattr(pred, "boxes", []) or []),
                "orientation": to_jsonable(getattr(pred, "orientation", None)),
                "raw_size": to_jsonable(getattr(pred, "raw_size", None)),
                "canonical_size": to_jsonable(getattr(pred, "canonical_size", None)),
                "image_path": to_jsonable(getattr(pred, "image_path", None)),
                "metadata_keys": sorted(dict(pred.metadata).keys())
                if isinstance(getattr(pred, "metadata", None), dict) else None,
            }
        return {"filenames_to_check": names, "prediction_filenames": list(preds.keys()),
                "processed_filenames": processed, "files": files}

    def _update(self, stage: str, pl_module: Any, batch: Any | None) -> None:
        rec = self._stage(stage)
        try:
            if batch is not None:
                rec["batches"].append(self._batch(batch))
            evaluator = getattr(pl_module, "valid_evaluator" if stage == "val"
                                else "test_evaluator", None)
            if evaluator is not None:
                rec["evaluator"] = self._evaluator(evaluator)
                rec["dataset"] = self._dataset(evaluator.dataset)
        except Exception as exc:  # noqa: BLE001 - recording must not break the run
            rec.setdefault("capture_errors", []).append(
                "".join(traceback.format_exception_only(type(exc), exc)).strip())
        self._save()

    def _metrics(self, stage: str, trainer: Any) -> None:
        rec = self._stage(stage)
        rec["metrics"] = {k: to_jsonable(v) for k, v in trainer.callback_metrics.items()}
        rec["logged_metrics"] = {k: to_jsonable(v) for k, v in trainer.logged_metrics.items()}
        self._save()

    # -- Lightning hooks -------------------------------------------------------------------
    def _probe(self, stage: str, pl_module: Any, batch: Any) -> None:
        import torch
        with torch.no_grad():
            pred = pl_module.model(**batch)
        prob = pred["prob_maps"].detach().float().flatten()
        qs = [0.1, 0.5, 0.9, 0.99, 0.999, 1.0]
        values = torch.quantile(prob[:: max(1, prob.numel() // 1_000_000)], torch.tensor(qs))
        rec = self._stage(stage)
        rec.setdefault("prob_quantiles", []).append(
            dict(zip(map(str, qs), values.tolist(), strict=True)))
        # boxes per image at other thresholds (the postprocessor's, restored afterwards)
        post = getattr(getattr(pl_module.model, "head", None), "postprocess", None)
        if post is None:
            return
        saved = (post.thresh, post.box_thresh)
        counts = {}
        try:
            for t in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
                post.thresh = post.box_thresh = t
                boxes, _ = pl_module.model.get_polygons_from_maps(batch, pred)
                counts[str(t)] = [len(b) for b in boxes]
        finally:
            post.thresh, post.box_thresh = saved
        rec.setdefault("boxes_at", []).append(counts)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if self.probe:
            self._probe("val", pl_module, batch)
        self._update("val", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0):
        self._update("test", pl_module, batch)

    def on_validation_end(self, trainer, pl_module):
        self.record["events"].append("validation_end")
        self._metrics("val", trainer)

    def on_test_end(self, trainer, pl_module):
        self.record["events"].append("test_end")
        self._metrics("test", trainer)

    def on_fit_end(self, trainer, pl_module):
        self.record["events"].append("fit_end")
        self._save()

    def on_exception(self, trainer, pl_module, exception):
        self.record["exception"] = "".join(
            traceback.format_exception(type(exception), exception, exception.__traceback__))
        self._save()
