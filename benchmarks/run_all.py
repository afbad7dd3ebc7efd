"""Run the benchmark suite: ``./dev.sh bench [--quick] [--only NAME[,NAME]]``.

Each benchmark runs in its own interpreter (so one benchmark's memory never shows up in the
next one's figures), writes ``benchmarks/results/<name>.json`` (and ``<name>.md``) and prints
its markdown table. ``--quick`` uses a small synthetic set and is a smoke run of a few
minutes that writes to ``benchmarks/results/quick/`` (and skips ``loader``, which has no
such option); the full run synthesizes 200 receipt-like images once (``benchmarks/.data``).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> (module, arguments for the full run, arguments for --quick). Every module but
# bench_loader understands --quick itself; bench_loader gets its small sizes spelled out.
QUICK_FLAG_FREE = {"bench_loader"}
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "store": ("bench_store", [], []),
    "prebuild": ("bench_prebuild", [], []),
    "presets": ("bench_presets", [], ["--presets", "validation_optimized"]),
    "compare": ("bench_compare", [], [
        "--workers", "2", "--mem-workers", "0,2",
        "--configs", "none + load_maps,validation_optimized,dict cache (origin),npz maps"]),
    "scaling": ("scaling", ["--workers", "1,2"], ["--workers", "1,2"]),
    "loader": ("bench_loader", [], ["--n", "16", "--workers", "0,2"]),
    "maps": ("bench_maps", [], []),
    "pipeline": ("bench_pipeline", ["--images", "48"], ["--images", "8"]),
    "compact": ("bench_compact", ["--images", "80"], []),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, passthrough = p.parse_known_args(argv)
    if args.list:
        for name, (module, _, _) in BENCHMARKS.items():
            doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
            print(f"{name:10s} {module}.py  {doc}")
        return 0
    names = list(BENCHMARKS) if not args.only else args.only.split(",")
    if args.quick and not args.only:
        # bench_loader always writes results/loader.json: a smoke run leaves it alone.
        names = [n for n in names if BENCHMARKS[n][0] not in QUICK_FLAG_FREE]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    for name in names:  # fail early on an import error, before any long run
        importlib.import_module(BENCHMARKS[name][0])
    failed = []
    started_all = time.perf_counter()
    for name in names:
        module, full, quick = BENCHMARKS[name]
        quick_args = quick if module in QUICK_FLAG_FREE else ["--quick", *quick]
        cmd = [sys.executable, str(HERE / f"{module}.py"),
               *(quick_args if args.quick else full), *passthrough]
        print(f"\n## {name}  ({' '.join(cmd[1:])})\n", flush=True)
        started = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"\n({name}: {time.perf_counter() - started:.0f} s, exit {rc})", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"\nsuite: {time.perf_counter() - started_all:.0f} s; results in "
          f"{(HERE / 'results').relative_to(HERE.parent)}/", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
