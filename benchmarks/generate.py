"""Generation speed on one GPU: the paper's way against `SDGenerator`, and levers on the stage.

The paper's way (one image at a time, fp16, eager diffusers pipeline) against `SDGenerator` at
its defaults, in one run, the cost of recomputing an image's features with `FeatureExtractor`,
and the levers that might make the stage faster (CUDA graphs, float8 Linear layers, inductor's
max-autotune), each with its images/s, compile time and PSNR against bf16 on the same seeds.

    python benchmarks/generate.py                       # SD-1.5-sized random weights, one GPU
    python benchmarks/generate.py --no-stage --levers float8    # one lever alone (gpu.sh float8)
    python benchmarks/generate.py --sweep               # the stage, every lever, where time goes
    python benchmarks/generate.py --model tiny --device cpu --steps 2 --images 4 --batch-size 2

Each figure is merged into benchmarks/results/generate-CARD.json (CARD: h100, h200, cpu...) as
soon as it is measured (benchmarks/record.py), so a run stopped at its time limit keeps what it
had, and a lever timed in a later call joins the stage's figures in the same file: `stage`,
`naive`, and `levers`, one entry per lever by name ({"lever": "float8", "images_per_s",
"psnr_db_mean", "compile_s", ...}; "status": "compiling" there means the run was stopped while
compiling it). Warm-up (torch.compile) time is reported apart from the timed images: a cold
compile into an empty cache folder, then (--warm-start) the warm-up of a new process that finds
that cache filled, as a second actor on a node, or a resumed run, would.

A lever's PSNR is against the compiled bf16 stage of the same run when the stage runs too
(--sweep), else against bf16 eager on the same seeds (`reference` says which); the stage's own
`psnr_db_vs_eager_mean` (compiled against eager bf16) is the floor such a figure stands on. Its
speedup is against the stage of the same run, else the stage's figure in the file where that
was measured on the same device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.features import FeatureExtractor, encode_prompts  # noqa: E402
from actors.names import SD15_RANDOM, TINY  # noqa: E402
from actors.sd import load_sd  # noqa: E402
from actors.sd_generator import SDGenerator  # noqa: E402
from benchmarks.record import (  # noqa: E402
    device_name,
    provenance,
    put_lever,
    read_result,
    results_path,
    sync,
    update_result,
)
from factory.prompts import SamplePlan  # noqa: E402
from factory.vocab import get_split  # noqa: E402

TFLOP_PER_IMAGE = 82.8  # SD 1.5 at 512x512, 50 steps, CFG (UNet x 100, VAE decode, text)
# The levers, as SDGenerator settings. max-autotune: inductor times Triton templates against
# cuBLAS/cuDNN for every convolution and matmul shape (CUDA graphs left out: their own lever).
LEVERS = {"cuda graphs": dict(compile_mode="reduce-overhead"), "float8": dict(fp8=True),
          "max-autotune": dict(compile_mode="max-autotune-no-cudagraphs")}


class Budget:
    """The seconds this run may take (gpu.sh stops it there; None: no limit): the optional
    steps are skipped, and say so, where what is left would not cover them."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


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


def cache_is_empty(folder: str) -> bool:
    return not any(files for _, _, files in os.walk(folder))


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


def build(a, **kw) -> SDGenerator:
    """A generator at the stage's settings (`kw` overrides them), compiled with a fresh
    dynamo state so that earlier variants cannot push it past the recompile limit."""
    torch._dynamo.reset()
    opts = dict(steps=a.steps, device=a.device, precision=a.precision, compile=a.compile,
                compile_cache=a.compile_cache, batch_size=a.batch_size)
    return SDGenerator(a.model, **{**opts, **kw})


def drop(gen: SDGenerator) -> None:
    del gen.pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_images(gen: SDGenerator, a, images: int) -> dict:
    """Images/s over `images` timed images (after the warm-up); also the first batch's images
    (to compare variants on the same seeds) and the last batch's outputs."""
    sync(a.device)
    start = time.perf_counter()
    first = None
    for b in batches(images, a.batch_size):
        out = gen(b)
        first = out["image"] if first is None else first
    sync(a.device)
    return {"images_per_s": images / (time.perf_counter() - start), "images": first, "out": out}


def time_features(gen: SDGenerator, out: dict, a) -> float:
    """Seconds per image to recompute `out`'s features with `FeatureExtractor`."""
    extractor = FeatureExtractor(gen.pipe.unet)
    cond, uncond = encode_prompts(gen.pipe, list(out["prompt"]))
    x_t, t = torch.from_numpy(out["x_t"]).to(a.device), torch.from_numpy(out["t"]).to(a.device)
    extractor(x_t, t, cond, uncond)  # warm-up
    sync(a.device)
    start = time.perf_counter()
    for _ in range(a.feature_repeats):
        extractor(x_t, t, cond, uncond)
    sync(a.device)
    return (time.perf_counter() - start) / (a.feature_repeats * len(x_t))


def psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Each image pair's PSNR in dB (uint8 images; inf where equal)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return [float("inf") if m == 0 else float(10 * np.log10(255**2 / m)) for m in mse]


def eager_images(gen: SDGenerator, a) -> np.ndarray:
    """The first batch through `gen`'s UNet without torch.compile (the same module, so the
    same weights, layout and fused projections): what the compiled images are compared to."""
    unet = gen.pipe.unet
    gen.pipe.unet = getattr(unet, "_orig_mod", unet)
    try:
        return gen(next(batches(a.batch_size, a.batch_size)))["image"]
    finally:
        gen.pipe.unet = unet


def time_stage(a, budget: Budget) -> dict:
    """The stage at its defaults: warm-up (the compile), images/s, feature recompute, and where
    the budget allows the warm-up of a new process from the filled cache and the PSNR of the
    compiled images against eager ones. The section is saved after each figure."""
    section = {**provenance(a.device), "model": a.model, "steps": a.steps,
               "batch_size": a.batch_size, "precision": a.precision, "compile": a.compile,
               "compile_cache_was_empty": cache_is_empty(a.compile_cache)}

    def save(**fields) -> None:
        section.update(fields)
        update_result(a.out, stage=section)

    gen = build(a)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    save(warm_up_s=gen.warm_up())
    run = time_images(gen, a, a.images)
    save(images_per_s=run["images_per_s"])
    feature = time_features(gen, run["out"], a)
    save(feature_ms_per_image=1e3 * feature,
         feature_share_of_generation=feature * run["images_per_s"],
         peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30
                          if a.device.startswith("cuda") else None))
    if a.compile:
        db = psnr(run["images"], eager_images(gen, a))
        save(psnr_db_vs_eager_mean=float(np.mean(db)), psnr_db_vs_eager_min=float(np.min(db)))
    if a.compile and a.warm_start:
        # a new process: imports and the model build (tens of seconds), then the cached compile
        enough = budget.allows(30 + section["warm_up_s"] / 2)
        save(warm_start_s=warm_start(a) if enough else "skipped: too little of the budget left")
    return {"gen": gen, "images": run["images"], "section": section}


def warm_start(a, **kw) -> float:
    """A new process's warm-up with the compile cache that this run filled: what a second
    actor on the node, or a resumed run, pays."""
    cmd = [sys.executable, os.path.abspath(__file__), "--warm-up-only", "--model", a.model,
           "--device", a.device, "--batch-size", str(a.batch_size), "--precision", a.precision,
           "--steps", str(a.steps), "--compile-cache", a.compile_cache,
           "--compile-mode", kw.get("compile_mode", "default")] + (
        ["--fp8"] if kw.get("fp8") else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["warm_up_s"]


def eager_reference(a) -> dict:
    """bf16 (the stage's precision) eager images of the first batch, and their speed: the
    reference of a lever timed without the stage."""
    gen = build(a, compile=False)
    gen.warm_up()
    run = time_images(gen, a, a.batch_size)
    drop(gen)
    return {"what": f"{a.precision} eager, same seeds, this run", "images": run["images"],
            "images_per_s": run["images_per_s"]}


def file_stage(a) -> dict | None:
    """The stage's figure in the result file, where it was measured on this device at these
    settings: what a lever timed alone is compared against."""
    result = read_result(a.out)
    stage = result.get("stage") or {}
    same = (stage.get("device", result.get("device")) == device_name(a.device)
            and stage.get("model", result.get("model")) == a.model
            and stage.get("steps", result.get("steps")) == a.steps
            and stage.get("batch_size") == a.batch_size)
    if not same or not stage.get("images_per_s"):
        return None
    return {"name": "the stage in this file",
            "measured_at": stage.get("measured_at", "an earlier run"),
            "images_per_s": stage["images_per_s"], "compile_mode": "default"}


def time_lever(name: str, a, reference: dict, against: dict | None,
               budget: Budget) -> dict:
    """One lever: its build and compile (saved as "compiling" first, so a run stopped there
    says so), images/s, PSNR against `reference`'s images, speedup over `against`, and where
    the budget allows, the warm-up of a new process from the cache it filled."""
    kw = {"compile_mode": against["compile_mode"] if against else "default", **LEVERS[name]}
    entry = {"lever": name, "settings": kw, "status": "compiling", **provenance(a.device),
             "model": a.model, "steps": a.steps, "batch_size": a.batch_size,
             "images": a.images_per_lever, "budget_s": budget.seconds,
             "compile_cache_was_empty": cache_is_empty(a.compile_cache),
             "reference": reference["what"]}
    put_lever(a.out, entry)
    try:
        gen = build(a, **kw)
        entry["compile_s"] = gen.warm_up()
        entry["status"] = "timing"
        put_lever(a.out, entry)
        run = time_images(gen, a, a.images_per_lever)
        drop(gen)
    except (RuntimeError, ValueError, ImportError) as e:
        entry.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        put_lever(a.out, entry)
        return entry
    db = psnr(run["images"], reference["images"])
    entry.update(status="done", images_per_s=run["images_per_s"],
                 psnr_db_mean=float(np.mean(db)), psnr_db_min=float(np.min(db)),
                 lossless=bool(min(db) == float("inf")),
                 against={k: v for k, v in (against or {}).items() if k != "compile_mode"}
                 or None,
                 speedup=run["images_per_s"] / against["images_per_s"] if against else None)
    put_lever(a.out, entry)
    if a.warm_start and a.compile:
        enough = budget.allows(30 + entry["compile_s"] / 2)
        entry["warm_start_s"] = (warm_start(a, **kw) if enough
                                 else "skipped: too little of the budget left")
        put_lever(a.out, entry)
    return entry


def split_batch_time(gen: SDGenerator, a) -> dict:
    """Where a batch's time goes: the per-step cost (UNet and scheduler) from calls at the full
    and at half the steps, the rest a fixed cost per call, of which the VAE decode is timed
    alone; and the host-side post-processing of the old path (float images to the host)."""
    b = next(batches(a.batch_size, a.batch_size))
    prompts, seeds = list(b["prompt"]), b["noise_seed"]

    def seconds(fn) -> float:
        sync(a.device)
        start = time.perf_counter()
        fn()
        sync(a.device)
        return time.perf_counter() - start

    full = seconds(lambda: gen._sample(prompts, seeds, a.steps))
    half = seconds(lambda: gen._sample(prompts, seeds, a.steps // 2))
    per_step = (full - half) / (a.steps - a.steps // 2)
    pipe = gen.pipe
    latents = gen.initial_noise(seeds).to(a.device, pipe.unet.dtype)
    with torch.inference_mode():
        decode = seconds(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor))

        def old_path():  # as SDGenerator did before: float images to the host, then to uint8
            out = pipe(prompts, num_inference_steps=a.steps, guidance_scale=gen.guidance,
                       latents=latents, output_type="np")
            (out.images * 255).round().astype(np.uint8)

        old = seconds(old_path)
    n = len(prompts)
    return {"per_step_ms_per_image": 1e3 * per_step / n,
            "fixed_ms_per_image": 1e3 * (full - a.steps * per_step) / n,
            "vae_decode_ms_per_image": 1e3 * decode / n,
            "other_fixed_ms_per_image": 1e3 * (full - a.steps * per_step - decode) / n,
            "host_postprocess_saved_ms_per_image": 1e3 * (old - full) / n}


def time_decode_overlap(gen: SDGenerator, a) -> dict:
    """One batch's denoising alone plus another batch's VAE decode, against the two at once
    (the decode on a second CUDA stream): what overlapping them across batches could gain."""
    if not a.device.startswith("cuda"):
        return {"skipped": "needs a GPU"}
    b = next(batches(a.batch_size, a.batch_size))
    prompts = list(b["prompt"])
    pipe = gen.pipe
    latents = gen.initial_noise(b["noise_seed"]).to(a.device, pipe.unet.dtype)
    side = torch.cuda.Stream()

    def denoise():
        pipe(prompts, num_inference_steps=a.steps, guidance_scale=gen.guidance,
             latents=latents, output_type="latent")

    def decode():
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)

    with torch.inference_mode():
        times = {}
        for name in ("serial", "overlapped"):
            sync(a.device)
            start = time.perf_counter()
            if name == "serial":
                denoise()
                decode()
            else:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    decode()
                denoise()
            sync(a.device)
            times[name] = time.perf_counter() - start
    n = len(prompts)
    return {"serial_ms_per_image": 1e3 * times["serial"] / n,
            "overlapped_ms_per_image": 1e3 * times["overlapped"] / n,
            "gain": times["serial"] / times["overlapped"] - 1}


def time_attention(gen: SDGenerator, a) -> dict:
    """The eager UNet (the compiled graph fixes its attention kernel when traced) per SDPA
    backend, ms per image and step (both CFG halves); FA3 where this torch can activate it."""
    from torch.nn import attention

    if not a.device.startswith("cuda"):
        return {"skipped": "needs a GPU"}
    unet = getattr(gen.pipe.unet, "_orig_mod", gen.pipe.unet)
    n = 2 * a.batch_size
    cfg = unet.config
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=a.device,
                    dtype=unet.dtype)
    emb = torch.randn(n, 77, cfg.cross_attention_dim, device=a.device, dtype=unet.dtype)
    t = torch.tensor(500, device=a.device)

    def ms(repeats: int = 5) -> float:
        unet(x, t, emb)
        sync(a.device)
        start = time.perf_counter()
        for _ in range(repeats):
            unet(x, t, emb)
        sync(a.device)
        return 1e3 * (time.perf_counter() - start) / (repeats * a.batch_size)

    result = {}
    with torch.inference_mode():
        result["default"] = ms()
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with attention.sdpa_kernel(getattr(attention.SDPBackend, name)):
                    result[name.lower()] = ms()
            except RuntimeError as e:
                result[name.lower()] = f"failed: {str(e).splitlines()[0]}"
        impls = getattr(attention, "list_flash_attention_impls", lambda: [])()
        if "FA3" in impls:
            try:
                attention.activate_flash_attention_impl("FA3")
                with attention.sdpa_kernel(attention.SDPBackend.FLASH_ATTENTION):
                    result["fa3"] = ms()
            except (RuntimeError, ValueError, ImportError) as e:
                result["fa3"] = f"failed: {str(e).splitlines()[0]}"
        else:
            result["fa3"] = f"unavailable (registered flash impls: {list(impls) or 'none'})"
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM, help="SD to time [sd15-random: SD 1.5 sizes]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="bfloat16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-mode", default="default", help=argparse.SUPPRESS)
    p.add_argument("--fp8", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-cache", default=None,
                   help="torch.compile's cache folder [default: a new one, so the first compile "
                        "is a cold one]")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--images", type=int, default=64, help="timed images at the stage's settings")
    p.add_argument("--naive-images", type=int, default=4, help="timed images, one at a time")
    p.add_argument("--feature-repeats", type=int, default=5)
    p.add_argument("--stage", action=argparse.BooleanOptionalAction, default=True,
                   help="time the naive path and the stage (--no-stage: the levers alone, "
                        "against bf16 eager on the same seeds)")
    p.add_argument("--levers", default="",
                   help=f"levers to time, comma-separated [{', '.join(LEVERS)}]")
    p.add_argument("--images-per-lever", type=int, default=32)
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                   help="time a new process's warm-up from the filled compile cache")
    p.add_argument("--breakdown", action="store_true",
                   help="where a batch's time goes, decode overlap, attention backends")
    p.add_argument("--sweep", action="store_true",
                   help="the stage, then every lever against the best so far, and --breakdown")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds this run may take: optional steps that would not fit are "
                        "skipped [default: no limit]")
    p.add_argument("--warm-up-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak-tflops", type=float, default=798.0,
                   help="the GPU's attainable dense bf16 rate (H100: 798 measured, DESIGN.md)")
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/generate-CARD.json, e.g. generate-h200]")
    a = p.parse_args()
    if a.images % a.batch_size or a.images_per_lever % a.batch_size:
        p.error("--images and --images-per-lever must be multiples of --batch-size")
    a.levers = list(LEVERS) if a.sweep else [x.strip() for x in a.levers.split(",") if x.strip()]
    a.breakdown = a.breakdown or a.sweep
    if set(a.levers) - set(LEVERS):
        p.error(f"unknown lever(s) {sorted(set(a.levers) - set(LEVERS))}: {', '.join(LEVERS)}")
    if not a.stage and not a.levers:
        p.error("--no-stage needs --levers")
    if a.warm_up_only:  # the child process of warm_start()
        gen = build(a, compile_mode=a.compile_mode, fp8=a.fp8)
        print(json.dumps({"warm_up_s": gen.warm_up()}))
        return
    a.compile_cache = a.compile_cache or tempfile.mkdtemp(prefix="factory-compile-")
    a.out = a.out or results_path("generate", a.device)
    budget = Budget(a.budget_s)
    update_result(a.out, device=device_name(a.device), torch=torch.__version__, model=a.model,
                  steps=a.steps, guidance=7.5)
    against, reference = None, None
    if a.stage:
        naive = time_naive(a) if a.naive_images else None
        if naive:
            update_result(a.out, naive={**provenance(a.device), "batch_size": 1,
                                        "precision": naive_precision(a), "compile": False,
                                        "images_per_s": naive})
        base = time_stage(a, budget)
        stage = base["section"]
        # the FLOP count is SD 1.5's: meaningless for the tiny model
        tflops = (stage["images_per_s"] * TFLOP_PER_IMAGE * a.steps / 50 if a.model != TINY
                  else None)
        update_result(a.out, speedup=stage["images_per_s"] / naive if naive else None,
                      achieved_tflops=tflops,
                      share_of_peak=tflops / a.peak_tflops if tflops else None)
        if a.breakdown:
            update_result(a.out, time_split=split_batch_time(base["gen"], a),
                          decode_overlap=time_decode_overlap(base["gen"], a),
                          attention_eager_ms_per_image_step=time_attention(base["gen"], a))
        drop(base["gen"])
        against = {"name": f"{a.precision}{' compiled' if a.compile else ' eager'}, this run",
                   "images_per_s": stage["images_per_s"], "compile_mode": "default"}
        reference = {"what": f"{a.precision} stage{' compiled' if a.compile else ''}, same "
                             "seeds, this run", "images": base["images"]}
    elif a.levers:
        reference = eager_reference(a)
        against = file_stage(a)
    for name in a.levers:
        entry = time_lever(name, a, reference, against, budget)
        if (a.stage and entry.get("speedup") and entry["speedup"] > 1
                and entry.get("lossless")):  # a lossless gain is kept for the next lever
            against = {"name": f"{name}, this run", "images_per_s": entry["images_per_s"],
                       "compile_mode": entry["settings"]["compile_mode"]}
    report(read_result(a.out), a)


def report(result: dict, a) -> None:
    """The file's figures, as a table."""
    print(f"{'path':<40}{'images/s':>10}{'warm-up s':>11}")
    naive, stage = result.get("naive") or {}, result.get("stage") or {}
    if naive.get("images_per_s"):
        print(f"{f'naive (batch 1, {naive_precision(a)}, eager)':<40}"
              f"{naive['images_per_s']:>10.2f}")
    if stage.get("images_per_s"):
        label = (f"stage (batch {stage.get('batch_size')}, {stage.get('precision')}"
                 f"{', compiled' if stage.get('compile') else ''})")
        print(f"{label:<40}{stage['images_per_s']:>10.2f}{stage.get('warm_up_s', 0):>11.1f}")
    for lever in result.get("levers", []):
        name = "  + " + lever["lever"]
        if lever.get("status", "done") != "done":
            print(f"{name:<40}{lever.get('status')}: {lever.get('error', '')}")
            continue
        speedup = f"x{lever['speedup']:.3f}, " if lever.get("speedup") else ""
        print(f"{name:<40}{lever['images_per_s']:>10.2f}"
              f"{lever.get('compile_s', lever.get('warm_up_s', 0)):>11.1f}  {speedup}PSNR "
              f"{lever['psnr_db_mean']:.1f} dB (min {lever['psnr_db_min']:.1f})")
    if isinstance(stage.get("warm_start_s"), float):
        print(f"warm-up from the compile cache in a new process: {stage['warm_start_s']:.1f} s")
    if result.get("achieved_tflops"):
        print(f"{result['achieved_tflops']:.0f} TFLOP/s = "
              f"{100 * result['achieved_tflops'] / a.peak_tflops:.0f}% of {a.peak_tflops:.0f}")
    if stage.get("feature_ms_per_image"):
        print(f"features {stage['feature_ms_per_image']:.1f} ms/image = "
              f"{100 * stage['feature_share_of_generation']:.2f}% of generating it; peak memory "
              f"{stage.get('peak_memory_gib') or 0:.1f} GiB")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
