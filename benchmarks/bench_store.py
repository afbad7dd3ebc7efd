"""Per-read cost of one 640×640×3 float32 record (4.9 MB), warm in the page cache.

Measures, each as the mean over many calls per repetition, median of repetitions:

* zero-copy get: ``with store.reader() as r: r.get(kind, key)["image"]`` (bytes untouched)
* zero-copy get + one copy into a preallocated batch slot (what the dataset does)
* copying get: ``store.get(kind, key)`` (owned, writeable arrays)
* ``np.load`` of the same array saved as ``.npy`` (and ``mmap_mode='r'`` + copy)
* ``np.copyto`` between two preallocated arrays: the memory-bandwidth limit

Targets: zero-copy < 5 % of one memcpy; copying get within 1.5× of a memcpy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

NAME = "store"


def main(argv: list[str] | None = None) -> dict:
    args = C.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    C.configure(args)
    import numpy as np

    from diskcache_ocr import CacheStore

    reps = max(5, C.reps(args))
    iters = 40 if args.quick else 300
    shape = (640, 640, 3)
    rng = np.random.default_rng(0)
    arr = rng.standard_normal(shape, dtype=np.float32)
    work = C.scratch_dir("store-")
    try:
        store = CacheStore(work / "cache")
        key = b"k" * 32
        # A few neighbours so the record is not the only value in the file.
        for i in range(4):
            store.put("tensors", bytes([i]) * 32, {"image": arr + i})
        store.put("tensors", key, {"image": arr})
        npy = work / "image.npy"
        np.save(npy, arr)
        dst = np.empty_like(arr)
        src = arr.copy()

        with store.reader() as r:  # warm the pages and check the layout once
            view = r.get("tensors", key)["image"]
            assert np.array_equal(view, arr)
            aligned = view.ctypes.data % 64 == 0
            np.copyto(dst, view)

        def zero_copy() -> None:
            with store.reader() as r:
                r.get("tensors", key)["image"]

        def zero_copy_into_slot() -> None:
            with store.reader() as r:
                np.copyto(dst, r.get("tensors", key)["image"])

        def copying_get() -> None:
            store.get("tensors", key)

        def npy_load() -> None:
            np.load(npy)

        def npy_mmap_copy() -> None:
            np.copyto(dst, np.load(npy, mmap_mode="r"))

        def memcpy() -> None:
            np.copyto(dst, src)

        cases = {
            "memcpy (np.copyto, preallocated)": memcpy,
            "zero-copy get (bytes untouched)": zero_copy,
            "zero-copy get + copy into batch slot": zero_copy_into_slot,
            "copying get (store.get)": copying_get,
            "np.load(.npy)": npy_load,
            "np.load(.npy, mmap_mode='r') + copy into slot": npy_mmap_copy,
        }
        for fn in cases.values():  # warm-up
            for _ in range(5):
                fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(reps):  # interleaved, so drift hits every case alike
            for name, fn in cases.items():
                times[name].append(C.per_call(fn, iters))
        store.close()
    finally:
        C.remove(work)

    stats = {k: C.summary(v) for k, v in times.items()}
    base = stats["memcpy (np.copyto, preallocated)"]
    targets = {
        "zero-copy get (bytes untouched)": ("< 0.05× memcpy", 0.05),
        "copying get (store.get)": ("≤ 1.5× memcpy", 1.5),
    }
    rows = []
    for name, st in stats.items():
        r = C.ratio(st, base)
        tgt = targets.get(name)
        rows.append([name, C.fmt_s(st, "us", 1), C.fmt_x(r, 3),
                     tgt[0] if tgt else "", C.verdict(r, tgt[1]) if tgt else ""])
    gbps = arr.nbytes / base["median"] / 1e9
    table = C.md_table(
        ["read of one 4.9 MB float32 record", "per read, median [min–max]", "÷ memcpy",
         "target", "verdict"], rows,
        title=f"Store: per-read cost, {arr.nbytes / 1e6:.1f} MB record, warm "
              f"(memcpy {gbps:.1f} GB/s; {reps} reps × {iters} reads; value 64-byte aligned: "
              f"{aligned})")
    payload = {
        "record_bytes": int(arr.nbytes), "shape": list(shape), "dtype": "float32",
        "iterations_per_rep": iters, "reps": reps, "aligned_64": bool(aligned),
        "memcpy_gbps": gbps,
        "cases": {k: {**v, "ratio_to_memcpy": C.ratio(v, base)} for k, v in stats.items()},
        "targets": {k: {"target": t[0], "ratio": C.ratio(stats[k], base),
                        "met": C.verdict(C.ratio(stats[k], base), t[1]) == "met"}
                    for k, t in targets.items()},
        "pid": os.getpid(),
    }
    C.write_result(NAME, payload, table)
    return payload


if __name__ == "__main__":
    main()
