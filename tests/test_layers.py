"""Imports point down only (docs/architecture.md): each module may import modules of a lower
layer, never its own layer's neighbours above it or anything higher."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diskcache_ocr"

# Higher imports lower. A package (store/, ocr/) is one room.
LAYER = {
    "errors": 0, "_version": 0,
    "keys": 1, "paths": 1, "codec": 1, "batchmem": 1, "synth": 1,
    "schema": 2,
    "store": 3, "ocr": 3, "presets": 3,
    "samples": 4, "hydra": 4, "cluster": 4, "work": 4,
    "staged_samples": 5, "configcheck": 5, "hydra_app": 5, "build": 5,
    "pipelines": 5.5,
    "readthrough": 6,
    "engine_setup": 6.5,  # (between the engine and the faces that make it)
    "dataset": 7, "ops": 7, "watch": 7,
    "loader": 8, "prebuild": 8, "origin": 8, "lightning": 8,
    "demo": 9,
    "cli": 10,
}


def room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "diskcache_ocr" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYER else None


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "diskcache_ocr":  # from diskcache_ocr import batchmem
                out |= {f"diskcache_ocr.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                 or p.parent != PACKAGE)


def test_every_module_has_a_layer():
    rooms = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert rooms - {"preset_files"} <= set(LAYER), sorted(rooms - set(LAYER))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if me not in LAYER:
        pytest.skip(f"{me} holds data files only")
    up = sorted(m for m in imports(path)
                if (r := room(m)) is not None and r != me and LAYER[r] >= LAYER[me])
    assert not up, f"{me} (layer {LAYER[me]}) imports {up}"
