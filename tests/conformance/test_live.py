"""The origin's dataset, val transform and ``DBCollateFN`` beside the drop-in, batch by batch.

For each preset, worker count and way of making ours (see ``conformance_harness``), every
field of every batch of ours (cold, second epoch, a new dataset object over the warm cache)
must equal the origin's; the dataset object must offer what their evaluator, Lightning module
and callbacks read. A failure lists each difference: image, field, origin's value, ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

if not os.environ.get("ORIGIN_SRC"):
    pytest.skip("ORIGIN_SRC does not name a checkout of the origin project",
                allow_module_level=True)

import conformance_data  # noqa: E402
import conformance_harness as H  # noqa: E402
import write_figures  # noqa: E402

WORKERS = (0, 2)
PHASES = ("cold", "warm", "new object")
FIGURES = Path(__file__).resolve().parents[1] / "data" / "origin-conformance"


def _table(diffs: list[H.Diff], limit: int = 60) -> str:
    rows = [d.line() for d in diffs[:limit]]
    more = f"\n... and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "\n| image | field | origin | ours |\n" + "\n".join(rows) + more


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conformance-inputs")
    conformance_data.generate(root)
    return root


_ORIGIN: dict = {}  # the latest (preset, workers) only: an epoch is ~300 MB
_OURS: dict = {}  # (preset, workers, how) -> the differences of each phase, and the dataset


def origin_run(root: Path, preset: str, workers: int):
    key = (preset, workers)
    if key not in _ORIGIN:
        _ORIGIN.clear()
        cfg = H.compose(root, preset)
        ds, tf, collate = H.origin_parts(cfg)
        dl = H.loader(ds, collate, workers)
        first, keys = H.epoch(dl)
        second, _ = H.epoch(dl)
        _ORIGIN[key] = {"cfg": cfg, "dataset": ds, "transform": tf, "collate": collate,
                        "epochs": (first, second), "keys": keys}
    return _ORIGIN[key]


def our_run(root: Path, preset: str, workers: int, how: str, cache: Path):
    key = (preset, workers, how)
    if key not in _OURS:
        o = origin_run(root, preset, workers)
        first, second = o["epochs"]
        os.environ["DISKCACHE_OCR_DIR"] = str(cache)
        ds = H.our_dataset(o["cfg"], how, o["transform"])
        dl = H.loader(ds, o["collate"], workers)
        diffs = {"cold": H.compare_runs(first, H.stream(dl), root, o["keys"], None),
                 "warm": H.compare_runs(second, H.stream(dl), root, o["keys"], None)}
        del dl
        fresh = H.loader(H.our_dataset(o["cfg"], how, o["transform"]), o["collate"], workers)
        diffs["new object"] = H.compare_runs(first, H.stream(fresh), root, o["keys"], None)
        _OURS[key] = {"dataset": ds if workers == 0 else None, "diffs": diffs}
    return _OURS[key]


# preset and workers outermost: the origin's epochs are made once per pair
CASES = [pytest.param(p, w, h, ph, id=f"{p}-w{w}-{h}-{ph}")
         for p in H.PRESETS for w in WORKERS for h in H.HOWS for ph in PHASES]


@pytest.mark.parametrize(("preset", "workers", "how", "phase"), CASES)
def test_batches_match_the_origin(inputs, tmp_path_factory, preset, workers, how, phase):
    u = our_run(inputs, preset, workers, how,
                tmp_path_factory.mktemp(f"cache-{preset}-{workers}-{how}"))
    diffs = u["diffs"][phase]
    assert not diffs, f"{len(diffs)} differences" + _table(diffs)


@pytest.mark.parametrize("how", H.HOWS)
@pytest.mark.parametrize("preset", H.PRESETS)
def test_dataset_object_matches_the_origin(inputs, tmp_path_factory, preset, how):
    o = origin_run(inputs, preset, 0)
    u = our_run(inputs, preset, 0, how, tmp_path_factory.mktemp(f"cache-{preset}-0-{how}"))
    diffs = H.compare_datasets(o["dataset"], u["dataset"], inputs)
    assert not diffs, f"{len(diffs)} differences" + _table(diffs)


@pytest.mark.parametrize("transform", [True, False], ids=["their-transform", "transform-null"])
def test_their_train_node_builds_ours(inputs, transform):
    """Their training split's node with only ``_target_`` changed (or ``transform: null`` too)
    builds ours, which offers what theirs offers (items not compared: their train transform
    is random)."""
    theirs, make_ours = H.train_parts(inputs, H.compose(inputs, "minimal"))
    diffs = H.compare_datasets(theirs, make_ours(transform), inputs, items=False)
    assert not diffs, f"{len(diffs)} differences" + _table(diffs)


def test_origin_is_deterministic_across_epochs_and_workers(inputs):
    """The judge itself: the same batches in both epochs and with 0 or 2 workers."""
    base = origin_run(inputs, "minimal", 0)["epochs"][0]
    for preset in H.PRESETS:
        for workers in WORKERS:
            for epoch in origin_run(inputs, preset, workers)["epochs"]:
                diffs = [d for d in H.compare_runs(base, epoch, inputs)
                         if not d.field.startswith("metadata")]
                assert not diffs, f"{preset} w{workers}" + _table(diffs)


def test_committed_figures_are_the_origins_output(tmp_path):
    """tests/data/origin-conformance holds what the origin's code produces on its inputs now
    (the CI test trusts them)."""
    out = tmp_path / "figures"
    out.mkdir()
    (out / "inputs").symlink_to(FIGURES / "inputs")
    assert write_figures.main([str(out)]) == 0
    fresh = json.loads((out / "figures.json").read_text())
    committed = json.loads((FIGURES / "figures.json").read_text())
    assert fresh["versions"] == committed["versions"], "other versions: regenerate the figures"
    for key in ("samples", "anns", "presets", "anns_type", "counters"):
        assert fresh[key] == committed[key], key


def test_committed_inputs_are_the_generators(tmp_path):
    root = tmp_path / "gen"
    conformance_data.generate(root)
    for path in sorted((FIGURES / "inputs").rglob("*")):
        if path.is_file():
            rel = path.relative_to(FIGURES / "inputs")
            assert (root / rel).read_bytes() == path.read_bytes(), rel
