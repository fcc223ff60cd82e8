"""The factory on a multi-node Ray cluster simulated on this machine (tests/simcluster.py: a
head that runs only the driver, `gen` nodes and one `label` node, tiny models): samples/s as
the gen nodes go from 1 to 2 to 4, the driver's peak RSS as n grows (it must stay flat: no
sample passes through it), and the busy fraction of the generator actors (idle work units and
the last wave count against it).

    python benchmarks/scale.py                    # about 10 minutes on 2 CPU cores
    python benchmarks/scale.py --gen-nodes 1 2 --rss-n 64 --steps 50

All nodes share this machine's cores, so samples/s can only grow as far as the cores allow:
read the scaling figures with the machine's core count beside them. Prints a table and writes
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from simcluster import driver, simulated_cluster  # noqa: E402

FINAL = re.compile(r"wrote (\d+) samples .* in ([\d.]+) s, ([\d.]+) images/s.*"
                   r"generator actors busy (\d+)%")


def run(cluster, n: int, args: argparse.Namespace) -> dict:
    """One `factory generate` run on `cluster`, as its own driver process."""
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        report = os.path.join(tmp, "report.json")
        argv = ["generate", "--address", cluster.address, "--out", os.path.join(tmp, "out"),
                "--split", "pascal", "--n", str(n), "--model", "tiny",
                "--steps", str(args.steps), "--shard-size", str(args.shard_size),
                "--batch-size", str(args.batch_size), "--label-batch-size",
                str(args.batch_size)]
        start = time.perf_counter()
        proc = driver(argv, report=report)
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"the run failed:\n{err[-3000:]}")
        with open(report) as f:
            rss = json.load(f)["peak_rss_mb"]
    m = FINAL.search(out)
    return {"n": n, "wall_s": round(wall, 1), "run_s": float(m[2]),
            "samples_per_s": float(m[3]), "generator_busy": int(m[4]) / 100,
            "driver_peak_rss_mb": round(rss, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gen-nodes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n", type=int, default=96, help="Samples per scaling run.")
    p.add_argument("--rss-n", type=int, nargs="+", default=[64, 512],
                   help="Sample counts for the driver-memory runs (on 2 gen nodes).")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the tiny SD.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"))
    args = p.parse_args()

    scaling = []
    for nodes in args.gen_nodes:
        with simulated_cluster(gen_nodes=nodes, label_nodes=1) as cluster:
            r = run(cluster, args.n, args)
        scaling.append({"gen_nodes": nodes, **r})
        print(f"{nodes} gen nodes: {r['samples_per_s']:.2f} samples/s, generator actors busy "
              f"{r['generator_busy']:.0%}", flush=True)
    memory = []
    with simulated_cluster(gen_nodes=2, label_nodes=1) as cluster:
        for n in args.rss_n:
            r = run(cluster, n, argparse.Namespace(**{**vars(args), "steps": 3}))
            memory.append(r)
            print(f"n = {n}: driver peak RSS {r['driver_peak_rss_mb']:.0f} MB", flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{os.cpu_count()} CPU cores, no GPU; one simulated node per process group",
        "model": "tiny (random weights, 64x64)",
        "scaling": scaling, "driver_memory": memory,
    }
    print("\n| gen nodes | samples/s | generator busy |\n| --- | --- | --- |")
    for r in scaling:
        print(f"| {r['gen_nodes']} | {r['samples_per_s']:.2f} | {r['generator_busy']:.0%} |")
    print("\n| n | driver peak RSS (MB) |\n| --- | --- |")
    for r in memory:
        print(f"| {r['n']} | {r['driver_peak_rss_mb']:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
