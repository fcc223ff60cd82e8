"""`python -m train.grounding.convert_official CKPT OUT`: a grounding head of the paper's public
code (Lipurple/Grounded-Diffusion, `ldm/models/seg_module.py`, `Segmodule`: the state dict its
train.py saves, and its released `grounding_module.pth`) as a checkpoint folder of this project,
for `factory label` and Protocol I.

    official (state dict key)                   here
    {low,mid,high,highest}_feature_conv.0       visual.reduce.{0,1,2,3}: input channels permuted
                                                from [uncond_1, cond_1, uncond_2, cond_2, ...] to
                                                [uncond_1, uncond_2, ... | cond_1, cond_2, ...]
    {mid,high,highest}_feature_mix_conv.conv1/2 visual.mix.{0,1,2}.conv1/2: weight and bias; the
                                                singular vector u0 after one power iteration,
                                                the one the official test forward runs, as the
                                                spectral norm's _u and _v
    transfromer_decoder.layers.i                fusion.decoder.layers.i (the same names); the
                                                attention biases, which the official layer has
                                                not, are zeros
    mlp.layers.{0,1,2}                          fusion.mask_mlp.{0,2,4}
    to_k, to_q                                  fusion.visual_proj, fusion.text_proj
    stored_mean/var1/2, conv*.sv0               dropped: the official module never leaves train
                                                mode, so its running statistics are never read,
                                                and sv0 only logs the norm

The official head reads SD 1.x's features (its 1x1 convs take 1280*6*2, (1280*5+640)*2,
(1280+640*4+320)*2 and (640+320*6)*2 channels): the converted head is the "paper" head.
"""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from actors.features import coarse_to_fine, feature_maps
from actors.names import DEFAULT_MODEL, TINY
from factory.errors import FactoryError
from factory.vocab import get_split
from train.grounding.checkpoint import save_head
from train.grounding.model import GroundingHead, build_grounding_head

# SD 1.x's UNet, whose block outputs the official head reads (configs/stable-diffusion/
# v1-inference.yaml: channels 320 x (1, 2, 4, 4), 2 res blocks, attention at the first three)
SD1_UNET = SimpleNamespace(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
GROUPS = ("low", "mid", "high", "highest")  # the official feature groups, coarse to fine
SN_EPS = 1e-4  # the official SNConv2d's eps (seg_module.py: `eps=1e-04`)
N_LAYERS = 3  # the official decoder's layers
DROPPED = ("stored_mean1", "stored_var1", "stored_mean2", "stored_var2")


def group_maps() -> list[list[int]]:
    """Each feature group's maps' channels (one CFG half), coarse to fine, in forward order."""
    maps = feature_maps(SD1_UNET)
    return [[m.channels for m in maps if m.level == level] for level in coarse_to_fine(maps)]


def official_channel_order(channels: list[int]) -> Tensor:
    """For our channel j of a group, the official channel it is. Ours: every map's unconditional
    half, then every map's conditional half (`FeatureExtractor`); the official reshapes each
    map's (2, C) CFG batch alone to 2C channels (openaimodel.py), so map m's halves sit side by
    side."""
    starts = torch.cumsum(torch.tensor([0] + channels[:-1]), 0) * 2      # map m's first channel
    return torch.cat([torch.arange(c) + s + half * c
                      for half in (0, 1) for c, s in zip(channels, starts.tolist(), strict=True)])


def singular_vectors(weight: Tensor, u0: Tensor) -> tuple[Tensor, Tensor]:
    """The official `power_iteration` from u0 (1 x out), once: (u, v), with which torch's
    spectral norm in eval mode divides by u . W v, the official's norm in that forward."""
    w = weight.flatten(1)                                                  # (out, in k k)
    v = F.normalize(u0 @ w, eps=SN_EPS)                                    # (1, in k k)
    u = F.normalize(v @ w.t(), eps=SN_EPS)                                 # (1, out)
    return u[0], v[0]


def key_map() -> dict[str, str]:
    """Official key -> ours, for every tensor that is copied as it is or permuted."""
    keys = {f"{g}_feature_conv.0.weight": f"visual.reduce.{i}.weight"
            for i, g in enumerate(GROUPS)}
    for i, g in enumerate(GROUPS[1:]):
        for conv in ("conv1", "conv2"):
            keys[f"{g}_feature_mix_conv.{conv}.weight"] = (
                f"visual.mix.{i}.{conv}.parametrizations.weight.original")
            keys[f"{g}_feature_mix_conv.{conv}.bias"] = f"visual.mix.{i}.{conv}.bias"
    for i in range(N_LAYERS):
        layer = f"layers.{i}"
        for name in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                     "multihead_attn.in_proj_weight", "multihead_attn.out_proj.weight",
                     *(f"{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3")
                       for p in ("weight", "bias"))):
            keys[f"transfromer_decoder.{layer}.{name}"] = f"fusion.decoder.{layer}.{name}"
    for i in range(3):
        for p in ("weight", "bias"):
            keys[f"mlp.layers.{i}.{p}"] = f"fusion.mask_mlp.{2 * i}.{p}"
    keys["to_k.weight"] = "fusion.visual_proj.weight"
    keys["to_q.weight"] = "fusion.text_proj.weight"
    return keys


def official_keys() -> list[str]:
    """Every key of an official Segmodule state dict."""
    sn = [f"{g}_feature_mix_conv.{conv}.{b}" for g in GROUPS[1:] for conv in ("conv1", "conv2")
          for b in ("u0", "sv0")]
    stats = [f"{g}_feature_mix_conv.{b}" for g in GROUPS[1:] for b in DROPPED]
    return [*key_map(), *sn, *stats]


def _names(keys: list[str], most: int = 3) -> str:
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def convert(official: dict[str, Tensor]) -> GroundingHead:
    """The "paper" head with the weights of an official Segmodule state dict; FactoryError names
    what does not fit."""
    want = official_keys()
    missing = [k for k in want if k not in official]
    if missing:
        hint = (" (a checkpoint of this project's head: use it as it is)"
                if "visual.reduce.0.weight" in official else "")
        raise FactoryError(f"not an official Segmodule state dict: missing {len(missing)} of "
                           f"its {len(want)} keys: {_names(missing)}{hint}")
    extra = sorted(set(official) - set(want))
    if extra:
        raise FactoryError(f"not an official Segmodule state dict: unexpected {_names(extra)}")
    head = build_grounding_head("paper")
    ours = head.state_dict()
    maps = group_maps()
    assert [2 * sum(c) for c in maps] == list(head.cfg.in_channels), "SD 1.x's feature groups"
    state = {k: torch.zeros_like(v) for k, v in ours.items()  # absent from the official layer
             if k.endswith(("in_proj_bias", "out_proj.bias"))}
    for src, dst in key_map().items():
        w = official[src].float()
        if w.shape != ours[dst].shape:
            raise FactoryError(f"{src} is {tuple(w.shape)}, not the official Segmodule's "
                               f"{tuple(ours[dst].shape)}")
        if dst.startswith("visual.reduce."):
            w = w[:, official_channel_order(maps[int(dst.split(".")[2])])]
        state[dst] = w
    for i, g in enumerate(GROUPS[1:]):
        for conv in ("conv1", "conv2"):
            u0 = official[f"{g}_feature_mix_conv.{conv}.u0"].float()
            prefix = f"visual.mix.{i}.{conv}.parametrizations.weight"
            if u0.shape != (1, ours[f"{prefix}.0._u"].shape[0]):
                raise FactoryError(f"{g}_feature_mix_conv.{conv}.u0 is {tuple(u0.shape)}, not "
                                   f"(1, {ours[f'{prefix}.0._u'].shape[0]})")
            state[f"{prefix}.0._u"], state[f"{prefix}.0._v"] = singular_vectors(
                state[f"{prefix}.original"], u0)
    head.load_state_dict(state)
    return head


def read_official(path: str) -> dict[str, Tensor]:
    """The state dict in `path`, or FactoryError in one line."""
    if os.path.isdir(path):
        raise FactoryError(f"{path!r} is a folder: give the official Segmodule's .pth file (a "
                           "checkpoint folder of this project needs no conversion)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FactoryError(f"cannot read {path!r} as a torch checkpoint: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FactoryError(f"{path!r} holds a {type(state).__name__} that is not a state dict "
                           "(names to tensors): not an official Segmodule checkpoint")
    return state


def convert_checkpoint(ckpt: str, out: str, *, split: str = "pascal", fold: str = "1",
                       model: str = DEFAULT_MODEL) -> str:
    """Write the converted head of the official checkpoint `ckpt` to the folder `out` (head.pt,
    head.json, as `load_grounding_head` reads them); returns `out`."""
    if model == TINY:
        raise FactoryError("the official head reads SD 1.x's features; the tiny SD's are of "
                           "other sizes: give --model an SD 1.x")
    try:
        seen = list(get_split(split, fold).seen)
    except ValueError as e:
        raise FactoryError(str(e)) from None
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FactoryError(f"{out!r} exists and is not an empty folder: give a new OUT")
    head = convert(read_official(ckpt))
    os.makedirs(out, exist_ok=True)
    # the official checkpoint does not record its training steps: 0
    save_head(out, head, 0, {"kind": "grounding-head", "split": split, "fold": str(fold),
                             "model": model, "seen": seen,
                             "converted_from": os.path.abspath(ckpt)})
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("ckpt")
@click.argument("out")
@click.option("--split", default="pascal", help="The split the head was trained on.")
@click.option("--fold", default="1", help="Its fold (the official train.py's --class_split).")
@click.option("--model", default=DEFAULT_MODEL,
              help="The SD 1.x whose features the head reads (hub id or local folder).")
def cli(ckpt: str, out: str, split: str, fold: str, model: str) -> None:
    """Convert an official Segmodule checkpoint (CKPT, a .pth state dict) into a head checkpoint
    folder OUT for `factory label` and Protocol I."""
    convert_checkpoint(ckpt, out, split=split, fold=fold, model=model)
    click.echo(f"wrote {out}: the official head of {ckpt} for {split} fold {fold} on {model}")


def main(argv: list[str] | None = None) -> None:
    from factory.command import run_command

    run_command(cli, argv, prog_name="python -m train.grounding.convert_official")


if __name__ == "__main__":
    main()
