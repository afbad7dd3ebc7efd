"""Check a preset or dataset config file before a run: ``validate --config FILE``.

Takes what the origin project's users have: a preset file (``# @package`` header included), a
``# @package _global_`` data config whose ``datasets.<name>.config`` nodes hold the preset keys,
or any YAML with such nodes. Hydra's ``_target_`` keys are read past; ``${...}`` interpolations
cannot be resolved without the whole tree and are reported as not checked. Findings are plain
data: ``problems`` (the run would fail or cache what it must not) and ``notes`` (settings that
do nothing or waste work).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diskcache_ocr.errors import PresetError
from diskcache_ocr.hydra import _package_header
from diskcache_ocr.presets import Preset, preset_keys, read_preset_file

# Problem codes: the preset cannot be loaded; a training dataset caches augmented output.
PROBLEM_CODES = ("invalid_preset", "unsafe_for_training", "no_presets")
_PRESET_MARKERS = ("cache_config", "preload_images", "preload_maps", "load_maps")
_DATASET_KEYS = ("image_path", "annotation_path")
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "defaults")
_INTERPOLATION = re.compile(r"\$\{.*\}")
_MAX_DEPTH = 8


@dataclass
class Finding:
    code: str
    node: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "node": self.node, "detail": self.detail}


def _strip_hydra(node: Mapping[str, Any], where: str, notes: list[Finding]) -> dict[str, Any]:
    """The node without Hydra's own keys, its sections likewise; an interpolated value is
    left out (and noted): it is resolved only inside the whole tree."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        key = str(key)
        if key in _HYDRA_KEYS:
            continue
        if isinstance(value, str) and _INTERPOLATION.search(value):
            if key in _DATASET_KEYS:
                continue  # (not a preset key: nothing here checks it)
            notes.append(Finding("not_resolved", where, f"{key}: {value} is an interpolation, "
                                 "resolved only by Hydra; not checked"))
            continue
        if isinstance(value, Mapping):
            value = _strip_hydra(value, f"{where}.{key}", notes)
        out[key] = value
    return out


def _preset_nodes(data: Any, path: str, depth: int = 0
                  ) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every mapping holding preset keys, with its dotted path."""
    if depth > _MAX_DEPTH or not isinstance(data, Mapping):
        return
    if any(k in data for k in _PRESET_MARKERS):
        yield path, data
        return
    for key, value in data.items():
        yield from _preset_nodes(value, f"{path}.{key}" if path else str(key), depth + 1)


def _is_training(node: str, config: Mapping[str, Any]) -> bool:
    """A training split's dataset, by its node's name, its split or its images directory."""
    return ("train_dataset" in node.split(".") or str(config.get("split", "")) == "train"
            or Path(str(config.get("image_path", ""))).name == "train")


def check_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every preset a config file sets. Returns ``ok`` (no problems), ``problems`` and
    ``notes`` (lists of ``{code, node, detail}``) and ``presets`` (node -> the kinds it
    caches, ``load_maps`` and all its ``settings``, for the nodes that load). An unreadable
    file raises :class:`PresetError`."""
    path = Path(path)
    data = read_preset_file(path)
    package = _package_header(path) or ""
    base = package.removeprefix("_global_").strip(".")
    problems: list[Finding] = []
    notes: list[Finding] = []
    presets: dict[str, Any] = {}
    nodes = list(_preset_nodes(data, base))
    if not nodes:
        problems.append(Finding("no_presets", base or "(top)",
                                "no preset keys (cache_config, preload_images, load_maps, "
                                "...) anywhere in the file" + (
                                    "; a primary config picks its preset in its defaults: "
                                    "check that preset file, or the data config"
                                    if "defaults" in data else "")))
    for node, raw in nodes:
        where = node or "(top)"
        config = _strip_hydra(raw, where, notes)
        # A node that is a dataset's config may hold other keys; a preset file may not.
        dataset_node = any(k in config for k in _DATASET_KEYS) or node != base
        keys = preset_keys(config) if dataset_node else config
        try:
            preset = Preset.from_dict(keys, name=path.stem)
        except PresetError as exc:
            problems.append(Finding("invalid_preset", where, str(exc)))
            continue
        presets[where] = {"caches": [k for k, on in (("images", preset.cache_images),
                                                      ("tensors", preset.cache_tensors),
                                                      ("maps", preset.cache_maps)) if on],
                          "load_maps": preset.load_maps, "settings": preset.to_dict()}
        if dataset_node:
            unknown = sorted(k for k in config if k not in keys and k.startswith(
                ("cache_", "preload_", "load_", "prenormalize")))
            for key in unknown:
                problems.append(Finding("invalid_preset", where,
                                        f"unknown key {key!r} (a misspelt preset key?)"))
        if not preset.safe_for_training and _is_training(where, config):
            problems.append(Finding(
                "unsafe_for_training", where,
                "a training dataset caches tensors or maps: every epoch would see the same "
                "augmented sample (the dataset refuses it unless its transform is "
                "deterministic); use balanced or minimal here"))
        if preset.cache_maps and not preset.load_maps:
            notes.append(Finding("maps_not_loaded", where, "cache_maps is on but load_maps is "
                                 "off: maps are built and stored but never read"))
        if preset.preload_maps and not preset.cache_maps:
            notes.append(Finding("no_effect", where,
                                 "preload_maps without cache_maps: nothing to preload"))
        for key, why in preset.no_effect().items():
            notes.append(Finding("no_effect", where, f"{key}: {why}"))
    return {"path": str(path), "package": package or None, "ok": not problems,
            "problems": [p.to_dict() for p in problems],
            "notes": [n.to_dict() for n in notes], "presets": presets}


__all__ = ["PROBLEM_CODES", "check_config_file"]
