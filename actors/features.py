"""The diffusion features the grounding head reads, recomputed from a stored latent.

The paper's visual input is SD's UNet features at the feature timestep: the output of every block
of the original (ldm) UNet, as its public code collects them (`openaimodel.py`, `all_feature_dic`):
the 12 input blocks (conv_in, each resnet[+attention] layer, each downsampler), the middle block
and the 12 output blocks (each resnet[+attention] layer, an up block's last layer followed by its
upsampler), 25 maps for SD 1.x, grouped by spatial resolution (8, 16, 32 and 64 at 512x512) and
concatenated on channels. On diffusers' UNet those are the outputs of the modules `feature_maps`
names. The maps are tens of MB per image, so the factory never stores them: it stores the latent
x_t entering that step and recomputes them here with one guided UNet forward (batch of two:
unconditional and conditional), exactly as the UNet computed them during generation (DESIGN.md
decision 1; tests/test_features.py proves it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from actors.names import check_unet_config


def encode_prompts(pipe, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """SD's conditional and unconditional ("" prompt) text embeddings, as the pipeline computes
    them for classifier-free guidance: two (B, 77, D) tensors."""
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.device, 1, True)
    return cond, uncond


@dataclass(frozen=True)
class FeatureMap:
    """One ldm block's output on diffusers' UNet."""

    module: str  # the diffusers module whose output it is, e.g. "down_blocks.0.attentions.1"
    channels: int
    level: int  # its size is the latent's / 2**level (0: 64x64 at 512x512)


def feature_maps(config) -> list[FeatureMap]:
    """The ldm blocks' outputs, in forward order, from a `UNet2DConditionModel` config alone.

    A down block's layer ends with its attention where the block has attentions, else with its
    resnet; a down block but the last ends with a downsampler. An up block has one layer more,
    the last of which ends with the upsampler (output at the next finer level) where there is
    one. SD 1.5: 12 input maps, the mid block, 12 output maps."""
    ch = list(config.block_out_channels)
    n = len(ch)
    per_block = config.layers_per_block
    layers = [per_block] * n if isinstance(per_block, int) else list(per_block)

    def layer(block: str, kind: str) -> str:
        return f"{block}.attentions" if "CrossAttn" in kind else f"{block}.resnets"

    maps = [FeatureMap("conv_in", ch[0], 0)]
    for i, kind in enumerate(config.down_block_types):
        maps += [FeatureMap(f"{layer(f'down_blocks.{i}', kind)}.{j}", ch[i], i)
                 for j in range(layers[i])]
        if i < n - 1:
            maps.append(FeatureMap(f"down_blocks.{i}.downsamplers.0", ch[i], i + 1))
    maps.append(FeatureMap("mid_block", ch[-1], n - 1))
    for i, kind in enumerate(config.up_block_types):
        c, level, last = ch[n - 1 - i], n - 1 - i, layers[n - 1 - i]
        maps += [FeatureMap(f"{layer(f'up_blocks.{i}', kind)}.{j}", c, level)
                 for j in range(last)]
        maps.append(FeatureMap(f"up_blocks.{i}.upsamplers.0", c, level - 1) if i < n - 1 else
                    FeatureMap(f"{layer(f'up_blocks.{i}', kind)}.{last}", c, level))
    return maps


def coarse_to_fine(maps: list[FeatureMap]) -> list[int]:
    """The maps' levels, coarse to fine: the order of the feature groups."""
    return sorted({m.level for m in maps}, reverse=True)


def group_by_resolution(outputs: list[Tensor], maps: list[FeatureMap]) -> list[Tensor]:
    """The maps' outputs, in forward order -> one tensor per resolution, coarse to fine, the maps
    concatenated on channels in forward order."""
    return [torch.cat([o for o, m in zip(outputs, maps, strict=True) if m.level == level], dim=1)
            for level in coarse_to_fine(maps)]


def _sample(output) -> Tensor:
    """A hooked module's output tensor: attentions return a tuple or a Transformer2DModelOutput."""
    if isinstance(output, Tensor):
        return output
    return output[0] if isinstance(output, tuple) else output.sample


class FeatureExtractor:
    """One guided forward of a frozen UNet -> the paper's feature pyramid.

    `stack_cfg` (the paper's public code, default): each group holds the unconditional and the
    conditional half's features side by side on channels, per sample (its `reshape(B/2, 2C, H,
    W)`); otherwise only the conditional half."""

    def __init__(self, unet: torch.nn.Module, *, stack_cfg: bool = True) -> None:
        unet = getattr(unet, "_orig_mod", unet)  # hooks need the eager module, not a compiled one
        check_unet_config(dict(unet.config))
        self.unet = unet.eval().requires_grad_(False)
        self.stack_cfg = stack_cfg
        self.maps = feature_maps(unet.config)
        self.modules: list[nn.Module] = [unet.get_submodule(m.module) for m in self.maps]

    @property
    def channels(self) -> list[int]:
        """Channels of each feature group, coarse to fine (SD 1.5, stacked: 15360, 14080, 8320,
        5120)."""
        halves = 2 if self.stack_cfg else 1
        return [halves * sum(m.channels for m in self.maps if m.level == level)
                for level in coarse_to_fine(self.maps)]

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor | int, cond: Tensor, uncond: Tensor) -> list[Tensor]:
        """x_t: B x 4 x h x w latents entering the feature step; t: their timesteps (B,) or one
        int; cond, uncond: B x 77 x D text embeddings. Returns four groups, coarse to fine:
        group g is B x C_g x (h / 2**(3-g)) x (w / 2**(3-g)), C_g = `channels[g]`."""
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(B)
        outputs = self.map_outputs(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                   torch.cat([uncond, cond]))
        groups = group_by_resolution(outputs, self.maps)                    # (2B, C, r, r)
        if self.stack_cfg:  # (B, 2C, r, r): sample b's uncond then cond channels
            return [torch.cat([g[:B], g[B:]], dim=1) for g in groups]
        return [g[B:] for g in groups]

    def map_outputs(self, latents: Tensor, t: Tensor, text: Tensor) -> list[Tensor]:
        """The output of every module in `modules`, in that order, for one UNet call."""
        outputs: list[Tensor | None] = [None] * len(self.modules)

        def keep(i: int):
            def hook(module, args, output):
                outputs[i] = _sample(output)
            return hook

        handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self.modules)]
        try:
            dtype = self.unet.dtype
            self.unet(latents.to(dtype), t, encoder_hidden_states=text.to(dtype))
        finally:
            for h in handles:
                h.remove()
        return outputs
