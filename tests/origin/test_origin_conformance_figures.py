"""The drop-in against what the origin project's own pipeline produced on the same inputs.

``tests/data/origin-conformance`` holds inputs and the figures the origin's dataset, val
transform and collate produced on them (see its README; made by
``scripts/conformance/write_figures.py``). Here ``diskcache_ocr.origin.ValidatedOCRDataset``
reads the same inputs with the same dataset config (per preset, ``transform=None``: the
built-in origin pipeline), once cold and once warm from the cache it wrote, and every field is
compared with the figures: one test per (image, field group). The two differences kept on
purpose (the origin's per-process counters in the metadata, the cached maps in the items) are
asserted as such.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diskcache_ocr.origin import ValidatedOCRDataset

FIG_DIR = Path(__file__).parents[1] / "data" / "origin-conformance"
INPUTS = FIG_DIR / "inputs"
FIG = json.loads((FIG_DIR / "figures.json").read_text())
SAMPLES: dict[str, dict[str, Any]] = FIG["samples"]
ORDER: list[str] = FIG["presets"]["minimal"]["order"]
COUNTERS = tuple(FIG["counters"])
# Presets whose items carry maps (theirs: made by their collate from the item's polygons).
MAP_PRESETS = ("validation_optimized",)
CORE_PRESETS = ("validation_optimized", "balanced")

# --- what the current code gets wrong (remove an entry when its fix lands) -------------------


def _xfail(group: str, name: str, preset: str) -> str | None:
    """Why (image, field group, preset) is expected to fail on the current code, or None:
    nothing is (the differences kept on purpose are asserted as such below)."""
    return None


def _cases(group: str, presets: tuple[str, ...]) -> list[Any]:
    out = []
    for preset in presets:
        for name in ORDER:
            why = _xfail(group, name, preset)
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            out.append(pytest.param(preset, name, marks=marks, id=f"{preset}-{name}"))
    return out


# --- our side ---------------------------------------------------------------------------------


def _config(preset: str, cache_dir: Path) -> dict[str, Any]:
    config = copy.deepcopy(FIG["presets"][preset]["config"])
    config["image_path"] = str(INPUTS / config["image_path"])
    config["annotation_path"] = str(INPUTS / config["annotation_path"])
    config["cache_dir"] = str(cache_dir)
    return config


def their_val_compose():
    """The albumentations steps of the origin's val transform as its config
    (``configs/transforms/base.yaml``) describes them, in a plain Compose (their wrapper adds
    ``ToTensorV2``, which needs torchvision: the image comes back HWC here)."""
    import albumentations as A

    return A.Compose([A.LongestMaxSize(max_size=640, interpolation=1, p=1.0),
                      A.PadIfNeeded(min_width=640, min_height=640, border_mode=0, p=1.0),
                      A.Normalize(mean=[0.5602] * 3, std=[0.2539] * 3)],
                     keypoint_params=A.KeypointParams(format="xy", remove_invisible=True))


class Ours:
    """Our dataset for one preset (and ``transform``: None, our built-in origin pipeline, or
    ``"compose"``, :func:`their_val_compose`): every item read cold, then warm by a new
    dataset object over the cache the first one wrote."""

    def __init__(self, preset: str, cache_dir: Path, transform: str | None = None) -> None:
        self.config = _config(preset, cache_dir)

        def make():
            return ValidatedOCRDataset(self.config,
                                       their_val_compose() if transform == "compose" else None)

        self.dataset = make()
        self.cold = [self.dataset[i] for i in range(len(self.dataset))]
        again = make()
        self.warm = [again[i] for i in range(len(again))]

    def order(self) -> list[str]:
        return [_filename(item) for item in self.cold]

    def by_name(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """(``cold`` / ``warm``, item) for the image."""
        out = []
        for label, items in (("cold", self.cold), ("warm", self.warm)):
            found = [it for it in items if _filename(it) == name]
            assert len(found) == 1, f"{label}: {len(found)} items named {name}"
            out.append((label, found[0]))
        return out


def _filename(item: dict[str, Any]) -> str:
    return str((item.get("metadata") or {}).get("filename") or item.get("image_filename"))


_OURS: dict[str, Ours | Exception] = {}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    def get(preset: str, transform: str | None = None) -> Ours:
        key = f"{preset}-{transform}"
        if key not in _OURS:
            try:
                _OURS[key] = Ours(preset, tmp_path_factory.mktemp(f"cache-{key}"), transform)
            except Exception as exc:  # every case of this dataset fails the same way
                _OURS[key] = exc
        if isinstance(_OURS[key], Exception):
            raise _OURS[key]
        return _OURS[key]

    yield get
    _OURS.clear()


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _array_figure(a: np.ndarray, fig: dict[str, Any], label: str, what: str) -> None:
    assert str(a.dtype) == fig["dtype"], f"{label} {what} dtype"
    assert a.size == int(np.prod(fig["shape"])), f"{label} {what} size {a.shape}"
    if _sha(a) != fig["sha256"]:
        detail = ""
        with np.load(FIG_DIR / "arrays.npz") as full:
            if what in full.files:
                ref = full[what].reshape(a.shape)
                detail = f": {int((ref != a).sum())} of {a.size} elements differ"
        raise AssertionError(f"{label} {what} differs from the origin's{detail}")


def _polygon_figure(polys: Any, fig: dict[str, Any], label: str) -> None:
    """Count, shapes and points (ours compared in the origin's dtype)."""
    arrays = [_np(p) for p in (polys or [])]
    assert len(arrays) == fig["count"], f"{label}: polygon count"
    assert [list(p.shape) for p in arrays] == fig["shapes"], f"{label}: polygon shapes"
    for k, (p, pts) in enumerate(zip(arrays, fig["points"])):
        ref = np.asarray(pts, dtype=fig["dtypes"][0])
        got = p.ravel().astype(ref.dtype)
        assert np.array_equal(got, ref), (
            f"{label}: polygon {k} points {got.tolist()} vs the origin's {ref.tolist()}")


def _polygon_dtype_figure(polys: Any, fig: dict[str, Any], label: str) -> None:
    polys = list(polys or [])
    assert sorted({type(p).__name__ for p in polys}) == fig["types"], f"{label}: element types"
    assert sorted({str(_np(p).dtype) for p in polys}) == fig["dtypes"], f"{label}: dtype"


def _relative(path: Any) -> str:
    text, prefix = str(path), str(INPUTS) + "/"
    return text[len(prefix):] if text.startswith(prefix) else text


def _jsonish(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonish(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- one test per (image, field group) ----------------------------------------------------------


@pytest.mark.parametrize(("preset", "name"), _cases("image", CORE_PRESETS))
def test_image(ours, preset, name):
    fig = SAMPLES[name]["image"]
    for label, item in ours(preset).by_name(name):
        _array_figure(_np(item["image"]), fig, label, f"{Path(name).stem}.image")


@pytest.mark.parametrize(("preset", "name"), _cases("maps", MAP_PRESETS))
def test_maps(ours, preset, name):
    for label, item in ours(preset).by_name(name):
        for key, fig_key in (("prob_map", "prob_maps"), ("thresh_map", "thresh_maps")):
            assert item.get(key) is not None, f"{label}: no {key} with {preset}"
            _array_figure(_np(item[key]), SAMPLES[name][fig_key], label,
                          f"{Path(name).stem}.{fig_key}")


@pytest.mark.parametrize(("preset", "name"), _cases("polygons", CORE_PRESETS))
def test_polygons(ours, preset, name):
    for label, item in ours(preset).by_name(name):
        _polygon_figure(item.get("polygons"), SAMPLES[name]["item_polygons"], label)


@pytest.mark.parametrize(("preset", "name"), _cases("polygons_dtype", CORE_PRESETS))
def test_polygons_dtype(ours, preset, name):
    for label, item in ours(preset).by_name(name):
        _polygon_dtype_figure(item.get("polygons"), SAMPLES[name]["item_polygons"], label)


@pytest.mark.parametrize(("preset", "name"), _cases("inverse_matrix", CORE_PRESETS))
def test_inverse_matrix(ours, preset, name):
    """Values, ours compared in the origin's dtype."""
    fig = SAMPLES[name]["inverse_matrix"]
    ref = np.asarray(fig["values"], dtype=fig["dtype"]).reshape(3, 3)
    for label, item in ours(preset).by_name(name):
        m = _np(item["inverse_matrix"])
        assert m.shape == (3, 3), f"{label}: shape {m.shape}"
        assert np.array_equal(m.astype(ref.dtype), ref), (
            f"{label}: {m.tolist()} vs the origin's {ref.tolist()}")


@pytest.mark.parametrize(("preset", "name"), _cases("inverse_matrix_dtype", CORE_PRESETS))
def test_inverse_matrix_dtype(ours, preset, name):
    fig = SAMPLES[name]["inverse_matrix"]
    for label, item in ours(preset).by_name(name):
        m = item["inverse_matrix"]
        assert type(m).__name__ == fig["type"], f"{label}: type"
        assert str(_np(m).dtype) == fig["dtype"], f"{label}: dtype {_np(m).dtype}"


@pytest.mark.parametrize(("preset", "name"), _cases("metadata", CORE_PRESETS))
def test_metadata(ours, preset, name):
    fig, types = SAMPLES[name]["metadata"], SAMPLES[name]["metadata_types"]
    for label, item in ours(preset).by_name(name):
        meta = dict(item["metadata"])
        got = {k: v for k, v in meta.items() if k not in COUNTERS}
        assert sorted(got) == sorted(fig), f"{label}: metadata keys"
        for key, value in got.items():
            if key == "path":
                value = _relative(value)
            assert type(value).__name__ == types[key], f"{label}: metadata[{key!r}] type"
            assert _jsonish(value) == fig[key], f"{label}: metadata[{key!r}]"


@pytest.mark.parametrize(("preset", "name"), _cases("counters", tuple(FIG["presets"])))
def test_metadata_counters(ours, preset, name):
    """Their in-memory caches' counters: the keys are there; where theirs are ints (their
    tensor caching: their process's running counts) ours are None, a difference kept on
    purpose (docs/coming-from-the-origin.md); elsewhere both are None."""
    fig = FIG["presets"][preset]["metadata_counters"][name]
    for label, item in ours(preset).by_name(name):
        meta = dict(item["metadata"])
        for key in COUNTERS:
            assert key in meta, f"{label}: metadata has no {key!r}"
            assert meta[key] is None, f"{label}: metadata[{key!r}]"
            assert fig[key][1] in ("int", "NoneType"), f"{label}: their {key!r} type"


@pytest.mark.parametrize("name", ORDER)
def test_their_compose(ours, name):
    """Their val transform's steps passed as a Compose (validation_optimized): image (as
    CHW), maps, polygons and inverse matrix values as the origin's."""
    fig = SAMPLES[name]
    for label, item in ours("validation_optimized", "compose").by_name(name):
        stem = Path(name).stem
        image = _np(item["image"])
        if image.ndim == 3 and image.shape[-1] == 3:
            image = np.ascontiguousarray(image.transpose(2, 0, 1))
        _array_figure(image, fig["image"], label, f"{stem}.image")
        for key, fig_key in (("prob_map", "prob_maps"), ("thresh_map", "thresh_maps")):
            _array_figure(_np(item[key]), fig[fig_key], label, f"{stem}.{fig_key}")
        _polygon_figure(item.get("polygons"), fig["item_polygons"], label)
        ref = np.asarray(fig["inverse_matrix"]["values"], np.float32).reshape(3, 3)
        assert np.array_equal(_np(item["inverse_matrix"]).astype(np.float32), ref), label


# --- the dataset as a whole ---------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(FIG["presets"]))
def test_order(ours, preset):
    assert ours(preset).order() == FIG["presets"][preset]["order"]


@pytest.mark.parametrize("preset", list(FIG["presets"]))
def test_item_keys(ours, preset):
    """Their item's keys, in order, and types; with ``load_maps`` ours carry the cached maps
    where theirs carry None (their collate then makes the same maps): a difference kept on
    purpose (docs/coming-from-the-origin.md)."""
    fig = FIG["presets"][preset]
    loads_maps = bool(fig["config"].get("load_maps"))
    want = dict(fig["item_types"])
    if loads_maps:
        want.update(prob_map="ndarray", thresh_map="ndarray")
    for label, items in (("cold", ours(preset).cold), ("warm", ours(preset).warm)):
        for item in items:
            assert list(item) == fig["item_keys"], f"{label} {_filename(item)}: item keys"
            assert {k: type(v).__name__ for k, v in item.items()} == want


def test_anns(ours):
    anns = ours("minimal").dataset.anns
    assert type(anns).__name__ == FIG["anns_type"]
    assert isinstance(anns, OrderedDict) or FIG["anns_type"] != "OrderedDict"
    assert list(anns) == list(FIG["anns"])
    for name, fig in FIG["anns"].items():
        value = anns[name]
        if fig is None:
            assert value is None, name
            continue
        assert sorted({str(p.dtype) for p in value}) == fig["dtypes"], name
        assert [list(p.shape) for p in value] == fig["shapes"], name
        assert [p.ravel().tolist() for p in value] == fig["points"], name


def test_config_with_hydra_targets(tmp_path):
    """Their tree's config node holds ``_target_`` entries for its nested config classes."""
    config = _config("minimal", tmp_path)
    config["_target_"] = "ocr.datasets.schemas.DatasetConfig"
    config["cache_config"] = {"_target_": "ocr.datasets.schemas.CacheConfig",
                              **config["cache_config"]}
    ds = ValidatedOCRDataset(config, None)
    assert len(ds) == len(ORDER)


def test_figures_cover_the_inputs():
    """Every input image has figures, in every preset, and the full arrays are there."""
    names = sorted(p.name for p in (INPUTS / "images" / "val").iterdir())
    assert sorted(SAMPLES) == names
    for preset in FIG["presets"].values():
        assert sorted(preset["order"]) == names
    with np.load(FIG_DIR / "arrays.npz") as full:
        for key in full.files:
            stem, field = key.split(".")
            name = next(n for n in SAMPLES if Path(n).stem == stem)
            assert _sha(full[key]) == SAMPLES[name][field]["sha256"], key
