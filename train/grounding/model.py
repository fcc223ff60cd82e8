"""The grounding head (paper sec. 4.2, appendix A): SD's UNet features plus a class name's text
embedding in, one mask per class out.

    visual encoder  per resolution group a 1x1 conv, then coarse to fine: upsample, concatenate,
                    mix-conv; a `mask_dim`-channel pixel map at the finest resolution
    fusion          the pixel map cut into patches -> tokens (keys, values); class embeddings ->
                    queries of a transformer decoder; an MLP -> one mask embedding per class
    masks           logits = mask embedding . pixel map, upsampled to the image size

Unlike the paper's public code (correct at batch size 1 only), every sample and every class query
is independent here: classes are padded per sample and masked out of attention and the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GroundingHeadConfig:
    in_channels: tuple[int, ...] = (7680, 3840, 3200, 1920)  # feature groups, coarse to fine
    # (SD 1.5 with CFG halves stacked; FeatureExtractor.channels gives them for any SD 1.x)
    reduced: tuple[int, ...] = (16, 32, 64, 128)  # 1x1-conv width per group, coarse to fine
    mask_dim: int = 240  # channels of the pixel map and of each mask embedding
    text_dim: int = 768  # CLIP text hidden size for SD 1.x
    d_model: int = 512  # width of the transformer decoder
    n_heads: int = 8
    n_layers: int = 3
    ffn_dim: int = 2048
    patch: int = 4  # pixel-map patch size for the decoder's visual tokens
    conditional_norm: bool = False  # paper: conditional batch norm; its code: plain batch norm

    @classmethod
    def tiny(cls, in_channels: tuple[int, ...] = (96, 64, 48, 48), text_dim: int = 32
             ) -> GroundingHeadConfig:  # random-weight SD "tiny": tests and the demo
        return cls(in_channels=in_channels, reduced=(4, 4, 8, 8), mask_dim=16, text_dim=text_dim,
                   d_model=32, n_heads=2, n_layers=2, ffn_dim=64, patch=2)


class MixConv(nn.Module):
    """Two 3x3 convs with batch norm and a residual path (BigDatasetGAN's mix-conv block). With
    `conditional`, the second norm's scale and shift come from a condition vector."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, affine=cond_dim is None)
        self.film = nn.Linear(cond_dim, 2 * c_out) if cond_dim is not None else None
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))                               # (B, c_out, H, W)
        h = self.norm2(self.conv2(h))
        if self.film is not None:
            scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1)
            h = h * (1 + scale) + shift
        return F.relu(h + self.skip(x))


class VisualEncoder(nn.Module):
    """UNet feature groups -> one `mask_dim`-channel pixel map at the finest group's size."""

    def __init__(self, cfg: GroundingHeadConfig) -> None:
        super().__init__()
        assert len(cfg.in_channels) == len(cfg.reduced), "one reduced width per feature group"
        self.reduce = nn.ModuleList(nn.Conv2d(c, r, 1) for c, r in zip(cfg.in_channels,
                                                                           cfg.reduced,
                                                                           strict=True))
        widths = [cfg.reduced[0]]
        for i, r in enumerate(cfg.reduced[1:], start=1):
            last = i == len(cfg.reduced) - 1
            widths.append(cfg.mask_dim if last else widths[-1] + r)
        cond_dim = cfg.text_dim if cfg.conditional_norm else None
        self.mix = nn.ModuleList(MixConv(widths[i - 1] + cfg.reduced[i], widths[i], cond_dim)
                                 for i in range(1, len(cfg.reduced)))

    def forward(self, feats: list[Tensor], cond: Tensor | None = None) -> Tensor:
        x = self.reduce[0](feats[0])                                        # (B, r_0, h_0, w_0)
        for reduce, mix, f in zip(self.reduce[1:], self.mix, feats[1:], strict=True):
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False)
            x = mix(torch.cat([x, reduce(f)], dim=1), cond)                   # (B, w_i, h_i, w_i)
        return x                                                            # (B, mask_dim, H, W)


class Fusion(nn.Module):
    """Class queries attend to the pixel map's patches; an MLP makes each a mask embedding."""

    def __init__(self, cfg: GroundingHeadConfig) -> None:
        super().__init__()
        self.patch = cfg.patch
        self.visual_proj = nn.Linear(cfg.mask_dim * cfg.patch**2, cfg.d_model)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.d_model)
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim, dropout=0.0,
                                           batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layers)
        self.mask_mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(),
                                      nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(),
                                      nn.Linear(cfg.d_model, cfg.mask_dim))

    def forward(self, pix: Tensor, text: Tensor, valid: Tensor) -> Tensor:
        p = self.patch
        tokens = F.unfold(pix, kernel_size=p, stride=p).transpose(1, 2)     # (B, HW/p^2, C p^2)
        q = self.decoder(self.text_proj(text), self.visual_proj(tokens),
                         tgt_key_padding_mask=~valid)                        # (B, K, d_model)
        return self.mask_mlp(q)                                             # (B, K, mask_dim)


class GroundingHead(nn.Module):
    def __init__(self, cfg: GroundingHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisualEncoder(cfg)
        self.fusion = Fusion(cfg)

    def forward(self, feats: list[Tensor], text: Tensor, valid: Tensor | None = None,
                size: tuple[int, int] | None = None) -> Tensor:
        """Mask logits per class query.
        feats: UNet feature groups, coarse to fine; feats[i] is B x C_i x H_i x W_i.
        text:  class embeddings, B x K x text_dim (K classes, padded where `valid` is False).
        valid: B x K bool, True for real classes [default: all].
        size:  output size, e.g. the image's [default: the finest group's].
        Returns B x K x H x W logits."""
        if valid is None:
            valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        dtype = self.fusion.text_proj.weight.dtype  # features may come in the UNet's bf16
        feats, text = [f.to(dtype) for f in feats], text.to(dtype)
        cond = None
        if self.cfg.conditional_norm:  # the mean embedding of the sample's real classes
            w = valid.to(text.dtype)[..., None]
            cond = (text * w).sum(1) / w.sum(1).clamp(min=1)                 # (B, text_dim)
        pix = self.visual(feats, cond)                                      # (B, mask_dim, H, W)
        emb = self.fusion(pix, text, valid)                                 # (B, K, mask_dim)
        logits = torch.einsum("bkc,bchw->bkhw", emb, pix)                   # (B, K, H, W)
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            # bilinear upsampling is linear, so upsampling the logits equals the dot product
            # with an upsampled pixel map, at a fraction of the memory
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


HEAD_CONFIGS = {"paper": GroundingHeadConfig, "tiny": GroundingHeadConfig.tiny}


def build_grounding_head(name: str = "paper", checkpoint: str | None = None,
                         **overrides) -> GroundingHead:
    """A head by variant name ("paper", "tiny"), with config fields overridden (e.g. the feature
    channels of the SD in use), optionally loading a state dict."""
    if name not in HEAD_CONFIGS:
        raise ValueError(f"unknown head {name!r}: one of {', '.join(HEAD_CONFIGS)}")
    cfg = GroundingHeadConfig(**{**asdict(HEAD_CONFIGS[name]()), **overrides})
    head = GroundingHead(cfg)
    if checkpoint is not None:
        head.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return head


def trained_pairs(masks: Tensor, valid: Tensor) -> Tensor:
    """B x K: the (sample, class) pairs that teach the head, real seen classes with a non-empty
    oracle mask."""
    return valid & (masks.flatten(2) > 0).any(-1)


def grounding_loss(logits: Tensor, masks: Tensor, valid: Tensor,
                   skip_empty: bool = True) -> Tensor:
    """Sigmoid + BCE per (sample, class), averaged over the pairs that count (paper sec. 4.3).
    logits, masks: B x K x H x W; valid: B x K, False for padding and unseen classes.
    skip_empty: leave out classes whose oracle mask is empty ("training without zero masks",
    the detector's false negatives; +12 unseen mIoU in the paper)."""
    use = trained_pairs(masks, valid) if skip_empty else valid               # (B, K)
    if not use.any():
        return logits.sum() * 0.0  # keeps the graph (DDP needs every rank to backprop)
    per_class = F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype),
                                                   reduction="none").mean((2, 3))  # (B, K)
    return per_class[use].mean()
