"""`SDGenerator`: prompts and noise seeds in, images and the feature-step latent x_t out."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from actors.batch import check_columns, default_device, with_lists
from actors.names import DEFAULT_MODEL, PRECISIONS, check_precision
from actors.sd import load_sd

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert tuple(DTYPES) == PRECISIONS


# torch.compile's on-disk caches (inductor's FX graphs, AOTAutograd, Triton kernels): one folder
# per node that every actor and every later run shares, so only the first compile pays in full.
COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "factory", "torch-compile")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def precision_dtype(precision: str | None, device: str) -> torch.dtype:
    """The compute dtype: `precision` by name, or bfloat16 on a GPU (as fast as float16 and
    measured in benchmarks/results/) and float32 on the CPU."""
    if precision is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    check_precision(precision)
    return DTYPES[precision]


def use_compile_cache(path: str | None = None) -> str:
    """Point torch.compile's caches at `path` [default: $TORCHINDUCTOR_CACHE_DIR, else
    COMPILE_CACHE] for this process; a shared mount gives every node the same cache."""
    path = os.path.abspath(path or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or COMPILE_CACHE)
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def quantize_fp8(unet: torch.nn.Module) -> None:
    """float8 dynamic activation + weight quantisation (per row) of the UNet's Linear layers,
    in place (torchao; Ada or Hopper GPUs). Lossy: benchmarks/generate.py --sweep reports its
    PSNR against bf16."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        raise ImportError("float8 needs torchao: `uv sync --extra fp8`") from None
    device = next(unet.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("float8 needs an Ada or Hopper GPU (compute capability 8.9 or newer)")

    def fp8_able(module: torch.nn.Module, name: str) -> bool:  # float8 GEMMs need 16-multiples
        return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
                and module.out_features % 16 == 0)

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=fp8_able)


class KeepLatent:
    """A diffusers `callback_on_step_end` that keeps the latent entering denoising step
    `feature_step` (the callback sees the latent *after* step i, so it grabs it at i + 1 ==
    feature_step) and that step's timestep."""

    def __init__(self, feature_step: int) -> None:
        self.feature_step = feature_step
        self.latents: torch.Tensor | None = None
        self.t: int | None = None

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        if i + 1 == self.feature_step:
            self.latents = kwargs["latents"].detach().clone()
            self.t = int(pipe.scheduler.timesteps[self.feature_step])
        return kwargs


class SDGenerator:
    """Stable Diffusion sampling as a batch stage (paper sec. 5.1: DDIM, 50 steps, eta 0). The
    paper gives no guidance scale; the default 7.5 is the official test.py's (`--scale`), and the
    official train.py makes the head's training images at 5.0. Each sample's initial noise comes
    from its own seed, so a sample does not depend on what else is in its batch.

    Input batch:  prompt (B,) str; noise_seed (B,) int.
    Output batch: the input plus image (B, H, W, 3) uint8; x_t (B, 4, H/8, W/8), the latent
    entering the feature step, exactly as the UNet saw it (float16 from a float16 UNet, else
    float32, which holds bfloat16 exactly); t (B,) int32, that step's timestep.

    On a GPU the UNet runs channels-last with fused QKV projections (same outputs up to float
    rounding; PyTorch SDPA attention is diffusers' default) and, by default, under
    torch.compile with static shapes (`compile_mode` as torch.compile's `mode`). With
    `batch_size`, every call runs at exactly that many images, a shorter batch being padded
    with copies of its last sample whose outputs are dropped, so the compiled UNet never meets
    a new shape. `warm_up` pays the compile (seconds from the shared cache, `compile_cache`)
    before the first real batch. `fp8` quantises the UNet's Linear layers to float8 (lossy;
    the stored x_t stays bfloat16)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, steps: int = 50, guidance: float = 7.5,
                 feature_step: int | None = None, device: str | None = None,
                 precision: str | None = None, compile: bool | None = None,
                 compile_mode: str = "default", compile_cache: str | None = None,
                 batch_size: int | None = None, fp8: bool = False) -> None:
        self.device = device or default_device()
        cuda = self.device.startswith("cuda")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}: one of "
                             f"{', '.join(COMPILE_MODES)}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {batch_size}")
        self.pipe = load_sd(model, device=self.device,
                            dtype=precision_dtype(precision, self.device))
        # frozen before compiling: a later requires_grad_(False) (FeatureExtractor's) would
        # fail the compiled graph's guards and recompile it
        self.pipe.unet.eval().requires_grad_(False)
        if cuda:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.unet.fuse_qkv_projections()
        if fp8:
            quantize_fp8(self.pipe.unet)
        self.compiled = cuda if compile is None else compile
        if self.compiled:
            use_compile_cache(compile_cache)
            self.pipe.unet = torch.compile(self.pipe.unet, fullgraph=True, dynamic=False,
                                           mode=compile_mode)
        self.batch_size = batch_size
        self.steps = steps
        self.guidance = guidance
        # The paper reads features at the last denoising step (DESIGN.md).
        self.feature_step = steps - 1 if feature_step is None else feature_step
        if not 0 <= self.feature_step < steps:
            raise ValueError(f"feature step must lie in [0, {steps}), got {self.feature_step}")
        unet = self.pipe.unet.config
        self.latent_shape = (unet.in_channels, unet.sample_size, unet.sample_size)

    @property
    def precision(self) -> str:
        """The dtype SD computes in, e.g. "bfloat16"."""
        return str(self.pipe.dtype).removeprefix("torch.")

    def initial_noise(self, seeds: np.ndarray) -> torch.Tensor:
        """(B, 4, h, w) standard normal noise, sample b drawn from its own CPU generator."""
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = [torch.randn(self.latent_shape, generator=g) for g in gens]
        return torch.stack(noise) * self.pipe.scheduler.init_noise_sigma

    def warm_up(self) -> float:
        """Run two denoising steps at the call shape (compiling the UNet, or loading it from the
        compile cache); returns the seconds it took."""
        start = time.perf_counter()
        n = self.batch_size or 1
        self._sample([""] * n, np.zeros(n, dtype=np.int64), steps=2)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()  # every caller alike: a change of grad mode would recompile
    def _sample(self, prompts: list[str], seeds: np.ndarray, steps: int):
        """(images (B, H, W, 3) uint8 on the host, KeepLatent holding x_t and its step)."""
        latents = self.initial_noise(seeds)
        keep = KeepLatent(self.feature_step if steps == self.steps else -1)
        out = self.pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=self.guidance,
            latents=latents.to(self.device, self.pipe.unet.dtype),
            output_type="pt",
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if self.feature_step == 0:  # the callback never sees the latent entering step 0
            keep.latents, keep.t = latents, int(self.pipe.scheduler.timesteps[0])
        # to uint8 on the device: a quarter of the bytes to copy, and no float pass on the host
        images = (out.images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return images.cpu().numpy(), keep                                  # (B, H, W, 3)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_columns(batch, ("prompt", "noise_seed"))
        n = len(batch["prompt"])
        size = self.batch_size or n
        if n > size:
            raise ValueError(f"batch of {n} images for a generator of batch size {size}")
        pad = np.arange(size) if n == size else np.minimum(np.arange(size), n - 1)
        images, keep = self._sample([str(batch["prompt"][i]) for i in pad],
                                    np.asarray(batch["noise_seed"])[pad], self.steps)
        x_t_dtype = torch.float16 if self.pipe.unet.dtype == torch.float16 else torch.float32
        return {
            **with_lists(batch),
            "image": images[:n],                                                   # (B, H, W, 3)
            "x_t": keep.latents[:n].to(x_t_dtype).cpu().numpy(),                   # (B, 4, h, w)
            "t": np.full(n, keep.t, dtype=np.int32),                                # (B,)
        }
