"""The origin project's own ``runners/train.py``, run with its dataset class and with ours.

The origin project (AIBootcamp13/upstageailab-ocr-recsys-competition-ocr-2) trains with
``runners/train.py`` through its Hydra tree. Setting the ``_target_`` of its evaluated
datasets (val, test; and then train too) to ``diskcache_ocr.origin.ValidatedOCRDataset`` must
change nothing its evaluation sees: the same images, in the same order, with the same ground
truth, the same predictions, and the same logged metrics on the same data and seed. Their code
and callbacks run as they are; a recording callback is added by a Hydra override
(``scripts/conformance/train_run/origin_capture.py``).

Skipped unless ``ORIGIN_SRC`` names a checkout of the origin project. Runs under a Python with
the origin's pins (``ORIGIN_PYTHON``, else this interpreter), e.g.::

    ORIGIN_SRC=/path/to/origin PYTHONPATH=$PWD:/path/to/stubs:/path/to/origin \\
        /path/to/origin-venv/bin/python -m pytest -q tests/conformance/test_origin_train_run.py

train.py runs with the ``diskcache_ocr`` this test imports (the tree first on ``PYTHONPATH``),
DataLoaders with ``ORIGIN_TRAIN_WORKERS`` workers (default 0) for both variants. Each run takes
a few minutes on a CPU (fast_dev_run: one batch of 8 per stage);
``scripts/conformance/train_run/compare.py`` prints where two recorded runs differ.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from testkit import load_script

ORIGIN_SRC = os.environ.get("ORIGIN_SRC")
pytestmark = [pytest.mark.skipif(not ORIGIN_SRC, reason="set ORIGIN_SRC to a checkout of the "
                                 "origin project (and run under its venv)"),
              # a train.py run takes minutes on a CPU; fixtures run one per variant
              pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "scripts" / "conformance" / "train_run"
FIGURES = ROOT / "tests" / "data" / "origin-train-run" / "figures.json"
VAL_JSON = ROOT / "tests" / "data" / "origin-train-run" / "val.json"
STAGES = ("val", "test")
WORKERS = int(os.environ.get("ORIGIN_TRAIN_WORKERS", "0"))
# The model settings of the recorded run (postprocess thresholds at which the barely trained
# model finds boxes, so that the scores depend on the ground truth and the inverse matrices).
MODEL_OVERRIDES = tuple(o for o in json.loads(FIGURES.read_text())["overrides"]
                        if o.startswith("model.component_overrides."))


def _load(name: str) -> Any:
    return load_script(HARNESS / f"{name}.py", f"origin_train_{name}")


@pytest.fixture(scope="module")
def harness() -> Any:
    return _load("run_origin_train")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dataset = _load("dataset")
    return dataset.make_dataset(tmp_path_factory.mktemp("origin-train-data"),
                                val_annotations=VAL_JSON)


def _our_root() -> Path:
    """The tree whose ``diskcache_ocr`` this test imports (train.py runs that one)."""
    spec = importlib.util.find_spec("diskcache_ocr")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).resolve().parents[1]


def _run(harness: Any, data_root: Path, work: Path, ours: tuple[str, ...]) -> dict[str, Any]:
    python = os.environ.get("ORIGIN_PYTHON") or sys.executable
    return harness.run(ORIGIN_SRC, data_root, work, ours=ours, python=python,
                       our_root=_our_root(), workers=WORKERS, extra=MODEL_OVERRIDES)


@pytest.fixture(scope="module")
def theirs(harness: Any, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    res = _run(harness, data_root, tmp_path_factory.mktemp("theirs"), ())
    assert res["rc"] == 0, "the origin's own run failed:\n" + res["output"][-6000:]
    assert res["capture"] is not None
    return res


@pytest.fixture(scope="module", params=[("val", "test"), ("train", "val", "test")],
            ids=["ours-val-test", "ours-all"])
def ours(request: pytest.FixtureRequest, harness: Any, data_root: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(harness, data_root, tmp_path_factory.mktemp("-".join(request.param)),
                request.param)


def _tail(res: dict) -> str:
    return "\n--- train.py output (tail) ---\n" + res["output"][-6000:]


def _stage(res: dict, stage: str) -> dict:
    capture = res["capture"]
    assert capture is not None, "no capture was written" + _tail(res)
    assert stage in capture["stages"], f"the {stage} stage never ran" + _tail(res)
    rec = capture["stages"][stage]
    assert rec["evaluator"] is not None, f"no {stage} evaluator state" + _tail(res)
    return rec


def _files(res: dict, stage: str) -> dict:
    return _stage(res, stage)["evaluator"]["files"]


# -- the run itself -----------------------------------------------------------------------
def test_their_run_evaluates_every_image(theirs: dict) -> None:
    for stage in STAGES:
        ev = _stage(theirs, stage)["evaluator"]
        assert len(ev["processed_filenames"]) == 8
        assert not theirs["no_predictions"]
    boxes = [f["pred_boxes"] for f in _stage(theirs, "val")["evaluator"]["files"].values()]
    assert sum(boxes) > 0, "the model made no boxes; the scores would not depend on the data"


def test_exits_zero(ours: dict) -> None:
    assert ours["rc"] == 0, f"train.py exited {ours['rc']}" + _tail(ours)


def test_no_missing_predictions_message(ours: dict) -> None:
    for stage in STAGES:
        _stage(ours, stage)  # the run reached the evaluation
    assert ours["no_predictions"] == [], (
        f"'No {ours['no_predictions']} predictions found' was logged" + _tail(ours))


# -- what the evaluation receives ---------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_same_files_in_same_order(theirs: dict, ours: dict, stage: str) -> None:
    mine, ref = _stage(ours, stage), _stage(theirs, stage)
    assert mine["evaluator"]["filenames_to_check"] == ref["evaluator"]["filenames_to_check"]
    assert mine["evaluator"]["processed_filenames"] == ref["evaluator"]["processed_filenames"]
    assert ([b["image_filename"] for b in mine["batches"]]
            == [b["image_filename"] for b in ref["batches"]])
    assert mine["dataset"]["len"] == ref["dataset"]["len"]


@pytest.mark.parametrize("stage", STAGES)
def test_same_ground_truth(theirs: dict, ours: dict, stage: str) -> None:
    mine, ref = _files(ours, stage), _files(theirs, stage)
    assert sorted(mine) == sorted(ref)
    for name, want in ref.items():
        got = mine[name]["gt"]
        assert got is not None, f"{name}: no ground truth"
        for key in ("count", "type", "item_types", "dtypes", "shapes"):
            assert got[key] == want["gt"][key], f"{name}: ground-truth {key}"
        assert got["values"] == want["gt"]["values"], f"{name}: ground-truth polygons"


@pytest.mark.parametrize("stage", STAGES)
def test_same_predictions(theirs: dict, ours: dict, stage: str) -> None:
    mine, ref = _files(ours, stage), _files(theirs, stage)
    for name, want in ref.items():
        got = mine.get(name)
        assert got is not None, f"{name}: not evaluated"
        for key in ("pred_boxes", "orientation", "raw_size", "canonical_size", "image_path",
                    "metadata_keys"):
            assert got[key] == want[key], f"{name}: {key}"


@pytest.mark.parametrize("stage", STAGES)
def test_same_batch_fields(theirs: dict, ours: dict, stage: str) -> None:
    mine, ref = _stage(ours, stage)["batches"], _stage(theirs, stage)["batches"]
    assert len(mine) == len(ref)
    for got, want in zip(mine, ref):
        assert got["keys"] == want["keys"]
        for key in ("images", "prob_maps", "thresh_maps", "shape", "raw_size", "orientation",
                    "canonical_size", "image_path"):
            assert got.get(key) == want.get(key), f"batch {key}"
        assert got["inverse_matrix"] == want["inverse_matrix"], "inverse_matrix (dtype, values)"
        assert got["polygons"] == want["polygons"], "polygons (count, dtype, shape)"
        for m_got, m_want in zip(got["metadata"], want["metadata"]):
            assert m_got["keys"] == m_want["keys"], "metadata keys"
            assert m_got["value_types"] == m_want["value_types"], "metadata value types"
            assert m_got["values"] == m_want["values"], "metadata values"


@pytest.mark.parametrize("stage", STAGES)
def test_same_logged_metrics(theirs: dict, ours: dict, stage: str) -> None:
    mine, ref = _stage(ours, stage).get("metrics"), _stage(theirs, stage)["metrics"]
    assert mine is not None, f"no {stage} metrics were logged" + _tail(ours)
    assert sorted(mine) == sorted(ref)
    for key, want in ref.items():
        assert mine[key] == want, f"{key}: ours {mine[key]!r}, theirs {want!r}"


# -- the committed figures are what the origin produces -----------------------------------
def test_committed_figures_match_their_run(theirs: dict) -> None:
    figures = json.loads(FIGURES.read_text())
    for stage in STAGES:
        rec = _stage(theirs, stage)
        want = figures["stages"][stage]
        gt = want["gt"]
        if gt.get("same_as"):  # (recorded once where two stages read the same split)
            gt = figures["stages"][gt["same_as"]]["gt"]
        assert rec["evaluator"]["filenames_to_check"] == want["anns_keys"]
        assert [n for b in rec["batches"] for n in b["image_filename"]] == want["item_order"]
        assert {n: f["gt"]["values"] for n, f in rec["evaluator"]["files"].items()} == gt
        if WORKERS == 0:  # (the figures' run; workers seed the train batch's augmentation)
            # (the losses may differ in the last bits on another CPU or torch build)
            assert rec["metrics"] == pytest.approx(want["metrics"], rel=1e-5, abs=1e-7)
