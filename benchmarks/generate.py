"""Generation speed on one GPU: the paper's way (one image at a time, fp16, eager diffusers
pipeline) against `SDGenerator` at its best settings, in one run, plus the cost of recomputing
an image's features with `FeatureExtractor`.

    python benchmarks/generate.py                       # SD-1.5-sized random weights, H100
    python benchmarks/generate.py --model tiny --device cpu --steps 2 --images 4 --batch-size 2
    python benchmarks/generate.py --sweep               # and each lever against the best so far

Prints a table and writes benchmarks/results/generate-CARD.json (CARD: h100, h200, cpu...).
Warm-up (and torch.compile) time is reported apart from the timed images: a cold compile into
a new cache folder, then (--sweep) the warm-up of a new process that finds that cache filled,
as a second actor on a node would.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from factory.prompts import SamplePlan  # noqa: E402
from factory.vocab import get_split  # noqa: E402

TFLOP_PER_IMAGE = 82.8  # SD 1.5 at 512x512, 50 steps, CFG (UNet x 100, VAE decode, text)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def write_result(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def results_path(name: str, device: str) -> str:
    """benchmarks/results/NAME-CARD.json, CARD as in 'NVIDIA H200' -> h200."""
    card = device_name(device).lower().removeprefix("nvidia ").split()[0]
    return os.path.join(RESULTS, f"{name}-{card}.json")


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


def time_generator(gen: SDGenerator, a, images: int) -> dict:
    """Warm-up (compile) seconds, then images/s over `images` timed images; also the first
    timed batch's images (to compare variants on the same seeds)."""
    warm_up = gen.warm_up()
    sync(a.device)
    start = time.perf_counter()
    first = None
    for b in batches(images, a.batch_size):
        out = gen(b)
        first = out["image"] if first is None else first
    sync(a.device)
    return {"images_per_s": images / (time.perf_counter() - start), "warm_up_s": warm_up,
            "images": first, "out": out}


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


def time_stage(a) -> dict:
    gen = build(a)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = time_generator(gen, a, a.images)
    feature = time_features(gen, run["out"], a)
    per_image = 1 / run["images_per_s"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else None
    return {"gen": gen, "images": run["images"],
            "result": {"images_per_s": run["images_per_s"], "warm_up_s": run["warm_up_s"],
                       "feature_ms_per_image": 1e3 * feature,
                       "feature_share_of_generation": feature / per_image,
                       "peak_memory_gib": peak}}


def psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Each image pair's PSNR in dB (uint8 images; inf where equal)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return [float("inf") if m == 0 else float(10 * np.log10(255**2 / m)) for m in mse]


def warm_start(a) -> float:
    """A new process's warm-up with the compile cache that this run filled: what a second
    actor on the node, or a resumed run, pays."""
    cmd = [sys.executable, os.path.abspath(__file__), "--warm-up-only", "--model", a.model,
           "--device", a.device, "--batch-size", str(a.batch_size), "--precision", a.precision,
           "--steps", str(a.steps), "--compile-cache", a.compile_cache]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["warm_up_s"]


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


LEVERS = {"cuda graphs": dict(compile_mode="reduce-overhead"), "float8 linear": dict(fp8=True)}


def sweep(a, result: dict, save) -> None:
    """Each lever against the best so far, in one process; `save` after each."""
    levers = result["levers"] = []
    base = time_stage(a)
    result["stage"] = base["result"]
    result["stage"]["warm_start_s"] = warm_start(a) if a.compile and a.breakdown else None
    save()
    best = {"name": f"{a.precision}{' compiled' if a.compile else ' eager'}",
            "images_per_s": base["result"]["images_per_s"],
            "compile_mode": "default"}
    if a.breakdown:
        result["time_split"] = split_batch_time(base["gen"], a)
        result["decode_overlap"] = time_decode_overlap(base["gen"], a)
        result["attention_eager_ms_per_image_step"] = time_attention(base["gen"], a)
    reference = base["images"]
    drop(base["gen"])
    save()
    for name, kw in LEVERS.items():
        if name not in a.levers:
            continue
        kw = {"compile_mode": best["compile_mode"], **kw}
        entry = {"lever": name, "settings": kw, "against": best["name"]}
        try:
            gen = build(a, **kw)
            run = time_generator(gen, a, a.images_per_lever)
            drop(gen)
        except (RuntimeError, ValueError, ImportError) as e:
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            levers.append(entry)
            save()
            continue
        db = psnr(run["images"], reference)
        entry.update(images_per_s=run["images_per_s"], warm_up_s=run["warm_up_s"],
                     speedup=run["images_per_s"] / best["images_per_s"],
                     psnr_db_mean=float(np.mean(db)), psnr_db_min=float(np.min(db)),
                     lossless=bool(min(db) == float("inf")))
        levers.append(entry)
        save()
        if entry["speedup"] > 1 and not kw.get("fp8"):  # lossy levers are options only
            best = {"name": name, "images_per_s": run["images_per_s"],
                    "compile_mode": kw["compile_mode"]}
    result["best_lossless"] = best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM, help="SD to time [sd15-random: SD 1.5 sizes]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="bfloat16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-cache", default=None,
                   help="torch.compile's cache folder [default: a new one, so the first compile "
                        "is a cold one]")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--images", type=int, default=64, help="timed images at the best settings")
    p.add_argument("--naive-images", type=int, default=4, help="timed images, one at a time")
    p.add_argument("--feature-repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true",
                   help="also time each lever (CUDA graphs, float8, attention backends, decode "
                        "overlap, host-side costs) against the best so far")
    p.add_argument("--images-per-lever", type=int, default=32)
    p.add_argument("--levers", default=",".join(LEVERS),
                   help=f"the levers to sweep, comma-separated [{', '.join(LEVERS)}]")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="with --sweep: where a batch's time goes, decode overlap, attention "
                        "backends, a warm start from the compile cache")
    p.add_argument("--warm-up-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak-tflops", type=float, default=798.0,
                   help="the GPU's attainable dense bf16 rate (H100: 798 measured, DESIGN.md)")
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/generate-CARD.json, e.g. generate-h200]")
    a = p.parse_args()
    if a.images % a.batch_size or a.images_per_lever % a.batch_size:
        p.error("--images and --images-per-lever must be multiples of --batch-size")
    a.levers = [x.strip() for x in a.levers.split(",") if x.strip()]
    if set(a.levers) - set(LEVERS):
        p.error(f"unknown lever(s) {sorted(set(a.levers) - set(LEVERS))}: {', '.join(LEVERS)}")
    if a.warm_up_only:  # the child process of warm_start()
        print(json.dumps({"warm_up_s": build(a).warm_up()}))
        return
    a.compile_cache = a.compile_cache or tempfile.mkdtemp(prefix="factory-compile-")
    a.out = a.out or results_path("generate", a.device)
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "device": device_name(a.device),
        "torch": torch.__version__,
        "model": a.model, "steps": a.steps, "guidance": 7.5,
        "compile_cache_was_empty": not os.listdir(a.compile_cache),
    }

    def save() -> None:
        write_result(result, a.out)

    naive = time_naive(a) if a.naive_images else None
    result["naive"] = {"batch_size": 1, "precision": naive_precision(a), "compile": False,
                       "images_per_s": naive}
    if a.sweep:
        sweep(a, result, save)
        best = result["stage"]
    else:
        stage = time_stage(a)
        best = result["stage"] = stage["result"]
    result["stage"].update(batch_size=a.batch_size, precision=a.precision, compile=a.compile)
    # the FLOP count is SD 1.5's: meaningless for the tiny model
    tflops = best["images_per_s"] * TFLOP_PER_IMAGE * a.steps / 50 if a.model != TINY else None
    result.update(speedup=best["images_per_s"] / naive if naive else None,
                  achieved_tflops=tflops,
                  share_of_peak=tflops / a.peak_tflops if tflops else None)
    save()
    print(f"{'path':<40}{'images/s':>10}{'warm-up s':>11}")
    if naive:
        print(f"{f'naive (batch 1, {naive_precision(a)}, eager)':<40}{naive:>10.2f}")
    label = f"stage (batch {a.batch_size}, {a.precision}{', compiled' if a.compile else ''})"
    print(f"{label:<40}{best['images_per_s']:>10.2f}{best['warm_up_s']:>11.1f}")
    for lever in result.get("levers", []):
        if "error" in lever:
            print(f"{'  + ' + lever['lever']:<40}{lever['error']}")
        else:
            print(f"{'  + ' + lever['lever']:<40}{lever['images_per_s']:>10.2f}"
                  f"{lever['warm_up_s']:>11.1f}  x{lever['speedup']:.3f}, PSNR "
                  f"{lever['psnr_db_mean']:.1f} dB (min {lever['psnr_db_min']:.1f})")
    if best.get("warm_start_s") is not None:
        print(f"warm-up from the compile cache in a new process: {best['warm_start_s']:.1f} s")
    if tflops:
        print(f"{tflops:.0f} TFLOP/s = {100 * tflops / a.peak_tflops:.0f}% of "
              f"{a.peak_tflops:.0f}")
    print(f"features {best['feature_ms_per_image']:.1f} ms/image = "
          f"{100 * best['feature_share_of_generation']:.2f}% of generating it; peak memory "
          f"{best['peak_memory_gib'] or 0:.1f} GiB -> {a.out}")


if __name__ == "__main__":
    main()
