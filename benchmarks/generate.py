"""Generation speed on one GPU: the paper's way (one image at a time, fp16, eager diffusers
pipeline) against `SDGenerator` at its best settings, in one run, plus the cost of recomputing
an image's features with `FeatureExtractor`.

    python benchmarks/generate.py                       # SD-1.5-sized random weights, H100
    python benchmarks/generate.py --model tiny --device cpu --steps 2 --images 4 --batch-size 2

Prints a table and writes benchmarks/results/generate.json. Warm-up (and torch.compile) time is
reported apart from the timed images.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.features import FeatureExtractor, encode_prompts  # noqa: E402
from actors.names import SD15_RANDOM, TINY  # noqa: E402
from actors.sd import load_sd  # noqa: E402
from actors.sd_generator import SDGenerator  # noqa: E402
from factory.prompts import SamplePlan  # noqa: E402
from factory.vocab import get_split  # noqa: E402

TFLOP_PER_IMAGE = 82.8  # SD 1.5 at 512x512, 50 steps, CFG (UNet x 100, VAE decode, text)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batches(n: int, size: int, offset: int = 0):
    """Pascal train prompts and seeds, `size` at a time, from sample `offset` on."""
    plan = SamplePlan(get_split("pascal", "1"), "train", seed=0)
    specs = [plan.sample(offset + i) for i in range(n)]
    for i in range(0, n, size):
        chunk = specs[i:i + size]
        yield {"prompt": np.array([s.prompt for s in chunk], dtype=object),
               "noise_seed": np.array([s.noise_seed for s in chunk], dtype=np.int64)}


def naive_precision(a) -> str:
    return "float16" if a.device.startswith("cuda") else "float32"  # no fp16 conv on CPUs


def time_naive(a) -> float:
    """The paper's code path: the diffusers pipeline, one image per call, fp16, eager."""
    pipe = load_sd(a.model, device=a.device, dtype=getattr(torch, naive_precision(a)))
    run = [b for b in batches(a.naive_images + 1, 1)]
    for i, b in enumerate(run):
        if i == 1:  # the first image warms up
            sync(a.device)
            start = time.perf_counter()
        gen = torch.Generator("cpu").manual_seed(int(b["noise_seed"][0]))
        pipe(list(b["prompt"]), num_inference_steps=a.steps, guidance_scale=7.5, generator=gen,
             output_type="np")
    sync(a.device)
    seconds = time.perf_counter() - start
    del pipe
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return a.naive_images / seconds


def time_stage(a) -> dict:
    gen = SDGenerator(a.model, steps=a.steps, device=a.device, precision=a.precision,
                      compile=a.compile)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(a.device)
    start = time.perf_counter()
    out = gen(next(batches(a.batch_size, a.batch_size, offset=10_000)))  # warm-up (and compile)
    sync(a.device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for b in batches(a.images, a.batch_size):
        out = gen(b)
    sync(a.device)
    per_image = (time.perf_counter() - start) / a.images

    extractor = FeatureExtractor(gen.pipe.unet)
    cond, uncond = encode_prompts(gen.pipe, list(out["prompt"]))
    x_t, t = torch.from_numpy(out["x_t"]).to(a.device), torch.from_numpy(out["t"]).to(a.device)
    extractor(x_t, t, cond, uncond)  # warm-up
    sync(a.device)
    start = time.perf_counter()
    for _ in range(a.feature_repeats):
        extractor(x_t, t, cond, uncond)
    sync(a.device)
    feature_per_image = (time.perf_counter() - start) / (a.feature_repeats * len(x_t))
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else None
    return {"images_per_s": 1 / per_image, "warmup_s": warmup,
            "feature_ms_per_image": 1e3 * feature_per_image,
            "feature_share_of_generation": feature_per_image / per_image,
            "peak_memory_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM, help="SD to time [sd15-random: SD 1.5 sizes]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="bfloat16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--images", type=int, default=64, help="timed images at the best settings")
    p.add_argument("--naive-images", type=int, default=4, help="timed images, one at a time")
    p.add_argument("--feature-repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=798.0,
                   help="the GPU's attainable dense bf16 rate (H100: 798 measured, DESIGN.md)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "generate.json"))
    a = p.parse_args()
    if a.images % a.batch_size:
        p.error("--images must be a multiple of --batch-size")
    naive = time_naive(a)
    best = time_stage(a)
    # the FLOP count is SD 1.5's: meaningless for the tiny model
    tflops = best["images_per_s"] * TFLOP_PER_IMAGE * a.steps / 50 if a.model != TINY else None
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
        "torch": torch.__version__,
        "model": a.model, "steps": a.steps, "guidance": 7.5,
        "naive": {"batch_size": 1, "precision": naive_precision(a), "compile": False,
                  "images_per_s": naive},
        "stage": {"batch_size": a.batch_size, "precision": a.precision, "compile": a.compile,
                  **best},
        "speedup": best["images_per_s"] / naive,
        "achieved_tflops": tflops,
        "share_of_peak": tflops / a.peak_tflops if tflops else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'path':<34}{'images/s':>10}")
    print(f"{f'naive (batch 1, {naive_precision(a)}, eager)':<34}{naive:>10.2f}")
    label = f"stage (batch {a.batch_size}, {a.precision}{', compiled' if a.compile else ''})"
    print(f"{label:<34}{best['images_per_s']:>10.2f}")
    if tflops:
        print(f"{tflops:.0f} TFLOP/s = {100 * tflops / a.peak_tflops:.0f}% of "
              f"{a.peak_tflops:.0f}")
    print(f"speedup {result['speedup']:.1f}x; warm-up "
          f"{best['warmup_s']:.1f} s; features {best['feature_ms_per_image']:.1f} ms/image = "
          f"{100 * best['feature_share_of_generation']:.2f}% of generating it; peak memory "
          f"{best['peak_memory_gib'] or 0:.1f} GiB -> {a.out}")


if __name__ == "__main__":
    main()
