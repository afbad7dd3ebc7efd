"""Benchmarks side by side: the cache against the uncached pipeline and the alternatives.

Parts (``--parts a,b,c,d,e``):

a. Per-sample cost in one process: the uncached path by stage (read, decode, transform,
   maps) against a cached read of each kind copied into a batch slot, against one memcpy of
   the same bytes; plus whole samples through ``CachedOCRDataset.__getitems__``.
b. Epochs 0 and 1 with ``num_workers`` 0, 1, 2 for each preset, the uncached pipeline, the
   origin's per-process dict cache, and ``.npz`` map files.
c. Peers on the same arrays: per-sample, random-order, warm reads of a decoded image and of a
   transformed tensor into a batch slot from this cache (LMDB), ``.npy`` files (``np.load``
   and ``mmap_mode='r'``), python-diskcache (bytes) and LitData (``optimize`` +
   ``StreamingDataset``).
d. Memory: summed PSS and anonymous memory of main + workers during epoch 2 (persistent
   workers, shuffled) with 0, 1, 2, 4 workers: the LMDB cache against the dict cache.
e. Cold start: the first read of a record after dropping ``data.mdb`` from the page cache,
   LMDB read-ahead on against off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NAME = "compare"
BATCH = 8
# minimal and memory_efficient cache nothing and run exactly the code path of none (no store
# is opened); bench_presets measures them at 2 workers. Add them here with --configs.
EPOCH_CONFIGS = ("none", "none + load_maps", "balanced", "validation_optimized",
                 "dict cache (origin)", "npz maps")
ALL_CONFIGS = ("none", "none + load_maps", "minimal", "balanced", "validation_optimized",
               "memory_efficient", "dict cache (origin)", "npz maps")
TABLES: list[str] = []


# -- a. per-sample cost in one process ----------------------------------------------------
def part_a(n: int, reps: int, quick: bool) -> dict[str, Any]:
    import numpy as np

    from diskcache_ocr import CachedOCRDataset, CacheStore
    from diskcache_ocr.ocr.maps import MAP_NAMES

    _, images, ann = C.dataset_root(n)
    cache = C.prebuilt_cache(n)
    ds = CachedOCRDataset(images, ann, None, preset="none")
    pipe = ds.pipeline
    subset = list(range(0, n, max(1, n // (8 if quick else 40))))
    stage_t: dict[str, list[float]] = {k: [] for k in ("read", "decode", "transform", "maps")}
    for _ in range(reps):
        acc = dict.fromkeys(stage_t, 0.0)
        for i in subset:
            polys, ignore = ds.words(i)
            t0 = time.perf_counter()
            data = (images / ds.source(i)).read_bytes()
            t1 = time.perf_counter()
            image = pipe.decode(data, ds.source(i))
            t2 = time.perf_counter()
            rec = pipe.tensor_record(pipe.apply_transform(image, polys))
            t3 = time.perf_counter()
            moved = pipe.transform_polygons(polys, rec["matrix"])
            pipe.make_maps(moved, ignore)
            t4 = time.perf_counter()
            for k, a, b in (("read", t0, t1), ("decode", t1, t2), ("transform", t2, t3),
                            ("maps", t3, t4)):
                acc[k] += b - a
        for k in stage_t:
            stage_t[k].append(acc[k] / len(subset))
    stage_t["uncached total (sum of stages)"] = [sum(v) for v in zip(*stage_t.values())]

    # Cached reads of each kind into a batch slot, random order, done exactly as the dataset
    # does it (images: copy; tensors: finish_into the float32 image slot, a copy or the
    # uint8 -> float32 normalize; maps: copy with cast into float32 slots), from
    # (1) LMDB views, (2) owned in-memory copies of the same arrays (the same work without
    # the store), (3) a plain memcpy of the stored bytes into slots of their own dtype.
    C.warm_file(cache / "data.mdb")
    store = CacheStore(cache, readonly=True)
    keys = [dict(e.keys) for _, e in store.iter_index() if e.ok]
    size = pipe.transform.size
    names = {"images": ("image",), "tensors": ("image",), "maps": MAP_NAMES}
    out_slot = {("tensors", "image"): np.empty((3, size, size), np.float32),
                **{("maps", m): np.empty((1, size, size), np.float32) for m in MAP_NAMES}}
    rng = np.random.default_rng(1)
    cached_t: dict[str, list[float]] = {}
    nbytes: dict[str, float] = {}
    out_bytes: dict[str, float] = {}

    def put(kind: str, name: str, arr: np.ndarray, slots: dict) -> None:
        if kind == "tensors":
            pipe.finish_into(arr, out_slot[(kind, name)])
        elif kind == "maps":
            np.copyto(out_slot[(kind, name)], arr, casting="unsafe")
        else:
            np.copyto(slots[arr.shape], arr)

    for kind in ("images", "tensors", "maps"):
        owned: list[dict[str, np.ndarray]] = []
        with store.reader() as r:
            for k in keys:
                rec = r.get(kind, k[kind])
                owned.append({n: np.array(rec[n]) for n in names[kind]})
        image_slots = {a["image"].shape: np.empty_like(a["image"]) for a in owned
                       if kind == "images"}
        same_dtype = {(i, n): np.empty_like(a[n]) for i, a in enumerate(owned[:1])
                      for n in names[kind]}
        nbytes[kind] = float(np.mean([sum(a[n].nbytes for n in names[kind]) for a in owned]))
        out_bytes[kind] = (nbytes[kind] if kind == "images" else
                           float(sum(out_slot[(kind, n)].nbytes for n in names[kind])))

        def from_lmdb(j: int, kind: str = kind, image_slots: dict = image_slots) -> None:
            with store.reader() as r:
                rec = r.get(kind, keys[j][kind])
                for n in names[kind]:
                    put(kind, n, rec[n], image_slots)

        def from_ram(j: int, kind: str = kind, owned: list = owned,
                     image_slots: dict = image_slots) -> None:
            for n in names[kind]:
                put(kind, n, owned[j][n], image_slots)

        def memcpy(j: int, kind: str = kind, owned: list = owned,
                   image_slots: dict = image_slots, same_dtype: dict = same_dtype) -> None:
            for n in names[kind]:
                a = owned[j][n]
                dst = image_slots[a.shape] if kind == "images" else same_dtype[(0, n)]
                np.copyto(dst, a)

        cases = {f"{kind}: cached read into batch slot": from_lmdb,
                 f"{kind}: same work from RAM (no store)": from_ram,
                 f"{kind}: memcpy of the stored bytes": memcpy}
        for fn in cases.values():
            for j in range(min(4, len(keys))):
                fn(j)
        for name in cases:
            cached_t[name] = []
        for _ in range(reps):
            order = rng.permutation(len(keys))
            for name, fn in cases.items():
                started = time.perf_counter()
                for j in order:
                    fn(int(j))
                cached_t[name].append((time.perf_counter() - started) / len(keys))
        del owned
    store.close()

    # Whole samples through the dataset, in batches of 8, one process.
    whole_t: dict[str, list[float]] = {"dataset, uncached (none + load_maps)": [],
                                       "dataset, cached (validation_optimized)": []}
    with C.quiet_logging():
        unc = CachedOCRDataset(images, ann, None, preset={"load_maps": True})
        cac = CachedOCRDataset(images, ann, cache, preset="validation_optimized", preload=False)
        batches = [subset[i:i + BATCH] for i in range(0, len(subset), BATCH)]
        full_batches = [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]
        cac.__getitems__(full_batches[0])
        for _ in range(reps):
            started = time.perf_counter()
            for b in batches:
                unc.__getitems__(b)
            whole_t["dataset, uncached (none + load_maps)"].append(
                (time.perf_counter() - started) / len(subset))
            started = time.perf_counter()
            for b in full_batches:
                cac.__getitems__(b)
            whole_t["dataset, cached (validation_optimized)"].append(
                (time.perf_counter() - started) / n)
        cac.close()

    # The floor for a cached sample: writing its output (float32 image + 4 maps) once, from
    # sources that are not in the CPU caches, into a reused batch buffer.
    out_sample = sum(out_bytes.values()) - out_bytes["images"]  # tensors + maps outputs
    floor_name = f"floor: memcpy of one sample's {out_sample / 1e6:.1f} MB output into a batch"
    sources = [np.ones(int(out_sample) // 4, np.float32) for _ in range(16)]  # > the L2
    dest = np.empty((BATCH, int(out_sample) // 4), np.float32)
    whole_t[floor_name] = []
    for _ in range(reps):
        started = time.perf_counter()
        for r in range(4):
            for i, src in enumerate(sources):
                np.copyto(dest[(i + r) % BATCH], src)
        whole_t[floor_name].append((time.perf_counter() - started) / (4 * len(sources)))
    del sources, dest

    stats = {k: C.summary(v) for k, v in {**stage_t, **cached_t, **whole_t}.items()}
    unc_total = stats["uncached total (sum of stages)"]
    rows = []
    for name, st in stats.items():
        extra = ""
        kind = name.split(":")[0]
        if name.endswith("cached read into batch slot"):
            ram = stats[f"{kind}: same work from RAM (no store)"]
            lim = stats[f"{kind}: memcpy of the stored bytes"]
            extra = (f"{C.ratio(st, ram):.2f}× the same work from RAM, {C.ratio(st, lim):.2f}× "
                     f"a memcpy of its {nbytes[kind] / 1e6:.1f} MB; writes "
                     f"{out_bytes[kind] / 1e6:.1f} MB")
        if name.startswith("dataset, cached"):
            u = stats["dataset, uncached (none + load_maps)"]
            extra = (f"{C.ratio(u, st):.1f}× faster than the uncached dataset (target ≥ 20×); "
                     f"{C.ratio(st, stats[floor_name]):.2f}× the floor below")
        if name == floor_name:
            u = stats["dataset, uncached (none + load_maps)"]
            extra = f"the most any cache could gain here: {C.ratio(u, st):.1f}×"
        rows.append([name, C.fmt_s(st, "ms", 3), f"{100 * C.ratio(st, unc_total):.1f} %", extra])
    table = C.md_table(
        ["per sample (one process)", "ms, median [min–max]", "÷ uncached total", "note"], rows,
        title=f"a. Per-sample cost, one process: uncached stages on {len(subset)} images; "
              f"cached reads of all {len(keys)} records per kind in random order; {reps} reps. "
              f"Mean stored bytes per sample: images {nbytes['images'] / 1e6:.1f} MB, tensors "
              f"{nbytes['tensors'] / 1e6:.1f} MB, maps {nbytes['maps'] / 1e6:.1f} MB")
    TABLES.append(table)
    return {"subset_images": len(subset), "cached_records": len(keys),
            "stored_bytes_mean": nbytes, "output_bytes": out_bytes, "per_sample": stats}


# -- b. epochs for 0, 1, 2 workers --------------------------------------------------------
def make_dataset(cfg: str, images: Path, ann: Path, cache: Path,
                 report_dir: Path | None = None) -> Any:
    from alternatives import DictCacheDataset, NpzMapsDataset

    from diskcache_ocr import CachedOCRDataset

    if cfg == "dict cache (origin)":
        base = CachedOCRDataset(images, ann, None, preset={"load_maps": True})
        return DictCacheDataset(base, report_dir=report_dir)
    if cfg == "npz maps":
        return NpzMapsDataset(images, ann, cache / "npz")
    if cfg == NO_REUSE:
        import dataclasses

        from diskcache_ocr import load_preset

        preset: Any = dataclasses.replace(load_preset("validation_optimized"),
                                          reuse_batch_memory=False)
    else:
        preset = {"load_maps": True} if cfg == "none + load_maps" else cfg
    return CachedOCRDataset(images, ann, cache, preset=preset, preload=False)


def epoch_pair(cfg: str, workers: int, images: str, ann: str, cache: str) -> dict[str, float]:
    """Epochs 0 and 1 of one fresh dataset (run in a fresh interpreter)."""
    with C.quiet_logging():
        ds = make_dataset(cfg, Path(images), Path(ann), Path(cache))
        loader = C.data_loader(ds, workers, batch_size=BATCH)
        e0, n0 = C.run_epoch(loader)
        e1, n1 = C.run_epoch(loader)
        assert n0 == n1 == len(ds), (n0, n1, len(ds))
        del loader
    return {"epoch0": e0, "epoch1": e1}


def part_b(n: int, reps: int, workers: list[int], configs: list[str]) -> dict[str, Any]:
    _, images, ann = C.dataset_root(n)
    res: dict[str, dict[str, dict[str, list[float]]]] = {}
    for rep in range(reps):
        for w in workers:
            for cfg in configs:
                C.log(f"b: rep {rep + 1}/{reps}, {w} workers, {cfg}")
                cache = C.scratch_dir("compare-b-")
                try:
                    r = C.run_isolated("bench_compare", "epoch_pair", cfg=cfg, workers=w,
                                       images=images, ann=ann, cache=cache)
                finally:
                    C.remove(cache)
                d = res.setdefault(str(w), {}).setdefault(cfg, {"epoch0": [], "epoch1": []})
                d["epoch0"].append(r["epoch0"])
                d["epoch1"].append(r["epoch1"])
    stats = {w: {cfg: {k: C.summary(v) for k, v in d.items()} for cfg, d in per.items()}
             for w, per in res.items()}
    rows = []
    for w, per in stats.items():
        for cfg, st in per.items():
            base = per.get("none + load_maps" if _maps(cfg) else "none")
            rows.append([w, cfg, C.fmt_s(st["epoch0"]), C.fmt_s(st["epoch1"]),
                         C.fmt_x(C.ratio(st["epoch0"], base["epoch0"]) if base else None),
                         C.fmt_x(C.ratio(base["epoch1"], st["epoch1"]) if base else None, 1),
                         "none + load_maps" if _maps(cfg) else "none"])
    table = C.md_table(
        ["workers", "approach", "epoch 0", "epoch 1", "e0 ÷ no cache e0",
         "speedup e1 vs no cache", "no-cache baseline"], rows,
        title=f"b. Epochs: {n} images, batch {BATCH}, persistent workers, fresh cache per "
              f"rep, {reps} reps, median [min–max]")
    TABLES.append(table)
    labels = [f"{cfg}\n{w} workers" for w, per in stats.items() for cfg in per]
    C.bar_chart(C.RESULTS / "compare_epochs.png", labels,
                {"epoch 0": [st["epoch0"] for per in stats.values() for st in per.values()],
                 "epoch 1": [st["epoch1"] for per in stats.values() for st in per.values()]},
                title=f"Epochs side by side: {n} images, batch {BATCH}, {reps} reps")
    return {"epochs": stats}


def _maps(cfg: str) -> bool:
    if cfg in ("none + load_maps", "dict cache (origin)", "npz maps"):
        return True
    from diskcache_ocr import load_preset

    return load_preset(cfg).load_maps


# -- c. peers on the same arrays ------------------------------------------------------------
def _litdata_item(path: str) -> dict[str, Any]:
    import numpy as np

    return {"a": np.load(path)}


def part_c(n: int, reps: int) -> dict[str, Any]:
    import io

    import numpy as np

    from diskcache_ocr import CacheStore

    cache = C.prebuilt_cache(n)
    C.warm_file(cache / "data.mdb")
    store = CacheStore(cache, readonly=True)
    keys = [dict(e.keys) for _, e in store.iter_index() if e.ok]
    work = C.scratch_dir("compare-c-")
    notes: dict[str, str] = {}
    try:
        # Export the same arrays to each peer.
        npy = {kind: [] for kind in ("images", "tensors")}
        for kind in npy:
            (work / "npy" / kind).mkdir(parents=True)
        shapes: dict[str, list[tuple]] = {"images": [], "tensors": []}
        dtypes: dict[str, str] = {}
        with store.reader() as r:
            for i, k in enumerate(keys):
                for kind in ("images", "tensors"):
                    arr = r.get(kind, k[kind])["image"]
                    p = work / "npy" / kind / f"{i:06d}.npy"
                    np.save(p, arr)
                    npy[kind].append(p)
                    shapes[kind].append(arr.shape)
                    dtypes[kind] = str(arr.dtype)
        import diskcache

        dc = diskcache.Cache(str(work / "diskcache"), size_limit=2**40)
        for kind in npy:
            for i, p in enumerate(npy[kind]):
                dc.set(f"{kind}/{i}", p.read_bytes())  # the .npy bytes: header + raw data
        lit: dict[str, Any] = {}
        try:
            from litdata import StreamingDataset, optimize

            for kind in npy:
                out = work / "litdata" / kind
                started = time.perf_counter()
                optimize(fn=_litdata_item, inputs=[str(p) for p in npy[kind]],
                         output_dir=str(out), chunk_bytes="64MB", num_workers=1, verbose=False)
                C.log(f"c: litdata optimize {kind}: {time.perf_counter() - started:.1f} s")
                lit[kind] = StreamingDataset(str(out), cache_dir=str(work / "litdata-cache"))
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            notes["litdata"] = f"skipped: {type(exc).__name__}: {exc}"
            C.log(f"c: LitData {notes['litdata']}")

        slots = {kind: {s: np.empty(s, dtypes[kind]) for s in set(shapes[kind])}
                 for kind in shapes}

        def lmdb_read(kind: str, i: int) -> None:
            with store.reader() as r:
                a = r.get(kind, keys[i][kind])["image"]
                np.copyto(slots[kind][a.shape], a)

        def npy_load(kind: str, i: int) -> None:
            a = np.load(npy[kind][i])
            np.copyto(slots[kind][a.shape], a)

        def npy_mmap(kind: str, i: int) -> None:
            a = np.load(npy[kind][i], mmap_mode="r")
            np.copyto(slots[kind][a.shape], a)

        def dc_read(kind: str, i: int) -> None:
            raw = dc.get(f"{kind}/{i}")
            f = io.BytesIO(raw)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            a = np.frombuffer(raw, dtype=dtype, offset=f.tell()).reshape(shape)
            np.copyto(slots[kind][a.shape], a)

        def lit_read(kind: str, i: int) -> None:
            a = lit[kind][i]["a"]
            np.copyto(slots[kind][a.shape], a)

        peers = {"LMDB (this cache), zero-copy view + copy": lmdb_read,
                 ".npy, np.load + copy": npy_load,
                 ".npy, np.load(mmap_mode='r') + copy": npy_mmap,
                 "diskcache (bytes) + frombuffer + copy": dc_read}
        if lit:
            peers["LitData StreamingDataset[i] + copy"] = lit_read
        rng = np.random.default_rng(2)
        times: dict[str, dict[str, list[float]]] = {}
        for kind in ("images", "tensors"):
            for fn in peers.values():
                for i in rng.permutation(len(keys)):  # warm pass (page cache, chunk opens)
                    fn(kind, int(i))
            for _ in range(reps):
                order = rng.permutation(len(keys))
                for name, fn in peers.items():
                    started = time.perf_counter()
                    for i in order:
                        fn(kind, int(i))
                    times.setdefault(kind, {}).setdefault(name, []).append(
                        (time.perf_counter() - started) / len(keys))
        dc.close()
    finally:
        store.close()
        C.remove(work)
    stats = {kind: {name: C.summary(v) for name, v in per.items()}
             for kind, per in times.items()}
    rows = []
    for kind, per in stats.items():
        ref = per["LMDB (this cache), zero-copy view + copy"]
        for name, st in per.items():
            rows.append([kind, name, C.fmt_s(st, "ms", 3), C.fmt_x(C.ratio(st, ref))])
    table = C.md_table(["array", "reader", "per sample, median [min–max]", "÷ LMDB"], rows,
                       title=f"c. Peers: {len(keys)} records, random order, warm page cache, "
                             f"{reps} reps (images e.g. {shapes['images'][0]} {dtypes['images']}, "
                             f"tensors {shapes['tensors'][0]} {dtypes['tensors']}; each copied "
                             "into a preallocated slot of its own dtype)"
                       + (f"; LitData {notes['litdata']}" if "litdata" in notes else ""))
    TABLES.append(table)
    return {"records": len(keys), "per_sample": stats, "notes": notes}


# -- d. memory ------------------------------------------------------------------------------
def memory_run(cfg: str, workers: int, images: str, ann: str, cache: str, report: str,
               seed: int) -> dict[str, Any]:
    """Two shuffled epochs with persistent workers; memory sampled during the second."""
    with C.quiet_logging():
        ds = make_dataset(cfg, Path(images), Path(ann), Path(cache), report_dir=Path(report))
        loader = C.data_loader(ds, workers, batch_size=BATCH, shuffle=True, seed=seed)
        C.run_epoch(loader)
        with C.MemorySampler() as mem:
            e1, _ = C.run_epoch(loader)
        held = [json.loads(p.read_text()) for p in Path(report).glob("*.json")]
        del loader
        if hasattr(ds, "close"):
            ds.close()
    return {**mem.result(), "epoch2": e1,
            "dict_entries": sum(h["entries"] for h in held),
            "dict_bytes": sum(h["bytes"] for h in held)}


# The uncached row shows the batches in flight that every DataLoader has; NO_REUSE gives
# batch memory back after each batch (what memory_efficient does) instead of keeping slabs.
NO_REUSE = "validation_optimized, reuse_batch_memory off"
MEMORY_CONFIGS = ("validation_optimized", NO_REUSE, "dict cache (origin)", "none + load_maps")


def part_d(n: int, reps: int, workers: list[int]) -> dict[str, Any]:
    _, images, ann = C.dataset_root(n)
    cache = C.prebuilt_cache(n)
    C.warm_file(cache / "data.mdb")
    res: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(reps):
        for w in workers:
            for cfg in MEMORY_CONFIGS:
                C.log(f"d: rep {rep + 1}/{reps}, {w} workers, {cfg}")
                report = C.scratch_dir("compare-d-")
                try:
                    r = C.run_isolated("bench_compare", "memory_run", cfg=cfg, workers=w,
                                       images=images, ann=ann, cache=cache, report=report,
                                       seed=rep)
                finally:
                    C.remove(report)
                res.setdefault(str(w), {}).setdefault(cfg, []).append(r)
    stats = {w: {cfg: {k: C.summary([r[k] for r in rs]) for k in rs[0]}
                 for cfg, rs in per.items()} for w, per in res.items()}
    rows = []
    for w, per in stats.items():
        for cfg, st in per.items():
            held = ""
            if cfg.startswith("dict"):
                held = (f"{st['dict_entries']['median']:.0f} samples, "
                        f"{st['dict_bytes']['median'] / 2**20:.0f} MiB")
            rows.append([w, cfg, C.fmt_mib(st["pss_peak"]), C.fmt_mib(st["pss_less_shmem_peak"]),
                         C.fmt_mib(st["anon_peak"]), C.fmt_mib(st["pss_anon_peak"]),
                         C.fmt_mib(st["pss_shmem_peak"]), C.fmt_mib(st["pss_file_peak"]), held,
                         C.fmt_s(st["epoch2"])])
    table = C.md_table(
        ["workers", "approach", "PSS peak (sum)", "PSS less batches in flight",
         "Anonymous peak (sum)", "Pss_Anon", "Pss_Shmem (batches in flight)", "Pss_File",
         "dict cache holds (all processes)", "epoch 2"], rows,
        title=f"d. Memory during epoch 2 (persistent workers, shuffled, batch {BATCH}), "
              f"{n} images, {reps} reps, median [min–max]")
    growth = []
    lo, hi = str(min(workers)), str(max(workers))
    if lo == "0" and "1" in stats:
        lo = "1"
    for cfg in MEMORY_CONFIGS:
        a, b = stats.get(lo, {}).get(cfg), stats.get(hi, {}).get(cfg)
        if a and b:
            total = C.ratio(b["pss_peak"], a["pss_peak"])
            less = C.ratio(b["pss_less_shmem_peak"], a["pss_less_shmem_peak"])
            target = C.verdict(total, 1.2) if cfg.startswith("validation_optimized") else ""
            growth.append([cfg, C.fmt_x(total), C.fmt_x(less), target])
    table += "\n\n" + C.md_table(
        ["approach", f"PSS, {hi} workers ÷ {lo}", f"PSS less batches in flight, {hi} ÷ {lo}",
         "target ≤ 1.2× (total)"], growth)
    TABLES.append(table)
    return {"memory": stats}


# -- e. cold start ----------------------------------------------------------------------------
_COLD_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[4])
import common as C
from diskcache_ocr import CacheStore
cache, readahead, count = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
store = CacheStore(cache, readonly=True, readahead=readahead)
keys = [dict(e.keys) for _, e in store.iter_index() if e.ok]
step = max(1, len(keys) // count)
out = {}
for kind, name in (("tensors", "image"), ("images", "image"), ("maps", "thresh_map")):
    cold, warm = [], []
    for k in keys[::step][:count]:
        C.drop_page_cache(f"{cache}/data.mdb")
        t = time.perf_counter()
        with store.reader() as r:
            a = r.get(kind, k[kind])[name]
            slot = np.empty(a.shape, a.dtype)
            np.copyto(slot, a)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        with store.reader() as r:
            np.copyto(slot, r.get(kind, k[kind])[name])
        warm.append(time.perf_counter() - t)
    out[kind] = {"cold": cold, "warm": warm, "bytes": int(a.nbytes)}
store.close()
print(json.dumps(out))
"""


def part_e(n: int, reps: int) -> dict[str, Any]:
    from diskcache_ocr import CacheStore

    # On a copy: dropping pages and refilling them 4 KB at a time (read-ahead off) would leave
    # the shared cache in a state that slows every later warm read (see common.warm_file).
    work = C.scratch_dir("compare-e-")
    with CacheStore(C.prebuilt_cache(n), readonly=True) as src:
        cache = src.copy_to(work / "cache")
    count = max(reps, 8)
    res: dict[str, Any] = {}
    try:
        for readahead in (True, False):
            C.log(f"e: cold reads, readahead={readahead}")
            proc = subprocess.run(
                [sys.executable, "-c", _COLD_CHILD, str(cache), "1" if readahead else "0",
                 str(count), str(C.BENCH_DIR)], capture_output=True, text=True, check=True)
            res["on" if readahead else "off"] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        C.remove(work)
    stats = {ra: {kind: {"cold": C.summary(d["cold"]), "warm": C.summary(d["warm"]),
                         "bytes": d["bytes"]} for kind, d in per.items()}
             for ra, per in res.items()}
    rows = []
    for kind in ("tensors", "images", "maps"):
        on, off = stats["on"][kind], stats["off"][kind]
        rows.append([f"{kind} ({on['bytes'] / 1e6:.1f} MB)", C.fmt_s(on["cold"], "ms"),
                     C.fmt_s(off["cold"], "ms"), C.fmt_x(C.ratio(off["cold"], on["cold"]), 1),
                     C.fmt_s(on["warm"], "ms", 3)])
    table = C.md_table(
        ["first read after dropping data.mdb from the page cache", "read-ahead on",
         "read-ahead off", "off ÷ on", "warm read (reference)"], rows,
        title=f"e. Cold start: {count} records per kind, each read right after "
              "POSIX_FADV_DONTNEED on data.mdb (guest page cache; the host may still cache "
              "the disk), median [min–max]")
    TABLES.append(table)
    return {"cold_start": stats, "records_per_kind": count}


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c,d,e")
    parser.add_argument("--workers", default="0,1,2", help="worker counts for part b")
    parser.add_argument("--mem-workers", default="0,1,2,4", help="worker counts for part d")
    parser.add_argument("--configs", default=",".join(EPOCH_CONFIGS),
                        help="approaches for part b")
    args = parser.parse_args(argv)
    C.configure(args)
    n = C.n_images(args)
    reps = C.reps(args)
    parts = set(args.parts.split(","))
    payload: dict[str, Any] = {"images": n, "reps": reps, "batch_size": BATCH,
                               "pid": os.getpid()}
    runners = {
        "a": lambda: part_a(n, reps, args.quick),
        "b": lambda: part_b(n, reps, [int(w) for w in args.workers.split(",")],
                            args.configs.split(",")),
        "c": lambda: part_c(n, reps),
        "d": lambda: part_d(n, reps, [int(w) for w in args.mem_workers.split(",")]),
        "e": lambda: part_e(n, reps),
    }
    for key, run in runners.items():
        if key in parts:
            started = time.perf_counter()
            payload[key] = run()
            payload[key]["seconds"] = time.perf_counter() - started
            C.log(f"part {key}: {payload[key]['seconds']:.0f} s")
    C.write_result(NAME, payload, "\n".join(TABLES))
    return payload


if __name__ == "__main__":
    main()
