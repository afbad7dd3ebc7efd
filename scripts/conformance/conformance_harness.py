"""Side-by-side runs of the origin project's dataset and this project's drop-in.

Everything of the origin is imported at run time from the checkout named by ``ORIGIN_SRC``
(it must be on ``sys.path`` with its pinned packages installed); nothing of it lives here.
Their Hydra tree (``configs/train.yaml``) is composed as their runner composes it, with
``dataset_base_path`` and the validation split's ``image_path`` pointed at our inputs and a
``data/performance_preset`` chosen; from it come their dataset, their ``val_transform``
(``hydra.utils.instantiate``) and their ``DBCollateFN``.

Ours is made three ways (``how``):

- ``hydra``: their ``datasets.val_dataset`` node with only ``_target_`` changed to
  ``diskcache_ocr.origin.ValidatedOCRDataset``, instantiated by Hydra (what a user does);
- ``hydra_none``: the same with ``transform: null`` (their ``DatasetConfig`` object, our
  built-in pipeline);
- ``node``: ``diskcache_ocr.origin.ValidatedOCRDataset(<their config node>, <the very transform
  object their dataset got>)``;
- ``builtin``: the config node with ``transform=None`` (our built-in origin pipeline);
- ``plain``: the config node as plain containers without ``_target_`` keys, ``transform=None``;
- ``compose``: that plain config and their val_transform's albumentations pieces (each made by
  ``instantiate``) and ``ToTensorV2`` in a plain ``A.Compose``;
- ``compose_lists``: the same with ``instantiate(..., _convert_="all")`` (plain lists, not
  OmegaConf containers, in the transforms' arguments).

:func:`compare_batches` lists every difference between two batches as :class:`Diff` rows.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRESETS = ("validation_optimized", "balanced", "minimal")
HOWS = ("hydra", "hydra_none", "node", "builtin", "plain", "compose", "compose_lists")
OUR_TARGET = "diskcache_ocr.origin.ValidatedOCRDataset"


def origin_src() -> Path:
    src = os.environ.get("ORIGIN_SRC")
    if not src:
        raise RuntimeError("ORIGIN_SRC is not set (a checkout of the origin project)")
    return Path(src)


def compose(root: str | Path, preset: str = "minimal"):
    """Their composed training config for inputs under ``root`` (``images/val``,
    ``jsons/val.json``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    root = Path(root)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(origin_src() / "configs"), version_base=None):
        return hydra_compose(config_name="train", overrides=[
            f"dataset_base_path={root}/",
            f"data/performance_preset={preset}",
            f"datasets.val_dataset.config.image_path={root / 'images' / 'val'}",
        ])


def origin_parts(cfg):
    """(their dataset, their val transform object, their collate) from their config."""
    from hydra.utils import instantiate

    dataset = instantiate(cfg.datasets.val_dataset)
    return dataset, dataset.transform, instantiate(cfg.collate_fn)


def our_dataset(cfg, how: str, transform: Any = None):
    """The drop-in, made ``how`` (see the module doc). The cache directory is
    ``$DISKCACHE_OCR_DIR`` (their DatasetConfig has no cache_dir)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if how in ("hydra", "hydra_none"):
        node = copy.deepcopy(cfg.datasets.val_dataset)
        OmegaConf.set_readonly(node, False)
        node._target_ = OUR_TARGET
        if how == "hydra_none":
            node.transform = None
        return instantiate(node)
    from diskcache_ocr.origin import ValidatedOCRDataset

    node = cfg.datasets.val_dataset.config
    if how == "node":
        return ValidatedOCRDataset(node, transform)
    if how == "builtin":
        return ValidatedOCRDataset(node, None)
    plain = plain_config(node)
    if how == "plain":
        return ValidatedOCRDataset(plain, None)
    if how == "compose":
        return ValidatedOCRDataset(plain, albumentations_compose(cfg))
    if how == "compose_lists":
        return ValidatedOCRDataset(plain, albumentations_compose(cfg, convert="all"))
    raise ValueError(f"how must be one of {HOWS}, got {how!r}")


def plain_config(node) -> dict[str, Any]:
    """Their config node resolved to plain containers, without Hydra's ``_target_`` keys."""
    from omegaconf import OmegaConf

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "_target_"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(OmegaConf.to_container(node, resolve=True))


def albumentations_compose(cfg, convert: str = "none"):
    """Their val_transform's albumentations pieces, instantiated by Hydra, then
    ``ToTensorV2``, in a plain ``A.Compose`` (the Compose their wrapper holds)."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2
    from hydra.utils import instantiate

    node = cfg.transforms.val_transform
    return A.Compose([*(instantiate(t, _convert_=convert) for t in node.transforms),
                      ToTensorV2()], keypoint_params=instantiate(node.keypoint_params))


def train_parts(root: str | Path, cfg):
    """Their training dataset node, pointed at a ``train`` split under ``root`` (made from
    the val inputs), built by Hydra: (theirs, ``make_ours(transform=True)``, which builds the
    node with only ``_target_`` changed, or with ``transform: null`` too)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(root)
    images, ann = root / "images" / "train", root / "jsons" / "train.json"
    if not images.exists():
        images.symlink_to(root / "images" / "val", target_is_directory=True)
        ann.write_bytes((root / "jsons" / "val.json").read_bytes())
    node = copy.deepcopy(cfg.datasets.train_dataset)
    OmegaConf.set_readonly(node, False)
    node.config.image_path = str(images)
    node.config.annotation_path = str(ann)
    theirs = instantiate(node)
    node._target_ = OUR_TARGET

    def make_ours(transform: bool = True):
        mine = copy.deepcopy(node)
        if not transform:
            mine.transform = None
        return instantiate(mine)

    return theirs, make_ours


def loader(dataset, collate, workers: int, batch_size: int = 4):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, persistent_workers=workers > 0)


# ---------------------------------------------------------------------------------------
# Per-sample view of a collated batch

SAMPLE_FIELDS = ("image_filename", "image_path", "raw_size", "orientation", "shape",
                 "canonical_size", "inverse_matrix", "polygons", "metadata")


def samples_of(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One dict per image of a collated batch (images and maps as numpy arrays)."""
    n = int(batch["images"].shape[0])
    for i in range(n):
        s: dict[str, Any] = {"image": _np(batch["images"][i])}
        for name in ("prob_maps", "thresh_maps"):
            if name in batch:
                s[name] = _np(batch[name][i])
        for name in SAMPLE_FIELDS:
            if name in batch:
                s[name] = batch[name][i]
        yield s


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def relative_path(value: Any, root: Path) -> Any:
    """A path under ``root`` as a root-relative POSIX string (for comparing and storing)."""
    if value is None:
        return None
    text = str(value)
    prefix = str(root).rstrip("/") + "/"
    return text[len(prefix):] if text.startswith(prefix) else text


def polygons_list(value: Any) -> list[np.ndarray]:
    return [np.asarray(p) if not isinstance(p, torch.Tensor) else _np(p) for p in (value or [])]


# ---------------------------------------------------------------------------------------
# Differences


@dataclass(frozen=True)
class Diff:
    image: str
    field: str
    origin: str
    ours: str

    def line(self) -> str:
        cells = [f"`{self.image}`", self.field, self.origin, self.ours]
        return "| " + " | ".join(" ".join(c.replace("|", "/").split()) for c in cells) + " |"


def _short(value: Any, limit: int = 140) -> str:
    if isinstance(value, np.ndarray):
        text = f"{value.dtype}{list(value.shape)} " + np.array2string(
            value.ravel()[:9], precision=6, separator=",")
    elif isinstance(value, torch.Tensor):
        return _short(_np(value), limit)
    else:
        text = f"{type(value).__name__} {value!r}"
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _array_diff(name: str, a: np.ndarray, b: np.ndarray) -> tuple[str, str] | None:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype}{list(a.shape)}", f"{b.dtype}{list(b.shape)}"
    if a.tobytes() == b.tobytes():
        return None
    diff = a.astype(np.float64) != b.astype(np.float64)
    n = int(diff.sum())
    if n == 0:  # equal values, different bits (-0.0, NaN payloads)
        return "same values", "different bits"
    mx = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return (f"sha {sha256(a)[:10]}",
            f"{n} of {a.size} elements differ (max abs {mx:.6g}), sha {sha256(b)[:10]}")


def compare_samples(o: dict[str, Any], u: dict[str, Any], root: Path) -> list[Diff]:
    """Every difference between the origin's sample ``o`` and ours ``u`` (one image)."""
    name = str(o.get("image_filename"))
    out: list[Diff] = []

    def add(field: str, a: Any, b: Any) -> None:
        out.append(Diff(name, field, a if isinstance(a, str) else _short(a),
                        b if isinstance(b, str) else _short(b)))

    for key in ("image", "prob_maps", "thresh_maps"):
        if key not in o or key not in u:
            if (key in o) != (key in u):
                add(key, "present" if key in o else "absent", "present" if key in u else "absent")
            continue
        d = _array_diff(key, o[key], u[key])
        if d:
            add(key, *d)
    for key in ("image_filename", "raw_size", "orientation", "shape", "canonical_size"):
        a, b = o.get(key, "<absent>"), u.get(key, "<absent>")
        if _plain(a) != _plain(b) or type(a) is not type(b):
            add(key, a, b)
    a, b = relative_path(o.get("image_path"), root), relative_path(u.get("image_path"), root)
    if a != b:
        add("image_path", a, b)
    # inverse matrix: type, dtype, values (compared in the origin's dtype)
    a, b = o.get("inverse_matrix"), u.get("inverse_matrix")
    if type(a) is not type(b):
        add("inverse_matrix type", type(a).__name__, type(b).__name__)
    if a is not None and b is not None:
        a, b = _np(a), _np(b)
        if a.dtype != b.dtype:
            add("inverse_matrix dtype", str(a.dtype), str(b.dtype))
        if a.shape != b.shape or not np.array_equal(a, b.astype(a.dtype)):
            add("inverse_matrix values", _short(a), _short(b))
    out.extend(_polygon_diffs(name, o.get("polygons"), u.get("polygons")))
    # metadata: keys and values
    ma, mb = o.get("metadata"), u.get("metadata")
    if type(ma) is not type(mb):
        add("metadata type", type(ma).__name__, type(mb).__name__)
    ma, mb = dict(ma or {}), dict(mb or {})
    if set(ma) != set(mb):
        add("metadata keys", f"missing in ours: {sorted(set(ma) - set(mb))}",
            f"extra in ours: {sorted(set(mb) - set(ma))}")
    for key in sorted(set(ma) & set(mb)):
        a, b = ma[key], mb[key]
        if key == "path":
            a, b = relative_path(a, root), relative_path(b, root)
        if key in KEPT_COUNTERS and b is None and (a is None or isinstance(a, int)):
            continue  # a difference kept on purpose (see KEPT_COUNTERS)
        if _plain(a) != _plain(b) or type(a) is not type(b):
            add(f"metadata[{key!r}]", a, b)
    return out


# The differences kept on purpose (docs/coming-from-the-origin.md), accepted in exactly these
# forms: the origin's metadata counters are its process's running counts of its in-memory
# cache, None in ours; with load_maps its items hold None maps (its collate makes them), ours
# hold the cached maps (equal to what its collate makes: the batches are compared too).
KEPT_COUNTERS = ("cache_hits", "cache_misses")
KEPT_ITEM_MAPS = ("prob_map", "thresh_map")


def _polygon_diffs(name: str, pa: Any, pb: Any) -> list[Diff]:
    """Polygons of one image: container, count, element types, dtypes, shapes, values (in
    the origin's dtype), one row each."""
    out: list[Diff] = []
    if type(pa) is not type(pb):
        out.append(Diff(name, "polygons container", type(pa).__name__, type(pb).__name__))
    la, lb = polygons_list(pa), polygons_list(pb)
    if len(la) != len(lb):
        out.append(Diff(name, "polygons count", str(len(la)), str(len(lb))))
    if not la and not lb:
        return out
    ta = sorted({type(p).__name__ for p in (pa or [])})
    tb = sorted({type(p).__name__ for p in (pb or [])})
    if ta != tb:
        out.append(Diff(name, "polygons element type", str(ta), str(tb)))
    da, db = sorted({str(p.dtype) for p in la}), sorted({str(p.dtype) for p in lb})
    if da != db:
        out.append(Diff(name, "polygons dtype", str(da), str(db)))
    sa = [tuple(p.shape) for p in la]
    sb = [tuple(p.shape) for p in lb]
    if sa != sb:
        k = _first_difference(sa, sb)
        out.append(Diff(name, "polygons shapes", f"#{k}: {sa[k] if k < len(sa) else '-'}",
                        f"#{k}: {sb[k] if k < len(sb) else '-'}"))
    bad = [i for i, (x, y) in enumerate(zip(la, lb, strict=False))
           if x.shape != y.shape or not np.array_equal(x, y.astype(x.dtype))]
    if bad:
        i = bad[0]
        x, y = la[i], lb[i]
        mx = (float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
              if x.shape == y.shape else float("nan"))
        out.append(Diff(name, "polygons values",
                        f"{len(bad)} of {len(la)} differ; #{i}: {_short(x, 90)}",
                        f"max abs diff {mx:.4g}; #{i}: {_short(y, 90)}"))
    return out


def _first_difference(a: list[Any], b: list[Any]) -> int:
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _np(v).tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def compare_runs(origin: list[dict[str, Any]], ours: Iterable[dict[str, Any]], root: Path,
                 origin_keys: Iterable[str] = (), our_keys: Iterable[str] | None = ()
                 ) -> list[Diff]:
    """Differences between two epochs, each per-image samples in batch order. ``ours`` may be
    a loader's :func:`stream` (its batch keys are then collected as it goes: pass
    ``our_keys=None``), so only the origin's epoch is held in memory."""
    out: list[Diff] = []
    by_name = {str(s.get("image_filename")): s for s in origin}
    seen_keys: set[str] = set()
    nb: list[str] = []
    for u in ours:
        seen_keys |= u.pop("_batch_keys", set())
        name = str(u.get("image_filename"))
        nb.append(name)
        s = by_name.get(name)
        if s is None:
            out.append(Diff(name, "sample", "absent", "present"))
            continue
        out.extend(compare_samples(s, u, root))
    ok = set(origin_keys)
    uk = seen_keys if our_keys is None else set(our_keys)
    if ok != uk:
        out.insert(0, Diff("*", "batch keys", f"missing in ours: {sorted(ok - uk)}",
                           f"extra in ours: {sorted(uk - ok)}"))
    na = [str(s.get("image_filename")) for s in origin]
    for name in na:
        if name not in nb:
            out.append(Diff(name, "sample", "present", "absent"))
    if na != nb:
        first = _first_difference(na, nb)
        out.insert(0, Diff("*", "order", f"{len(na)} images, #{first}: "
                           f"{na[first] if first < len(na) else '-'} (JSON order)",
                           f"{len(nb)} images, #{first}: {nb[first] if first < len(nb) else '-'}"))
    return out


def stream(dl) -> Iterator[dict[str, Any]]:
    """A loader's per-image samples as they come; each carries its batch's keys in
    ``_batch_keys``."""
    for batch in dl:
        keys = set(batch)
        for s in samples_of(batch):
            s["_batch_keys"] = keys
            yield s


def epoch(dl) -> tuple[list[dict[str, Any]], set[str]]:
    """One epoch of a loader as per-image samples, and the batch keys seen."""
    samples: list[dict[str, Any]] = []
    keys: set[str] = set()
    for batch in dl:
        keys |= set(batch)
        samples.extend(samples_of(batch))
    return samples, keys


# ---------------------------------------------------------------------------------------
# The dataset object: what the origin's evaluation and callbacks read from it


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


DATASET_ATTRIBUTES = ("image_path", "config.image_path", "config.load_maps",
                      "config.preload_images", "config.cache_config.cache_transformed_tensors",
                      "config.cache_config.cache_images", "config.cache_config.cache_maps")


def compare_datasets(o_ds, u_ds, root: Path, items: bool = True) -> list[Diff]:
    """``len``, ``anns`` (order, each value's type, dtype and points), the attributes their
    Lightning module, evaluator and callbacks read, and each item's keys and value types."""
    out: list[Diff] = []
    if len(o_ds) != len(u_ds):
        out.append(Diff("*", "len(dataset)", str(len(o_ds)), str(len(u_ds))))
    for attr in DATASET_ATTRIBUTES:
        a = _get(o_ds, attr)
        try:
            b = _get(u_ds, attr)
        except AttributeError as exc:
            out.append(Diff("*", f"dataset.{attr}", _short(a), f"AttributeError: {exc}"))
            continue
        if attr.endswith("image_path"):
            a, b = relative_path(a, root), relative_path(b, root)
        if a != b:
            out.append(Diff("*", f"dataset.{attr}", _short(a), _short(b)))
    anns_a = o_ds.anns
    anns_b = getattr(u_ds, "anns", None)
    if anns_b is None:
        out.append(Diff("*", "dataset.anns", f"{type(anns_a).__name__} of {len(anns_a)}",
                        "absent"))
    else:
        # (ours may be a subclass: an OrderedDict that builds each image's arrays on access)
        if not isinstance(anns_b, type(anns_a)) or type(anns_a).__name__ != type(anns_b).__name__:
            out.append(Diff("*", "dataset.anns type", type(anns_a).__name__,
                            type(anns_b).__name__))
        if list(anns_a) != list(anns_b):
            out.append(Diff("*", "dataset.anns keys (order)", str(list(anns_a)[:4]) + "...",
                            str(list(anns_b)[:4]) + "..."))
        for name, polys in anns_a.items():
            mine = anns_b.get(name, "<absent>") if hasattr(anns_b, "get") else "<no get>"
            if polys is None or mine is None or isinstance(mine, str):
                if not (polys is None and mine is None):
                    out.append(Diff(name, "dataset.anns[name]", _short(polys), _short(mine)))
                continue
            out.extend(Diff(d.image, "dataset.anns[name] " + d.field.replace("polygons ", ""),
                            d.origin, d.ours) for d in _polygon_diffs(name, polys, mine))
    if items:  # matched by file name (the orders are compared elsewhere)
        mine = {}
        for j in range(len(u_ds)):
            b = u_ds[j]
            mine[str((b.get("metadata") or {}).get("filename", j))] = b
        for i in range(len(o_ds)):
            a = o_ds[i]
            name = str(a.get("metadata", {}).get("filename", i))
            b = mine.get(name)
            if b is None:
                out.append(Diff(name, "item", "present", "absent"))
                continue
            if list(a) != list(b):
                out.append(Diff(name, "item keys", str(list(a)), str(list(b))))
            out.extend(Diff(d.image, "item " + d.field, d.origin, d.ours)
                       for d in _polygon_diffs(name, a.get("polygons"), b.get("polygons")))
            for key in set(a) & set(b):
                if key in KEPT_ITEM_MAPS and a[key] is None and isinstance(b[key], np.ndarray):
                    continue  # a difference kept on purpose (see KEPT_ITEM_MAPS)
                if type(a[key]) is not type(b[key]):
                    out.append(Diff(name, f"item[{key!r}] type", type(a[key]).__name__,
                                    type(b[key]).__name__))
    return out
