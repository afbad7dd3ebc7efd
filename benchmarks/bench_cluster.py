"""Two simulated nodes against one: `prebuild` of one split under torch.distributed.

    python benchmarks/bench_cluster.py [--images 200] [--reps 2]

One node of one process (`diskcache-ocr prebuild --workers 1`) against two nodes of one
process each on this host (the environment torchrun's static rendezvous gives each process,
gloo on 127.0.0.1, each node its own cache directory): wall time of the whole command, and
each node's cache compared with the single node's record for record (every kind's keys and
the blake3 of every value). Writes ``benchmarks/results/cluster.json`` and ``cluster.md``.
Nothing is asserted; the target is two nodes in ≤ 0.6× the one node's time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prebuild(images: Path, annotations: Path, caches: list[Path]) -> tuple[float, list[dict]]:
    argv = ["-m", "diskcache_ocr.cli", "prebuild", "--images", str(images),
            "--annotations", str(annotations), "--json", "--workers", "1"]
    port = str(_port())
    procs = []
    t = time.perf_counter()
    for rank, cache in enumerate(caches):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if len(caches) > 1:
            env.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(len(caches)),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *argv, "--cache", str(cache)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode != 0:
            sys.exit(stderr[-3000:])
        out.append(json.loads(stdout))
    return time.perf_counter() - t, out


def _records(cache: Path) -> dict[str, dict[bytes, str]]:
    from diskcache_ocr.store import KINDS, CacheStore

    with CacheStore(cache, readonly=True) as store:
        return {kind: {bytes(k): blake3.blake3(bytes(v)).hexdigest()
                       for k, v in store.iter_raw(kind)} for kind in KINDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    from diskcache_ocr.synth import split_paths, synthesize

    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    synthesize(root, args.images, seed=5, workers=2)
    images, annotations = split_paths(root)
    one, two, same = [], [], []
    for rep in range(args.reps):
        single = root / f"single-{rep}"
        t1, _ = _prebuild(images, annotations, [single])
        nodes = [root / f"node{n}-{rep}" for n in (0, 1)]
        t2, summaries = _prebuild(images, annotations, nodes)
        want = _records(single)
        same.append(all(_records(n) == want for n in nodes))
        one.append(t1)
        two.append(t2)
        print(f"rep {rep}: one node {t1:.1f} s, two nodes {t2:.1f} s "
              f"(built {[s['built'] for s in summaries]}, received "
              f"{[s['received'] for s in summaries]}), equal record for record: {same[-1]}",
              flush=True)
    ratio = statistics.median(two) / statistics.median(one)
    result = {"args": vars(args), "one_node_s": one, "two_nodes_s": two,
              "equal_record_for_record": same, "ratio": ratio, "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(result, indent=1))
    text = (f"prebuild of {args.images} images (`validation_optimized`), median of "
            f"{args.reps}: one node of one process {statistics.median(one):.1f} s, two "
            f"simulated nodes of one process each {statistics.median(two):.1f} s: "
            f"**{ratio:.2f}×**; every node's cache equal to the single node's record for "
            f"record: {all(same)}.\n")
    (out / "cluster.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
