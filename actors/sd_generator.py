"""`SDGenerator`: prompts and noise seeds in, images and the feature-step latent x_t out."""

from __future__ import annotations

import numpy as np
import torch

from actors.batch import check_columns, default_device, with_lists
from actors.names import DEFAULT_MODEL, PRECISIONS, check_precision
from actors.sd import load_sd

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert tuple(DTYPES) == PRECISIONS


def precision_dtype(precision: str | None, device: str) -> torch.dtype:
    """The compute dtype: `precision` by name, or float16 on a GPU and float32 on the CPU."""
    if precision is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    check_precision(precision)
    return DTYPES[precision]


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
    """Stable Diffusion sampling as a batch stage (paper sec. 5.1: DDIM, 50 steps, eta 0,
    guidance 7.5). Each sample's initial noise comes from its own seed, so a sample does not
    depend on what else is in its batch.

    Input batch:  prompt (B,) str; noise_seed (B,) int.
    Output batch: the input plus image (B, H, W, 3) uint8; x_t (B, 4, H/8, W/8), the latent
    entering the feature step, exactly as the UNet saw it (float16 from a float16 UNet, else
    float32, which holds bfloat16 exactly); t (B,) int32, that step's timestep.

    On a GPU the UNet runs channels-last with fused QKV projections (same outputs up to float
    rounding; PyTorch SDPA attention is diffusers' default); `compile` adds torch.compile,
    whose one-off cost is paid on the first batch of each shape."""

    def __init__(self, model: str = DEFAULT_MODEL, *, steps: int = 50, guidance: float = 7.5,
                 feature_step: int | None = None, device: str | None = None,
                 precision: str | None = None, compile: bool = False) -> None:
        self.device = device or default_device()
        self.pipe = load_sd(model, device=self.device,
                            dtype=precision_dtype(precision, self.device))
        if self.device.startswith("cuda"):
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.unet.fuse_qkv_projections()
        if compile:
            self.pipe.unet = torch.compile(self.pipe.unet, fullgraph=True)
        self.steps = steps
        self.guidance = guidance
        # The paper reads features at the last denoising step (DESIGN.md).
        self.feature_step = steps - 1 if feature_step is None else feature_step
        if not 0 <= self.feature_step < steps:
            raise ValueError(f"feature step must lie in [0, {steps}), got {self.feature_step}")
        unet = self.pipe.unet.config
        self.latent_shape = (unet.in_channels, unet.sample_size, unet.sample_size)

    def initial_noise(self, seeds: np.ndarray) -> torch.Tensor:
        """(B, 4, h, w) standard normal noise, sample b drawn from its own CPU generator."""
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = [torch.randn(self.latent_shape, generator=g) for g in gens]
        return torch.stack(noise) * self.pipe.scheduler.init_noise_sigma

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_columns(batch, ("prompt", "noise_seed"))
        latents = self.initial_noise(batch["noise_seed"])
        keep = KeepLatent(self.feature_step)
        out = self.pipe(
            [str(p) for p in batch["prompt"]],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            latents=latents.to(self.device, self.pipe.unet.dtype),
            output_type="np",
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if self.feature_step == 0:  # the callback never sees the latent entering step 0
            keep.latents, keep.t = latents, int(self.pipe.scheduler.timesteps[0])
        n = len(batch["prompt"])
        x_t_dtype = torch.float16 if self.pipe.unet.dtype == torch.float16 else torch.float32
        return {
            **with_lists(batch),
            "image": (out.images * 255).round().astype(np.uint8),                  # (B, H, W, 3)
            "x_t": keep.latents.to(x_t_dtype).cpu().numpy(),                       # (B, 4, h, w)
            "t": np.full(n, keep.t, dtype=np.int32),                                # (B,)
        }
