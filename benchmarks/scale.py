"""The factory on a multi-node Ray cluster simulated on this machine (tests/simcluster.py: a
head that runs only the driver, `gen` nodes and one `label` node, tiny models): samples/s as
the gen nodes go from 1 to 2 to 4, the driver's peak RSS as n grows (it must stay flat: no
sample passes through it), and the busy fraction of the generator actors (idle work units and
the last wave count against it).

    uv run python benchmarks/scale.py                    # about 10 minutes on 2 CPU cores
    uv run python benchmarks/scale.py --gen-nodes 1 2 --rss-n 64 --steps 50

All nodes share this machine's cores, so samples/s can only grow as far as the cores allow:
read the scaling figures with the machine's core count beside them. Prints a table and writes
benchmarks/results/scale.json.

With --no-model, the plan and the writer alone at n = 10^4 ... 10^7: the run's own work units,
read tasks, shard writer and manifest, with a pass-through stage that turns each spec into a
row of constant payload, on a local Ray, one driver process per n. It reports the driver's peak
RSS, the planning time (shards to do, work units, read tasks), the most Ray objects the driver
owned at once, the manifest bytes written per shard, and the resume check of the finished
folder (every footer and record read). Writes benchmarks/results/scale-no-model.json.

    uv run python benchmarks/scale.py --no-model --no-model-n 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
# the local Ray's workers share this interpreter: under `uv run`, Ray's uv hook (read when ray
# is first imported) would start every worker through `uv run` again
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

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


class PassThrough:
    """Specs -> rows of the triplet schema whose payload is the template's: a pass-through
    stage, run as the pipeline runs its stages (an actor pool), so that what the writer sees
    is the pipeline's, without the models."""

    def __init__(self, template) -> None:
        self.template = template

    def __call__(self, batch):
        import pyarrow as pa

        n = len(batch["index"])
        table = self.template.take(pa.array([0] * n))
        for name in ("index", "prompt", "noise_seed"):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(batch[name].tolist(), table.schema.field(name).type))
        return table


def no_model_child(n: int, args: argparse.Namespace) -> dict:
    """One no-model run in this process (a fresh driver): the figures of `no_model`."""
    import resource

    import numpy as np
    import ray

    from actors.batch import object_column
    from factory.graph import READ_TASKS, unit_specs_dataset
    from factory.integrity import check_on_resume
    from factory.prompts import SamplePlan
    from factory.schema import encode_masks, to_triplets
    from factory.store import ShardStore
    from factory.units import work_unit_source, work_units
    from factory.vocab import get_split
    from factory.writer import ShardWriter

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    rss_ray = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    template = to_triplets({
        "index": np.zeros(1, np.int64), "prompt": np.array(["a photograph of a cat"], object),
        "noise_seed": np.zeros(1, np.int64), "classes": object_column([["cat"]]),
        "class_ids": object_column([[8]]), "image": np.zeros((1, 8, 8, 3), np.uint8),
        "x_t": np.zeros((1, 4, 1, 1), np.float16), "t": np.ones(1, np.int32),
        "masks": object_column([encode_masks(np.zeros((1, 8, 8), bool))]),
        "scores": object_column([[1.0]]), "areas": object_column([[0]])},
        split="pascal", fold="1", subset="train", run_seed=0, sd_model="none", detector="none")
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        start = time.perf_counter()
        run = {"kind": "triplets", "split": "pascal", "fold": "1", "subset": "train", "n": n,
               "seed": 0, "shard_size": args.shard_size}
        store = ShardStore.create_or_resume(os.path.join(tmp, "out"), run, seen=[], unseen=[])
        plan = SamplePlan(get_split("pascal", "1"), "train", 0)
        todo = store.todo()
        unit = args.batch_size
        spans = work_units(store.layout, todo, unit)
        source = work_unit_source(plan, spans, unit)
        tasks = source.get_read_tasks(READ_TASKS)
        planning = time.perf_counter() - start
        ds = unit_specs_dataset(plan, spans, unit).map_batches(
            PassThrough, fn_constructor_kwargs={"template": template}, batch_size=None,
            num_cpus=0.25, compute=ray.data.ActorPoolStrategy(size=1))
        owned = [0]

        def count_objects(_):
            refs = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
            owned[0] = max(owned[0], len(refs))

        w = ShardWriter(store, todo, on_progress=count_objects).run(ds)
        seconds = time.perf_counter() - start
        resume_start = time.perf_counter()
        check_on_resume(ShardStore.open(store.root))
        resume = time.perf_counter() - resume_start
        manifest_bytes = store._manifest.bytes_written
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    return {"n": n, "shards": w.shards, "written": w.written,
            "units": int((spans[:, 1] - spans[:, 0]).sum()),
            "read_tasks": len(tasks), "planning_s": round(planning, 3),
            "run_s": round(seconds, 1), "samples_per_s": round(w.written / seconds, 1),
            "driver_peak_rss_mb": round(rss, 1),
            "driver_rss_before_ray_mb": round(rss0, 1), "driver_rss_with_ray_mb": round(rss_ray, 1),
            "driver_objects_peak": owned[0],
            "manifest_bytes_per_shard": round(manifest_bytes / max(w.shards, 1)),
            "resume_check_s": round(resume, 2)}


def no_model(args: argparse.Namespace) -> None:
    rows = []
    for n in args.no_model_n:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            path = os.path.join(tmp, "child.json")
            cmd = [sys.executable, __file__, "--child", str(n), "--child-out", path,
                   "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"the run at n = {n} failed:\n{proc.stderr[-3000:]}")
            with open(path) as f:
                r = json.load(f)
        rows.append(r)
        print(f"n = {n}: {r['shards']} shards in {r['run_s']} s; driver peak RSS "
              f"{r['driver_peak_rss_mb']:.0f} MB, planning {r['planning_s']} s, "
              f"{r['driver_objects_peak']} objects at most, "
              f"{r['manifest_bytes_per_shard']} manifest bytes per shard, resume check "
              f"{r['resume_check_s']} s", flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{os.cpu_count()} CPU cores, no GPU; a local Ray",
        "stage": "pass-through (specs -> rows of constant payload), no model",
        "batch_size": args.batch_size, "shard_size": args.shard_size, "runs": rows,
    }
    print("\n| n | shards | driver peak RSS (MB) | planning (s) | driver objects, peak "
          "| manifest bytes / shard | resume check (s) | run (s) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']:,} | {r['shards']:,} | {r['driver_peak_rss_mb']:.0f} | "
              f"{r['planning_s']} | {r['driver_objects_peak']} | "
              f"{r['manifest_bytes_per_shard']} | {r['resume_check_s']} | {r['run_s']} |")
    out = args.out.replace("scale.json", "scale-no-model.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten to {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gen-nodes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n", type=int, default=96, help="Samples per scaling run.")
    p.add_argument("--rss-n", type=int, nargs="+", default=[64, 512],
                   help="Sample counts for the driver-memory runs (on 2 gen nodes).")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the tiny SD.")
    p.add_argument("--batch-size", type=int, default=None,
                   help="[default: 4; with --no-model, 16 as `factory generate`]")
    p.add_argument("--shard-size", type=int, default=None,
                   help="[default: 16; with --no-model, 256 as `factory generate`]")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"))
    p.add_argument("--no-model", action="store_true",
                   help="The plan and the writer alone, with a pass-through stage.")
    p.add_argument("--no-model-n", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one no-model run
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    no_model_run = args.no_model or args.child
    args.batch_size = args.batch_size or (16 if no_model_run else 4)
    args.shard_size = args.shard_size or (256 if no_model_run else 16)
    if args.child:
        with open(args.child_out, "w") as f:
            json.dump(no_model_child(args.child, args), f)
        return
    if args.no_model:
        no_model(args)
        return

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
