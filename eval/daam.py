"""The DAAM baseline of Protocol I (paper sec. 5.1, Table 1): Tang et al. 2022, "What the DAAM:
Interpreting Stable Diffusion Using Cross Attention".

DAAM needs no training: while SD generates an image, the cross-attention between the image and
each prompt word shows where the word went. A test image is regenerated here from its stored
prompt and noise seed by `SDGenerator` itself (same pipeline call, same image), while an attention
processor on each cross-attention layer records the conditional CFG half's attention
probabilities on the class words' tokens. The aggregation is the DAAM code's (castorini/daam,
`trace.py` and `heatmap.py`):

1. per layer, head and token, the maps are summed over timesteps at the layer's resolution;
2. each sum is upsampled (bicubic) to the latent size and clamped at 0 (bicubic undershoot), and
   the results are averaged over layers and heads;
3. a word's map is the mean of its tokens' maps, upsampled (bicubic) to the image size and
   min-max normalised to [0, 1]; its mask is heat >= threshold (with Protocol I's exclusive
   mask rule, only where it is also the hottest of the prompt's classes).

The layers are the `attn2` modules of the down and up blocks: DAAM leaves out the mid block,
whose maps are 8x8 at 512 px. Memory: the running sums of step 1 only, per sample
heads x (class tokens) x (pixels of all recorded layers) floats, about 7 MB for SD 1.5 with two
classes of four tokens each; no per-step map is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from actors.batch import as_lists, check_columns, object_column, with_lists
from actors.grounding_labeller import apply_mask_rule, check_mask_rule
from actors.names import DEFAULT_MODEL
from actors.sd_generator import SDGenerator
from factory.schema import encode_masks

DAAM_BLOCKS = ("down_blocks.", "up_blocks.")  # DAAM's UNetCrossAttentionLocator: no mid block


def is_daam_layer(processor_name: str) -> bool:
    """Whether a UNet `attn_processors` key is a cross-attention layer DAAM records."""
    return processor_name.startswith(DAAM_BLOCKS) and processor_name.endswith(".attn2.processor")


def class_token_spans(tokenizer, prompt: str, classes: list[str]) -> list[tuple[int, int]]:
    """[start, stop) of each class name's tokens in `prompt` as SD's text encoder reads it (BOS
    at 0, truncated to the tokenizer's length); a name may span several BPE tokens ("tvmonitor"
    is "tv", "monitor"). The prompt is searched from its end, the last class first and each
    earlier class before the next one's span, so that a name also found in the template ("a
    photograph of a photograph") or inside a later name ("dog", "hot dog") gets its own place.
    ValueError names a class whose tokens are not there."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    spans = []
    stop = len(ids)
    for name in reversed(classes):
        name_ids = tokenizer(name, add_special_tokens=False).input_ids
        n = len(name_ids)
        start = next((s for s in range(stop - n, 0, -1) if ids[s:s + n] == name_ids), None)
        if not n or start is None:
            raise ValueError(f"cannot find the tokens of class {name!r} in prompt {prompt!r}")
        spans.append((start, start + n))
        stop = start
    return spans[::-1]


def token_weights(spans: list[list[tuple[int, int]]]) -> tuple[Tensor, Tensor]:
    """Per sample, the token positions to record, (B, T) padded with 0, and each class's weights
    over them, (B, K, T): 1 / (its token count) on its own tokens, so that weights @ token maps
    is DAAM's mean over a word's tokens; padding tokens and padding classes weigh 0."""
    B, K = len(spans), max(len(s) for s in spans)
    T = max(sum(stop - start for start, stop in s) for s in spans)
    tokens = torch.zeros(B, T, dtype=torch.long)
    weights = torch.zeros(B, K, T)
    for b, sample in enumerate(spans):
        t = 0
        for k, (start, stop) in enumerate(sample):
            tokens[b, t:t + stop - start] = torch.arange(start, stop)
            weights[b, k, t:t + stop - start] = 1 / (stop - start)
            t += stop - start
    return tokens, weights


class AttentionSums:
    """Running sums over UNet calls (one per denoising step) of each recorded layer's
    conditional attention probabilities on the selected tokens.

    tokens: (B, T) token positions per sample (`token_weights`).
    sums:   layer name -> (B, heads, T, N), N the layer's flattened pixels."""

    def __init__(self, tokens: Tensor) -> None:
        self.tokens = tokens
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, attn: Attention, hidden_states: Tensor,
            encoder_hidden_states: Tensor) -> None:
        """Adds softmax(Q K^T / sqrt(d)) of the conditional half, computed apart from the layer's
        output in float32. hidden_states: (2B or B, N, C) image tokens; encoder_hidden_states:
        (2B or B, 77, D) text; the pipeline stacks CFG as [uncond, cond], so cond is the last B."""
        B, T = self.tokens.shape
        text = encoder_hidden_states[-B:]                                    # (B, 77, D)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states[-B:])).float()   # (B*heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(text)).float()                 # (B*heads, 77, d)
        probs = attn.get_attention_scores(q, k)                              # (B*heads, N, 77)
        probs = probs.view(B, attn.heads, *probs.shape[1:])                  # (B, heads, N, 77)
        index = self.tokens[:, None, None, :].expand(*probs.shape[:3], T)
        picked = probs.gather(3, index).transpose(2, 3)                      # (B, heads, T, N)
        self.sums.setdefault(name, torch.zeros_like(picked)).add_(picked)

    def token_maps(self, latent_hw: tuple[int, int]) -> Tensor:
        """(B, T, h, w): each layer's and head's time-summed map upsampled (bicubic) to the
        latent size h x w and clamped at 0, averaged over layers and heads (DAAM's
        `compute_global_heat_map`)."""
        h, w = latent_hw
        total: Tensor | int = 0
        count = 0
        for s in self.sums.values():
            B, H, T, N = s.shape
            maps = s.reshape(B * H * T, 1, *layer_hw(N, h, w))
            up = F.interpolate(maps, size=(h, w), mode="bicubic").clamp_(min=0)
            total = total + up.view(B, H, T, h, w).sum(1)                    # (B, T, h, w)
            count += H
        return total / count


def layer_hw(n: int, h: int, w: int) -> tuple[int, int]:
    """(rows, cols) of a layer's flattened map of n pixels: the latent's h x w halved, rounding
    up as SD's stride-2 convolutions do, until it has n pixels."""
    rows, cols = h, w
    while rows * cols > n:
        rows, cols = -(-rows // 2), -(-cols // 2)
    if rows * cols != n:
        raise ValueError(f"a map of {n} pixels is no downsampling of the {h}x{w} latent")
    return rows, cols


class CrossAttentionRecorder:
    """A diffusers attention processor for one cross-attention layer. Its output is that of the
    layer's own processor (SDPA, fused or not), so the UNet computes exactly what it computes
    without DAAM; the attention probabilities are computed apart, for `AttentionSums` only."""

    def __init__(self, processor, name: str, sums: AttentionSums) -> None:
        self.processor = processor
        self.name = name
        self.sums = sums

    def __call__(self, attn: Attention, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            # what we record must be what the layer attends with: SD's text, unmasked
            raise ValueError(f"{self.name}: DAAM records cross-attention to the prompt without "
                             "an attention mask (as SD 1.x runs it)")
        out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.sums.add(self.name, attn, hidden_states, encoder_hidden_states)
        return out


@contextmanager
def recording(unet: torch.nn.Module, sums: AttentionSums) -> Iterator[None]:
    """Wraps the processors of DAAM's cross-attention layers in `CrossAttentionRecorder`s for
    the block, then puts every original processor back, also on an error, so that a shared
    pipeline is left as it was."""
    originals = unet.attn_processors  # name -> processor; a new dict each time
    names = [n for n in originals if is_daam_layer(n)]
    if not names:
        raise ValueError("the UNet has no cross-attention layer in its down or up blocks")
    # set_attn_processor pops the dict it gets: hand it copies
    unet.set_attn_processor({**originals,
                             **{n: CrossAttentionRecorder(originals[n], n, sums) for n in names}})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(originals))


class DAAMLabeller:
    """DAAM masks for prompt classes as a batch stage: regenerates each image from its prompt and
    noise seed with `SDGenerator` (same model, steps, guidance and precision as the test set's
    `factory generate`, so the same image) while recording cross-attention.

    Input batch:  prompt (B,) str; noise_seed (B,) int; classes (B,) lists of K_b names, each
    found in its prompt.
    Output batch: the input plus image (B, H, W, 3) uint8, the regenerated images, and masks
    (B,) lists of K_b COCO RLE dicts (factory.schema), per class heat >= `threshold` by
    `mask_rule` (actors.grounding_labeller.MASK_RULES): independent, each class on its own, or
    exclusive, each pixel to the hottest class of its prompt."""

    def __init__(self, model: str = DEFAULT_MODEL, *, steps: int = 50, guidance: float = 7.5,
                 threshold: float = 0.4, mask_rule: str = "independent",
                 device: str | None = None, precision: str | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"DAAM threshold must lie in [0, 1], got {threshold}")
        check_mask_rule(mask_rule)
        # eager: DAAM records attention maps with Python hooks, which a compiled UNet skips
        self.generator = SDGenerator(model, steps=steps, guidance=guidance, device=device,
                                     precision=precision, compile=False)
        self.threshold = threshold
        self.mask_rule = mask_rule

    @torch.inference_mode()
    def heat_maps(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The regenerated images (B, H, W, 3) uint8 and, per sample, its classes' normalised
        heat maps (K_b, H, W) float32 in [0, 1], aligned with its `classes`."""
        check_columns(batch, ("prompt", "noise_seed", "classes"))
        pipe = self.generator.pipe
        classes = [[str(c) for c in cs] for cs in as_lists(batch["classes"])]
        if not all(classes):
            raise ValueError("every sample needs at least one class to find in its prompt")
        # every name is found before any GPU work
        spans = [class_token_spans(pipe.tokenizer, str(p), cs)
                 for p, cs in zip(batch["prompt"], classes, strict=True)]
        tokens, weights = token_weights(spans)                     # (B, T), (B, K, T)
        sums = AttentionSums(tokens.to(pipe.device))
        with recording(pipe.unet, sums):
            images = self.generator({"prompt": batch["prompt"],
                                     "noise_seed": batch["noise_seed"]})["image"]
        maps = sums.token_maps(self.generator.latent_shape[1:])    # (B, T, h, w)
        words = torch.einsum("bkt,bthw->bkhw", weights.to(maps.device), maps)
        heat = F.interpolate(words, size=images.shape[1:3], mode="bicubic")  # (B, K, H, W)
        lo, hi = heat.amin((2, 3), keepdim=True), heat.amax((2, 3), keepdim=True)
        heat = ((heat - lo) / (hi - lo + 1e-8)).cpu().numpy()      # DAAM's `expand_as`
        return images, [h[:len(cs)] for h, cs in zip(heat, classes, strict=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, heats = self.heat_maps(batch)
        masks = [encode_masks(apply_mask_rule(torch.from_numpy(h), self.threshold,
                                              self.mask_rule, inclusive=True).numpy())
                 for h in heats]
        return {**with_lists(batch), "image": images, "masks": object_column(masks)}
