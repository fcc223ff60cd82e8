"""The diffusion features the grounding head reads, recomputed from a stored latent.

The paper's visual input is SD's UNet features at the feature timestep: the outputs of every
down block, the mid block and every up block, grouped by spatial resolution (8, 16, 32 and 64 at
512x512) and concatenated on channels. Those maps are tens of MB per image, so the factory never
stores them: it stores the latent x_t entering that step and recomputes them here with one
guided UNet forward (batch of two: unconditional and conditional), exactly as the UNet computed
them during generation (DESIGN.md decision 1; tests/test_features.py proves it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from actors.names import check_unet_config


def encode_prompts(pipe, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """SD's conditional and unconditional ("" prompt) text embeddings, as the pipeline computes
    them for classifier-free guidance: two (B, 77, D) tensors."""
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.device, 1, True)
    return cond, uncond


class FeatureExtractor:
    """One guided forward of a frozen UNet -> the paper's feature pyramid.

    `stack_cfg` (the paper's public code, default): each group holds the unconditional and the
    conditional half's features side by side on channels, per sample; otherwise only the
    conditional half."""

    def __init__(self, unet: torch.nn.Module, *, stack_cfg: bool = True) -> None:
        unet = getattr(unet, "_orig_mod", unet)  # hooks need the eager module, not a compiled one
        check_unet_config(dict(unet.config))
        self.unet = unet.eval().requires_grad_(False)
        self.stack_cfg = stack_cfg
        self.blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]  # forward order

    @property
    def channels(self) -> list[int]:
        """Channels of each feature group, coarse to fine (SD 1.5, stacked: 7680, 3840, 3200,
        1920)."""
        per_block = _block_channels(self.unet.config)
        groups = _block_groups(len(self.unet.down_blocks))
        return [sum(per_block[i] for i in g) * (2 if self.stack_cfg else 1) for g in groups]

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor | int, cond: Tensor, uncond: Tensor) -> list[Tensor]:
        """x_t: B x 4 x h x w latents entering the feature step; t: their timesteps (B,) or one
        int; cond, uncond: B x 77 x D text embeddings. Returns four groups, coarse to fine:
        group g is B x C_g x (h / 2**(3-g)) x (w / 2**(3-g)), C_g = `channels[g]`."""
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(B)
        outputs = self.block_outputs(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     torch.cat([uncond, cond]))
        groups = group_by_resolution(outputs, len(self.unet.down_blocks))  # (2B, C, r, r)
        if self.stack_cfg:  # (B, 2C, r, r): sample b's uncond then cond channels
            return [torch.cat([g[:B], g[B:]], dim=1) for g in groups]
        return [g[B:] for g in groups]

    def block_outputs(self, latents: Tensor, t: Tensor, text: Tensor) -> list[Tensor]:
        """The output of every down, mid and up block, in forward order, for one UNet call."""
        outputs: list[Tensor] = []

        def keep(module, args, output):  # down blocks return (hidden states, skip connections)
            outputs.append(output[0] if isinstance(output, tuple) else output)

        handles = [b.register_forward_hook(keep) for b in self.blocks]
        try:
            dtype = self.unet.dtype
            self.unet(latents.to(dtype), t, encoder_hidden_states=text.to(dtype))
        finally:
            for h in handles:
                h.remove()
        return outputs


def _block_groups(n_down: int) -> list[list[int]]:
    """Indices into [down..., mid, up...] of the blocks at each resolution, coarse to fine.
    Down block i outputs at 1/2**min(i + 1, n - 1) of the latent size, the mid block at
    1/2**(n - 1), up block i at 1/2**max(n - 2 - i, 0)."""
    n = n_down
    scale = [min(i + 1, n - 1) for i in range(n)] + [n - 1] + [max(n - 2 - i, 0) for i in range(n)]
    return [[b for b, s in enumerate(scale) if s == level] for level in range(n - 1, -1, -1)]


def _block_channels(config) -> list[int]:
    ch = list(config.block_out_channels)
    return ch + [ch[-1]] + ch[::-1]


def group_by_resolution(outputs: list[Tensor], n_down: int) -> list[Tensor]:
    """Block outputs in forward order -> one tensor per resolution, coarse to fine, the blocks
    concatenated on channels in forward order."""
    return [torch.cat([outputs[b] for b in g], dim=1) for g in _block_groups(n_down)]
