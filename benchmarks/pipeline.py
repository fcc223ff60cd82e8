"""The whole `factory generate` pipeline on one GPU against the generator stage alone.

The pipeline (SD generator, Mask R-CNN labeller, shard writer) at the SD-1.5 size, against the
generator stage alone on the same GPU in the same run.

    python benchmarks/pipeline.py                       # on the GPU machine
    python benchmarks/pipeline.py --model tiny --detector tiny --device cpu --n 32 \\
        --batch-size 4 --label-batch-size 4 --shard-size 4   # a smoke run on a CPU

In order, each figure merged into benchmarks/results/pipeline-CARD.json as soon as it is
measured (benchmarks/record.py): the Mask R-CNN labeller alone, with random weights saved to a
file (none can be downloaded; factory/speeds.py reads this figure for the labeller pools); the
generator stage alone, timed in a new process with the actors' thread count (Ray gives an actor
of a quarter CPU OMP_NUM_THREADS=1), so that it fills the compile cache the pipeline's
generator actor then loads from; then the pipeline, on one GPU split between the two pools by
the stages' measured speeds (the labeller's share is the generator's rate over its own).

`pipeline_over_stage` is the pipeline's steady rate over the generator alone. Steady: the
images of the shards done inside a window that opens when the first shard is done (Ray's start,
the model loads, the compile and the pipeline's fill are behind it) and closes when the last
wave starts to drain (the last shard of each generator actor left out), divided by the window's
length. A shard is done when its last labeller call ends: the driver sees each shard's stage
call spans as it is written (ShardWriter._written, wrapped for the run), so the window does not
depend on when the writer got to it; where no spans came back, the shards' written_at times are
used. A timeline (each shard's spans and write, in seconds after submission) is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.batch import object_column  # noqa: E402
from actors.maskrcnn_labeller import MaskRCNNLabeller  # noqa: E402
from actors.names import SD15_RANDOM  # noqa: E402
from actors.sd_generator import SDGenerator  # noqa: E402
from benchmarks.record import provenance, results_path, sync, update_result  # noqa: E402
from factory.options import GenerateOptions  # noqa: E402
from factory.pipeline import generate  # noqa: E402
from factory.pools import connect_ray  # noqa: E402
from factory.prompts import SamplePlan  # noqa: E402
from factory.vocab import get_split  # noqa: E402
from factory.writer import ShardWriter  # noqa: E402


def random_detector_weights(path: str) -> str:
    """torchvision Mask R-CNN v2 with random weights (seeded), saved as a state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), path)
    return path


def sample_batch(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    plan = SamplePlan(get_split("pascal", "1"), "train", seed=0)
    specs = [plan.sample(offset + i) for i in range(n)]
    return {"prompt": np.array([s.prompt for s in specs], dtype=object),
            "noise_seed": np.array([s.noise_seed for s in specs], dtype=np.int64),
            "classes": object_column([list(s.classes) for s in specs])}


def time_labeller(a, weights: str | None, image_size: int) -> float:
    """Mask R-CNN labeller images/s alone, on random images of the generator's size."""
    labeller = MaskRCNNLabeller("pascal", detector=a.detector, weights=weights,
                                device=a.device)
    rng = np.random.default_rng(0)
    batch = sample_batch(a.label_batch_size)
    batch["image"] = rng.integers(0, 256, (a.label_batch_size, image_size, image_size, 3),
                                  dtype=np.uint8)
    labeller(batch)  # warm-up
    sync(a.device)
    start = time.perf_counter()
    for _ in range(a.label_batches):
        labeller(batch)
    sync(a.device)
    rate = a.label_batches * a.label_batch_size / (time.perf_counter() - start)
    del labeller
    return rate


def time_stage_alone(a) -> dict:
    """In this process (the child of stage_alone): the generator stage's warm-up, then its
    images/s over `--stage-batches` batches."""
    gen = SDGenerator(a.model, device=a.device, precision=a.precision, batch_size=a.batch_size,
                      compile_cache=a.compile_cache)
    warm = gen.warm_up()
    batches = [sample_batch(a.batch_size, offset=i * a.batch_size)
               for i in range(a.stage_batches)]
    sync(a.device)
    start = time.perf_counter()
    for b in batches:
        gen(b)
    sync(a.device)
    return {"images_per_s": a.stage_batches * a.batch_size / (time.perf_counter() - start),
            "warm_up_s": warm, "threads": torch.get_num_threads()}


def stage_alone(a) -> dict:
    """The generator stage alone, in a new process with the thread count of a stage actor."""
    cmd = [sys.executable, os.path.abspath(__file__), "--stage-alone-only", "--model", a.model,
           "--device", a.device, "--batch-size", str(a.batch_size),
           "--stage-batches", str(a.stage_batches)]
    cmd += ["--precision", a.precision] if a.precision else []
    cmd += ["--compile-cache", a.compile_cache] if a.compile_cache else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


class ShardSpans:
    """Each shard's rows, write time and per-stage call span (first start, last end), as the
    driver's ShardWriter receives them: the shard records keep only the write time, and the
    run's result only each actor's whole span."""

    def __init__(self) -> None:
        self.shards: list[dict] = []

    def add(self, done: dict) -> None:
        record = done["record"]
        spans = {stage: [min(s for _, s, _ in per.values()), max(e for _, _, e in per.values())]
                 for stage, per in done["busy"].items() if per}
        self.shards.append({"rows": record["rows"] + len(record["dropped"]),
                            "written_at": record["written_at"], "spans": spans})

    @contextlib.contextmanager
    def recording(self):
        """While open, every shard ShardWriter writes in this process is added."""
        original = ShardWriter._written

        def written(writer, k: int, done: dict) -> None:
            self.add(done)
            original(writer, k, done)

        ShardWriter._written = written
        try:
            yield self
        finally:
            ShardWriter._written = original


def steady_window(shards: list[dict], last_stage: str, waves: int) -> dict | None:
    """The steady rate: the images of the shards done after the first one and before the last
    `waves` (the last wave draining), over the time from the first shard done to the last one
    counted. A shard is done when `last_stage`'s last call for it ends, else when it was
    written. None with fewer than three shards beyond the last wave."""
    done = sorted((s["spans"][last_stage][1] if last_stage in s["spans"] else s["written_at"],
                   s["rows"]) for s in shards)
    inside = done[1:len(done) - waves]
    if len(inside) < 2 or inside[-1][0] <= done[0][0]:
        return None
    images = sum(rows for _, rows in inside)
    return {"images_per_s": images / (inside[-1][0] - done[0][0]), "images": images,
            "shards": len(inside), "from": done[0][0], "to": inside[-1][0],
            "done_by": last_stage if all(last_stage in s["spans"] for s in shards)
            else "written_at"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM)
    p.add_argument("--detector", default="torchvision", help="torchvision | tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=160, help="samples to generate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--label-batch-size", type=int, default=8,
                   help="[default: `factory generate`'s]")
    p.add_argument("--label-batches", type=int, default=4, help="timed labeller batches")
    p.add_argument("--stage-batches", type=int, default=4,
                   help="timed batches of the generator alone")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--precision", default=None, help="[default: the stage's]")
    p.add_argument("--compile-cache", default=None, help="[default: the stage's]")
    p.add_argument("--stage-alone-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/pipeline-CARD.json, e.g. pipeline-h200]")
    a = p.parse_args()
    if a.stage_alone_only:  # the child process of stage_alone()
        print(json.dumps(time_stage_alone(a)))
        return
    a.out = a.out or results_path("pipeline", a.device)
    work = tempfile.mkdtemp(prefix="factory-pipeline-")
    update_result(a.out, **provenance(a.device), model=a.model, detector=a.detector, n=a.n,
                  batch_size=a.batch_size, label_batch_size=a.label_batch_size,
                  shard_size=a.shard_size)
    weights = (random_detector_weights(os.path.join(work, "maskrcnn-random.pth"))
               if a.detector == "torchvision" else None)
    image_size = 64 if a.model == "tiny" else 512
    label_rate = time_labeller(a, weights, image_size)
    update_result(a.out, labeller_alone_images_per_s=label_rate)
    alone = stage_alone(a)
    gen_rate = alone["images_per_s"]
    update_result(a.out, stage_alone_images_per_s=gen_rate,
                  stage_alone_warm_up_s=alone["warm_up_s"], stage_alone_threads=alone["threads"],
                  stage_alone_from="timed in this run, a new process")
    # the labeller's GPU share is the time it needs per generated image
    label_share = round(min(0.5, gen_rate / label_rate), 2) if a.device.startswith("cuda") else None
    update_result(a.out, label_gpu_share=label_share)
    start = time.time()
    connect_ray(None)
    ray_start = time.time() - start
    update_result(a.out, ray_start_s=ray_start)
    o = GenerateOptions(
        out=os.path.join(work, "triplets"), split="pascal", n=a.n, model=a.model,
        detector=a.detector, detector_weights=weights, batch_size=a.batch_size,
        label_batch_size=a.label_batch_size, shard_size=a.shard_size, precision=a.precision,
        compile_cache=a.compile_cache, generators=1, labellers=1,
        gen_gpus=1 - label_share if label_share else None, label_gpus=label_share)
    submitted = time.time()
    with ShardSpans().recording() as spans:
        r = generate(o)
    window = steady_window(spans.shards, "labeller", waves=1)  # one generator actor
    gen_spans = [s["spans"]["generator"] for s in spans.shards if "generator" in s["spans"]]
    in_pipeline = (a.n / (max(e for _, e in gen_spans) - min(s for s, _ in gen_spans))
                   if gen_spans else None)
    steady = window["images_per_s"] if window else None

    def after(t: float) -> float:
        return round(t - submitted, 3)

    timeline = [{"rows": s["rows"], "written_s": after(s["written_at"]),
                 **{f"{stage}_s": [after(t) for t in span] for stage, span in s["spans"].items()}}
                for s in sorted(spans.shards, key=lambda s: s["written_at"])]
    update_result(
        a.out, warm_up_s=r.warm_up_s,
        steady_window=({**window, "from": after(window["from"]), "to": after(window["to"])}
                       if window else "too few shards: raise --n"),
        steady_images_per_s=steady,
        pipeline_over_stage=steady / gen_rate if steady else None,
        generator_in_pipeline_images_per_s=in_pipeline,
        wall_s=r.seconds, overall_images_per_s=r.images_per_s, busy=r.busy,
        timeline_s=timeline)
    print(f"labeller alone {label_rate:.1f} images/s -> GPU share {label_share}; stage alone "
          f"{gen_rate:.2f} images/s (warm-up {alone['warm_up_s']:.1f} s, a new process)")
    print(f"Ray start {ray_start:.1f} s; warm-up {r.warm_up_s}; overall {r.images_per_s:.2f} "
          f"images/s over {r.seconds:.1f} s; the generator in the pipeline "
          f"{in_pipeline or 0:.2f} images/s")
    if window:
        print(f"steady {steady:.2f} images/s over {window['shards']} shards "
              f"({after(window['from']):.1f}-{after(window['to']):.1f} s after submission): "
              f"pipeline_over_stage {steady / gen_rate:.3f} -> {a.out}")
    else:
        print(f"too few shards for a steady window: raise --n -> {a.out}")


if __name__ == "__main__":
    main()
