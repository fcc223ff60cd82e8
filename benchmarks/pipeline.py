"""The whole `factory generate` pipeline (SD generator, Mask R-CNN labeller, shard writer) on
one GPU, at the SD-1.5 size, against the generator stage alone.

    python benchmarks/pipeline.py                       # on the GPU machine, after generate.py
    python benchmarks/pipeline.py --model tiny --detector tiny --device cpu --n 32 \\
        --batch-size 4 --shard-size 4                   # a smoke run on a CPU

The Mask R-CNN labeller gets random weights saved to a file (none can be downloaded) and is
timed alone first; the GPU is then split between the two pools by the stages' measured speeds
(the labeller's share is the generator's rate over its own). The generator's rate alone comes
from benchmarks/results/generate-CARD.json when that was measured on this card, else it is
timed here. Steady state runs from the generator's first call (after Ray's start, the model loads
and the compile) to the last shard's write; Ray's own start is timed apart, and the stages'
call spans and the shards' write times are kept as a timeline. Writes
benchmarks/results/pipeline-CARD.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from benchmarks.generate import (  # noqa: E402
    device_name,
    results_path,
    sync,
    write_result,
)
from factory.pipeline import GenerateOptions, generate  # noqa: E402
from factory.pools import connect_ray  # noqa: E402
from factory.prompts import SamplePlan  # noqa: E402
from factory.store import ShardStore  # noqa: E402
from factory.vocab import get_split  # noqa: E402


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


def time_labeller(a, weights: str, image_size: int) -> float:
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


def stage_alone(a) -> tuple[float, str]:
    """The generator stage's images/s alone: generate.json's figure from this card, else timed
    here (two batches after a warm-up)."""
    path = results_path("generate", a.device)
    if os.path.exists(path):
        with open(path) as f:
            measured = json.load(f)
        if (measured.get("device") == device_name(a.device) and measured["model"] == a.model
                and measured["stage"]["batch_size"] == a.batch_size):
            return measured["stage"]["images_per_s"], path
    gen = SDGenerator(a.model, device=a.device, precision=a.precision, batch_size=a.batch_size,
                      compile_cache=a.compile_cache)
    gen.warm_up()
    batches = [sample_batch(a.batch_size, offset=i * a.batch_size) for i in range(2)]
    sync(a.device)
    start = time.perf_counter()
    for b in batches:
        gen(b)
    sync(a.device)
    rate = 2 * a.batch_size / (time.perf_counter() - start)
    del gen
    return rate, "timed here"


def timeline(r, store: ShardStore, submitted: float) -> dict:
    """Seconds after the run was submitted: each stage's first call start and last call end
    (its actors' warm-up done before the first), and each shard's write."""
    out = {}
    for stage, per in (r.actor_spans or {}).items():
        out[f"{stage}_first_call_s"] = min(s for _, s, _ in per.values()) - submitted
        out[f"{stage}_last_call_end_s"] = max(e for _, _, e in per.values()) - submitted
    out["shards_written_s"] = sorted(rec["written_at"] - submitted
                                     for rec in store.shards.values())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM)
    p.add_argument("--detector", default="torchvision", help="torchvision | tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=160, help="samples to generate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--label-batch-size", type=int, default=16)
    p.add_argument("--label-batches", type=int, default=4, help="timed labeller batches")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--precision", default=None, help="[default: the stage's]")
    p.add_argument("--compile-cache", default=None, help="[default: the stage's]")
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/pipeline-CARD.json, e.g. pipeline-h200]")
    a = p.parse_args()
    a.out = a.out or results_path("pipeline", a.device)
    work = tempfile.mkdtemp(prefix="factory-pipeline-")
    weights = (random_detector_weights(os.path.join(work, "maskrcnn-random.pth"))
               if a.detector == "torchvision" else None)
    image_size = 64 if a.model == "tiny" else 512
    label_rate = time_labeller(a, weights, image_size)
    gen_rate, gen_source = stage_alone(a)
    # the labeller's GPU share is the time it needs per generated image
    label_share = round(min(0.5, gen_rate / label_rate), 2) if a.device.startswith("cuda") else None
    start = time.time()
    connect_ray(None)
    ray_start = time.time() - start
    o = GenerateOptions(
        out=os.path.join(work, "triplets"), split="pascal", n=a.n, model=a.model,
        detector=a.detector, detector_weights=weights, batch_size=a.batch_size,
        label_batch_size=a.label_batch_size, shard_size=a.shard_size, precision=a.precision,
        compile_cache=a.compile_cache, generators=1, labellers=1,
        gen_gpus=1 - label_share if label_share else None, label_gpus=label_share)
    submitted = time.time()
    r = generate(o)
    times = timeline(r, ShardStore.open(o.out), submitted)
    # steady state: from the generator's first call (start-up and warm-up done) to the last write
    steady = a.n / (times["shards_written_s"][-1] - times["generator_first_call_s"])
    in_pipeline = a.n / (times["generator_last_call_end_s"] - times["generator_first_call_s"])
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "device": device_name(a.device), "torch": torch.__version__, "model": a.model,
        "detector": a.detector, "n": a.n, "batch_size": a.batch_size,
        "label_batch_size": a.label_batch_size, "shard_size": a.shard_size,
        "labeller_alone_images_per_s": label_rate, "label_gpu_share": label_share,
        "stage_alone_images_per_s": gen_rate, "stage_alone_from": gen_source,
        "ray_start_s": ray_start,
        "warm_up_s": r.warm_up_s,
        "timeline_s": times,
        "steady_images_per_s": steady,
        "ratio_to_stage_alone": steady / gen_rate,
        "generator_in_pipeline_images_per_s": in_pipeline,
        "wall_s": r.seconds, "overall_images_per_s": r.images_per_s,
        "busy": r.busy,
    }
    write_result(result, a.out)
    print(f"labeller alone {label_rate:.1f} images/s -> GPU share {label_share}; stage alone "
          f"{gen_rate:.2f} images/s ({gen_source})")
    print(f"Ray start {ray_start:.1f} s; generator's first call after "
          f"{times['generator_first_call_s']:.1f} s (warm-up {r.warm_up_s}); steady state "
          f"{steady:.2f} images/s = {100 * steady / gen_rate:.0f}% of the stage alone (the "
          f"generator alone in the pipeline {in_pipeline:.2f}); overall {r.images_per_s:.2f} "
          f"images/s over {r.seconds:.1f} s -> {a.out}")


if __name__ == "__main__":
    main()
