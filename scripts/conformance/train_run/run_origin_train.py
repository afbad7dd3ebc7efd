"""Run the origin project's ``runners/train.py`` (fast_dev_run, CPU) on a dataset, with its own
dataset class or with ``diskcache_ocr.origin.ValidatedOCRDataset`` set as the ``_target_`` of
chosen splits, and return what its evaluation received (see ``origin_capture``).

Their code and config tree are used as they are: everything is a Hydra command-line override.

    python run_origin_train.py --origin /path/to/origin --data DATA --work WORK \\
        [--ours val,test] [--python /path/to/origin/venv/bin/python] [--workers 0]

``DATA`` is in the origin's layout (``images/<split>/``, ``jsons/<split>.json``), e.g. written
by ``diskcache-ocr synth``. Prints a JSON summary; the capture is ``WORK/capture.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUR_ROOT = HERE.parents[2]  # scripts/conformance/train_run -> project root
OUR_TARGET = "diskcache_ocr.origin.ValidatedOCRDataset"
SPLITS = ("train", "val", "test", "predict")
NO_PREDICTIONS = re.compile(r"No (\w+) predictions found")

__all__ = ["OUR_TARGET", "command", "load", "run", "main"]


def command(origin: Path, data: Path, capture: Path, *, ours: tuple[str, ...] = (),
            batch_size: int = 8, workers: int = 0, seed: int = 42,
            python: str = sys.executable, extra: tuple[str, ...] = ()) -> list[str]:
    """The train.py command line: their config plus CPU/fast_dev_run/data/capture overrides."""
    bad = sorted(set(ours) - set(SPLITS))
    if bad:
        raise ValueError(f"unknown split(s) {bad}; choose from {SPLITS}")
    data = data.resolve()
    args = [python, str(origin / "runners" / "train.py"),
            "trainer.accelerator=cpu", "trainer.devices=1", "+trainer.fast_dev_run=true",
            "model.encoder.pretrained=false", "compile_model=false",
            f"seed={seed}", f"batch_size={batch_size}",
            f"dataset_base_path={data}/",
            # their val split reads a pre-processed "canonical" directory; ours is images/val
            f"datasets.val_dataset.config.image_path={data}/images/val",
            "+callbacks.capture._target_=origin_capture.CaptureCallback",
            f"+callbacks.capture.out={capture}",
            f"hydra.run.dir={capture.parent / 'hydra'}"]
    for split in SPLITS:
        args.append(f"dataloaders.{split}_dataloader.num_workers={workers}")
    for split in ours:
        args.append(f"datasets.{split}_dataset._target_={OUR_TARGET}")
    return args + list(extra)


def run(origin: str | os.PathLike, data: str | os.PathLike, work: str | os.PathLike, *,
        ours: tuple[str, ...] = (), python: str = sys.executable, workers: int = 0,
        batch_size: int = 8, seed: int = 42, our_root: str | os.PathLike = OUR_ROOT,
        timeout: float = 1200, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run train.py once in ``work`` (created; it is the process's working directory) and
    return ``{"command", "rc", "wall_s", "output", "no_predictions", "capture"}``."""
    origin, data, work = Path(origin).resolve(), Path(data).resolve(), Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    capture = work / "capture.json"
    if capture.exists():
        capture.unlink()
    cmd = command(origin, data, capture, ours=ours, batch_size=batch_size, workers=workers,
                  seed=seed, python=python, extra=extra)
    stubs = origin.parent / "stubs"
    path = [str(Path(our_root).resolve()), str(HERE)]
    if stubs.is_dir():
        path.append(str(stubs))  # a torchvision stand-in, where the venv has no torchvision
    path.append(str(origin))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), WANDB_MODE="disabled",
               WANDB_SILENT="true", OCR_CONFIG_DIR=str(origin / "configs"),
               DISKCACHE_OCR_DIR=str(work / "cache"), PYTHONUNBUFFERED="1",
               HYDRA_FULL_ERROR="1")
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
    wall = time.monotonic() - start
    (work / "output.log").write_text(proc.stdout)
    summary = {"command": cmd, "ours": list(ours), "rc": proc.returncode,
               "wall_s": round(wall, 1), "no_predictions": NO_PREDICTIONS.findall(proc.stdout)}
    (work / "run.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "output": proc.stdout,
            "capture": json.loads(capture.read_text()) if capture.exists() else None}


def load(work: str | os.PathLike) -> dict[str, Any]:
    """The result of an earlier :func:`run` in ``work``, read back from its files."""
    work = Path(work)
    capture = work / "capture.json"
    return {**json.loads((work / "run.json").read_text()),
            "output": (work / "output.log").read_text(),
            "capture": json.loads(capture.read_text()) if capture.exists() else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--origin", required=True, type=Path, help="checkout of the origin project")
    p.add_argument("--data", required=True, type=Path, help="dataset root (origin layout)")
    p.add_argument("--work", required=True, type=Path, help="working directory of the run")
    p.add_argument("--ours", default="", help="splits served by our dataset, e.g. val,test")
    p.add_argument("--python", default=sys.executable, help="the origin venv's python")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("extra", nargs="*", help="further Hydra overrides")
    a = p.parse_args(argv)
    ours = tuple(s for s in a.ours.split(",") if s)
    res = run(a.origin, a.data, a.work, ours=ours, python=a.python, workers=a.workers,
              batch_size=a.batch_size, extra=tuple(a.extra))
    tail = res.pop("output")[-4000:]
    res.pop("capture")
    print(json.dumps(res, indent=1))
    print("---- output tail ----\n" + tail)
    return 0 if res["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
