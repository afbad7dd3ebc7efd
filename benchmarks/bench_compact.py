"""Compact samples: per-sample and 2-worker epoch speed, bytes per sample, epoch 0 cost.

* per sample, one process, ``__getitems__`` (batch 8): the uncached pipeline with maps
  (``none`` + ``load_maps``) against a prebuilt ``validation_optimized`` cache read with
  ``output="float32"`` and ``output="compact"``;
* a 2-worker ``DataLoader`` epoch (batch 8, persistent workers, second epoch timed): uncached,
  cached float32, and cached compact with ``finish_batch`` on the CPU in the main process;
* bytes per sample through the DataLoader (the tensors of one sample) float32 vs compact;
* epoch 0 with read-through (fresh cache, ``preload=False``, 2 workers) ÷ an uncached 2-worker
  epoch, with ``read_through_images: false`` (the decoded image not written when tensors are
  cached) and as the preset ships (every cached kind written on a miss), with the bytes each
  kind adds per image, and epoch 0 and epoch 1 with one kind cached at a time (what each
  costs first and saves later).

Targets: compact sample ≥ 30× uncached; compact 2-worker epoch + finish ≥ 15×
uncached; epoch 0 ÷ uncached ≤ 1.3×.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NAME = "compact"
MODULE = "bench_compact"
BATCH = 8
WORKERS = 2
UNCACHED = {"load_maps": True}  # the uncached pipeline returning what validation_optimized does
TENSOR_FIELDS = ("image", "prob_map", "prob_mask", "thresh_map", "thresh_mask", "inverse_matrix")


def per_sample(images: str, ann: str, cache: str, rounds: int) -> dict[str, float]:
    """Seconds per sample of ``__getitems__`` batches, each configuration in this process."""
    from diskcache_ocr import CachedOCRDataset

    out = {}
    with C.quiet_logging():
        configs = {"uncached": (None, UNCACHED, "float32"),
                   "float32": (cache, "validation_optimized", "float32"),
                   "compact": (cache, "validation_optimized", "compact")}
        for name, (where, preset, output) in configs.items():
            ds = CachedOCRDataset(images, ann, where, preset=preset, preload=False,
                                  output=output)
            n = len(ds)
            batches = [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]
            ds.__getitems__(batches[0])  # opens the store, warms the buffers
            r = 1 if name == "uncached" else rounds
            started = time.perf_counter()
            for _ in range(r):
                for b in batches:
                    ds.__getitems__(b)
            out[name] = (time.perf_counter() - started) / (r * n)
            ds.close()
    return out


def loader_epoch(images: str, ann: str, cache: str | None, preset: Any, output: str,
                 finish: bool) -> dict[str, Any]:
    """Epoch 0 and epoch 1 of a 2-worker DataLoader (in a fresh interpreter)."""
    from diskcache_ocr import CachedOCRDataset, finish_batch

    with C.quiet_logging():
        ds = CachedOCRDataset(images, ann, cache, preset=preset, preload=False, output=output)
        loader = C.data_loader(ds, WORKERS, batch_size=BATCH)
        times, nbytes = [], 0
        for _epoch in range(2):
            started = time.perf_counter()
            for batch in loader:
                if finish:
                    batch = finish_batch(batch)
            times.append(time.perf_counter() - started)
        sample = ds[0]
        nbytes = sum(sample[k].numel() * sample[k].element_size() for k in TENSOR_FIELDS)
        del loader
        ds.close()
    return {"epoch0": times[0], "epoch1": times[1], "bytes_per_sample": nbytes}


def epoch0(images: str, ann: str, cache: str, before: bool) -> dict[str, Any]:
    """Read-through epoch 0 into a fresh cache, ``validation_optimized`` with
    ``read_through_images: false``, or, ``before``, as shipped (the decoded image written too)
    (in a fresh interpreter)."""
    from diskcache_ocr.presets import load_preset
    from diskcache_ocr.store import CacheStore

    preset = {**load_preset("validation_optimized").to_dict(), "read_through_images": before}
    r = loader_epoch(images, ann, cache, preset, "float32", False)
    per_kind: dict[str, int] = {}
    with CacheStore(cache, readonly=True) as store, store.reader() as txn:
        for kind in ("images", "tensors", "maps"):
            total = 0
            for key in store.keys(kind):
                rec = txn.get(kind, key)
                total += rec.nbytes if rec is not None else 0
            per_kind[kind] = total
    return {"epoch0": r["epoch0"], "bytes_by_kind": per_kind}


KIND_PRESETS = {"images": (True, False, False), "tensors": (False, True, False),
                "maps": (False, False, True)}


def one_kind(images: str, ann: str, cache: str, kind: str) -> dict[str, Any]:
    """Epoch 0 (read-through) and epoch 1 with only ``kind`` cached, maps returned."""
    cache_images, cache_tensors, cache_maps = KIND_PRESETS[kind]
    preset = {"load_maps": True, "cache_config": {
        "cache_images": cache_images, "cache_transformed_tensors": cache_tensors,
        "cache_maps": cache_maps}}
    r = loader_epoch(images, ann, cache, preset, "float32", False)
    return {"epoch0": r["epoch0"], "epoch1": r["epoch1"]}


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    n, reps, images, ann, cache = C.prebuilt_set(args)
    run = C.run_isolated if C.ISOLATE else (lambda m, f, **kw: globals()[f](**kw))
    s, i = str(images), str(ann)

    samples = [run(MODULE, "per_sample", images=s, ann=i, cache=str(cache),
                   rounds=1 if args.quick else 3) for _ in range(reps)]
    epochs: dict[str, list[dict[str, Any]]] = {"uncached": [], "float32": [], "compact": []}
    for _ in range(reps):
        epochs["uncached"].append(run(MODULE, "loader_epoch", images=s, ann=i, cache=None,
                                      preset=UNCACHED, output="float32", finish=False))
        epochs["float32"].append(run(MODULE, "loader_epoch", images=s, ann=i, cache=str(cache),
                                     preset="validation_optimized", output="float32",
                                     finish=False))
        epochs["compact"].append(run(MODULE, "loader_epoch", images=s, ann=i, cache=str(cache),
                                     preset="validation_optimized", output="compact",
                                     finish=True))
    first: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for _ in range(reps):
        for label in first:
            scratch = C.scratch_dir("compact-e0-")
            try:
                first[label].append(run(MODULE, "epoch0", images=s, ann=i,
                                        cache=str(scratch / "cache"), before=label == "before"))
            finally:
                C.remove(scratch)

    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KIND_PRESETS}
    for _ in range(reps):
        for kind in KIND_PRESETS:
            scratch = C.scratch_dir("compact-kind-")
            try:
                by_kind[kind].append(run(MODULE, "one_kind", images=s, ann=i,
                                         cache=str(scratch / "cache"), kind=kind))
            finally:
                C.remove(scratch)

    per = {k: C.summary([r[k] for r in samples]) for k in samples[0]}
    ep = {k: C.summary([r["epoch1"] for r in v]) for k, v in epochs.items()}
    uncached_e = C.summary([r["epoch1"] for r in epochs["uncached"]]
                           + [r["epoch0"] for r in epochs["uncached"]])
    e0 = {k: C.summary([r["epoch0"] for r in v]) for k, v in first.items()}
    nbytes = {k: epochs[k][0]["bytes_per_sample"] for k in ("float32", "compact")}
    kinds = {k: {kind: b / n for kind, b in first[k][0]["bytes_by_kind"].items()}
             for k in first}
    ratios = {
        "compact sample vs uncached (x)": C.ratio(per["uncached"], per["compact"]),
        "float32 sample vs uncached (x)": C.ratio(per["uncached"], per["float32"]),
        "2-worker epoch compact + finish_batch vs uncached (x)":
            C.ratio(uncached_e, ep["compact"]),
        "2-worker epoch float32 cached vs uncached (x)": C.ratio(uncached_e, ep["float32"]),
        "epoch 0 read-through ÷ uncached, after": C.ratio(e0["after"], uncached_e),
        "epoch 0 read-through ÷ uncached, before": C.ratio(e0["before"], uncached_e),
    }
    targets = {
        "compact sample ≥ 30× uncached": C.verdict(ratios["compact sample vs uncached (x)"],
                                                   30, "higher"),
        "2-worker compact epoch + finish ≥ 15× uncached": C.verdict(
            ratios["2-worker epoch compact + finish_batch vs uncached (x)"], 15, "higher"),
        "epoch 0 ÷ uncached ≤ 1.3×": C.verdict(ratios["epoch 0 read-through ÷ uncached, after"],
                                               1.3),
    }
    kind_cost = {k: {"epoch0_vs_uncached": C.ratio(C.summary([r["epoch0"] for r in v]),
                                                   uncached_e),
                     "epoch1_vs_uncached": C.ratio(C.summary([r["epoch1"] for r in v]),
                                                   uncached_e)}
                 for k, v in by_kind.items()}
    rows = [[k, C.fmt_x(v)] for k, v in ratios.items()]
    rows += [[f"only {k} cached: epoch 0 / epoch 1 ÷ uncached",
              f"{C.fmt_x(v['epoch0_vs_uncached'])} / {C.fmt_x(v['epoch1_vs_uncached'])}"]
             for k, v in kind_cost.items()]
    rows += [[f"ms per sample, {k}", f"{v['median'] * 1e3:.2f}"] for k, v in per.items()]
    rows += [[f"bytes per sample, {k}", f"{v / 1e6:.2f} MB"] for k, v in nbytes.items()]
    rows += [[f"epoch 0 bytes written per image, {k}",
              ", ".join(f"{kind} {b / 1e6:.2f} MB" for kind, b in v.items())]
             for k, v in kinds.items()]
    rows += [[t, v] for t, v in targets.items()]
    table = C.md_table(["measure", "value"], rows,
                       title=f"Compact samples ({n} images, {reps} reps, medians)")
    payload = {"images": n, "reps": reps, "per_sample_s": per, "epoch1_2_workers_s": ep,
               "uncached_epoch_s": uncached_e, "epoch0_s": e0, "bytes_per_sample": nbytes,
               "epoch0_bytes_per_image_by_kind": kinds, "ratios": ratios,
               "one_kind_cached": kind_cost, "targets": targets,
               "raw": {"per_sample": samples, "epochs": epochs, "epoch0": first,
                       "one_kind": by_kind}}
    C.write_result(NAME, payload, table)
    return payload


if __name__ == "__main__":
    main()
