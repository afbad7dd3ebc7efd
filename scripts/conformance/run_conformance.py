"""Run the side-by-side comparison over presets, worker counts and ways of making ours, and
append every difference found to a Markdown file as each configuration finishes.

    ORIGIN_SRC=/path/to/origin PYTHONPATH=$PWD:<stubs>:$ORIGIN_SRC <origin venv>/bin/python \\
        scripts/conformance/run_conformance.py [--out FINDINGS.md] [--presets ...] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conformance_data  # noqa: E402
import conformance_harness as H  # noqa: E402


def _error(where: str, exc: BaseException) -> H.Diff:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return H.Diff("*", where, "runs", f"{type(exc).__name__}: {str(exc)[:300]} "
                  f"(at {Path(last.filename).name}:{last.lineno})")


def run_config(root: Path, preset: str, workers: int, hows: list[str],
               report) -> None:
    cfg = H.compose(root, preset)
    o_ds, o_tf, o_collate = H.origin_parts(cfg)
    o_dl = H.loader(o_ds, o_collate, workers)
    o1, okeys = H.epoch(o_dl)
    o2, _ = H.epoch(o_dl)
    report(f"{preset} w{workers} origin epoch 2 vs epoch 1", H.compare_runs(o1, o2, root))
    for how in hows:
        cache = Path(tempfile.mkdtemp(prefix=f"cache-{preset}-{how}-"))
        os.environ["DISKCACHE_OCR_DIR"] = str(cache)
        label = f"{preset} w{workers} {how}"
        try:
            ds = H.our_dataset(cfg, how, o_tf)
        except Exception as exc:  # noqa: BLE001 - a failure is a finding
            report(f"{label} construct", [_error("construct", exc)])
            shutil.rmtree(cache, ignore_errors=True)
            continue
        try:
            dl = H.loader(ds, o_collate, workers)
            report(f"{label} cold", H.compare_runs(o1, H.stream(dl), root, okeys, None))
            report(f"{label} warm (2nd epoch)",
                   H.compare_runs(o2, H.stream(dl), root, okeys, None))
            del dl
            ds2 = H.our_dataset(cfg, how, o_tf)
            report(f"{label} warm (new dataset object)",
                   H.compare_runs(o1, H.stream(H.loader(ds2, o_collate, workers)), root,
                                  okeys, None))
            del ds2
        except Exception as exc:  # noqa: BLE001
            report(f"{label} iterate", [_error("iterate", exc)])
        if workers == 0:
            try:
                report(f"{label} dataset object", H.compare_datasets(o_ds, ds, root))
            except Exception as exc:  # noqa: BLE001
                report(f"{label} dataset object", [_error("dataset object", exc)])
        del ds
        shutil.rmtree(cache, ignore_errors=True)



def _grouped(diffs: list[H.Diff]) -> list[str]:
    """Rows, one per (field, origin, ours), naming the images that share it."""
    groups: OrderedDict[tuple[str, str, str], list[str]] = OrderedDict()
    for d in diffs:
        groups.setdefault((d.field, d.origin, d.ours), []).append(d.image)
    rows = []
    for (field, a, b), images in groups.items():
        names = ", ".join(images[:8]) + (f" (+{len(images) - 8} more)" if len(images) > 8 else "")
        rows.append(H.Diff(names, field, a, b).line() + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="FINDINGS.md")
    ap.add_argument("--presets", nargs="+", default=list(H.PRESETS))
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    ap.add_argument("--how", nargs="+", default=list(H.HOWS))
    ap.add_argument("--data", help="existing inputs (default: generate into a temp dir)")
    args = ap.parse_args(argv)
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="conformance-"))
    if not args.data:
        conformance_data.generate(root)
    out = Path(args.out)
    seen: OrderedDict[tuple[str, str, str, str], list[str]] = OrderedDict()

    def report(label: str, diffs: list[H.Diff]) -> None:
        new = [d for d in diffs if (d.image, d.field, d.origin, d.ours) not in seen]
        for d in diffs:
            seen.setdefault((d.image, d.field, d.origin, d.ours), []).append(label)
        old = len(diffs) - len(new)
        status = (f"{len(diffs)} differences ({old} as in an earlier configuration)"
                  if diffs else "identical")
        print(f"[{time.strftime('%H:%M:%S')}] {label}: {status}", flush=True)
        with out.open("a") as f:
            f.write(f"\n#### {label}: {status}\n")
            if new:
                f.write("\n| image(s) | field | origin | ours |\n|---|---|---|---|\n")
                f.writelines(_grouped(new))

    # every dataset of ours caches under a directory of this run, never the user's default
    train_cache = tempfile.mkdtemp(prefix="cache-train-")
    os.environ["DISKCACHE_OCR_DIR"] = train_cache
    cfg = H.compose(root, "minimal")
    theirs, make_ours = H.train_parts(root, cfg)
    for transform in (True, False):
        label = "train node" + ("" if transform else " with transform: null")
        try:
            ours = make_ours(transform)
            report(label, H.compare_datasets(theirs, ours, root, items=False))
        except Exception as exc:  # noqa: BLE001
            report(label, [_error("construct (train split)", exc)])
    shutil.rmtree(train_cache, ignore_errors=True)
    for preset in args.presets:
        for w in args.workers:
            try:
                run_config(root, preset, w, args.how, report)
            except Exception as exc:  # noqa: BLE001
                report(f"{preset} w{w} origin", [_error("origin side", exc)])
    with out.open("a") as f:
        f.write(f"\n### Summary: {len(seen)} distinct differences by field\n\n"
                "| field | images | configurations |\n|---|---|---|\n")
        by_field: OrderedDict[str, tuple[set, set]] = OrderedDict()
        for (image, field, _a, _b), labels in seen.items():
            imgs, cfgs = by_field.setdefault(field, (set(), set()))
            imgs.add(image)
            cfgs.update(labels)
        for field, (imgs, cfgs) in by_field.items():
            f.write(f"| {field} | {len(imgs)}: {', '.join(sorted(imgs)[:6])} | "
                    f"{len(cfgs)}: {'; '.join(sorted(cfgs)[:4])} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
