"""The grounding head (paper sec. 4.2, appendix A): SD's UNet features plus a class name's text
embedding in, one mask per class out. It follows the paper's public code (`seg_module.py`,
`Segmodule`) layer for layer, batched.

    visual encoder  per resolution group (coarse to fine: 8, 16, 32, 64 at 512x512) a 1x1 conv to
                    `reduced` channels, every group but the finest upsampled 2x; then coarse to
                    fine: upsample the running map to the next group's size, concatenate,
                    SegBlock (pre-activation residual block: per-image normalisation, ReLU,
                    spectral-normalised 3x3 convs), at 32, 64 and 64 -> a sum(reduced) =
                    240-channel pixel map at 64x64
    fusion          the pixel map cut into 4x4 patches -> tokens projected to 512 (keys, values);
                    class embeddings projected to 512 -> queries of a 3-layer pre-norm
                    transformer decoder; a 3-layer MLP -> one 240-d mask embedding per class
    masks           logits = mask embedding . pixel map, upsampled to the image size

Unlike the paper's public code (correct at batch size 1 only), every sample and every class query
is independent here: classes are padded per sample and masked out of attention and the loss, and
each image is normalised by its own statistics, as the official code's batch norm at batch 1.
The feature channels are laid out [all unconditional maps | all conditional maps] per group
(`actors.features`), the official [uncond_1, cond_1, uncond_2, cond_2, ...]: a permutation of
the 1x1 convs' input channels, which `train.grounding.convert_official` applies to the official
weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


@dataclass(frozen=True)
class GroundingHeadConfig:
    in_channels: tuple[int, ...] = (15360, 14080, 8320, 5120)  # feature groups, coarse to fine
    # (SD 1.5's 25 ldm block outputs, CFG halves stacked; FeatureExtractor.channels gives them
    # for any SD 1.x)
    reduced: tuple[int, ...] = (16, 32, 64, 128)  # 1x1-conv width per group, coarse to fine;
    # the pixel map and each mask embedding have their sum (240) channels
    text_dim: int = 768  # CLIP text hidden size for SD 1.x
    d_model: int = 512  # width of the transformer decoder
    n_heads: int = 8
    n_layers: int = 3
    ffn_dim: int = 2048
    patch: int = 4  # pixel-map patch size for the decoder's visual tokens
    conditional_norm: bool = False  # paper: conditional batch norm; its code: plain batch norm
    # (at batch 1: per-image statistics, see Norm)

    @property
    def pixel_dim(self) -> int:
        """Channels of the pixel map and of each mask embedding."""
        return sum(self.reduced)

    @classmethod
    def tiny(cls, in_channels: tuple[int, ...] = (128, 128, 112, 96), text_dim: int = 32
             ) -> GroundingHeadConfig:  # random-weight SD "tiny": tests and the demo
        return cls(in_channels=in_channels, reduced=(4, 4, 8, 8), text_dim=text_dim, d_model=32,
                   n_heads=2, n_layers=2, ffn_dim=64, patch=2)


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize to `size` (align_corners=False, as the official code)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def sn_conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    """The official SNConv2d: a 3x3 conv whose weight is divided by its spectral norm, estimated
    with one power iteration per training step (eps 1e-4). In eval mode (the labeller, Protocol
    I) no iteration runs: the norm comes from the stored singular vectors, so a mask does not
    depend on what was labelled before. The official test.py leaves its module in train mode,
    where every test forward runs one more iteration and stores it (README, differences)."""
    return spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1), n_power_iterations=1, eps=1e-4)


class Norm(nn.Module):
    """The official SegBlock's batch norm as the official code runs it: at batch 1 (train.py) and
    never in eval mode (test.py), so every image is normalised by its own statistics over (H, W),
    in training and at test time alike, and running averages are never used. That is instance
    normalisation (no affine, eps 1e-4), here at any batch size, so an image's output never
    depends on its batch. With `cond_dim`, the paper's conditional batch norm: scale
    1 + Linear(cond) and shift Linear(cond) per sample (BigGAN's ccbn)."""

    def __init__(self, channels: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.scale = nn.Linear(cond_dim, channels) if cond_dim is not None else None
        self.shift = nn.Linear(cond_dim, channels) if cond_dim is not None else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        x = F.instance_norm(x, eps=1e-4)                                    # (B, C, H, W)
        if self.scale is None:
            return x
        scale = 1 + self.scale(cond)[:, :, None, None]                      # (B, C, 1, 1)
        return x * scale + self.shift(cond)[:, :, None, None]


class SegBlock(nn.Module):
    """The official mix-conv block (BigGAN's pre-activation residual block, without upsampling):
    x = relu(norm(x)); h = conv2(relu(norm(conv1(x)))); out = h + x. The official activation is
    `nn.ReLU(inplace=True)`, so its `h = self.activation(x)` rectifies x as well and the residual
    is relu(norm(x)), not norm(x). Every mix block keeps its width, so the shortcut is the
    identity."""

    def __init__(self, channels: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = Norm(channels, cond_dim)
        self.conv1 = sn_conv3x3(channels, channels)
        self.norm2 = Norm(channels, cond_dim)
        self.conv2 = sn_conv3x3(channels, channels)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        x = F.relu(self.norm1(x, cond))                                     # (B, C, H, W)
        h = self.conv1(x)
        h = self.conv2(F.relu(self.norm2(h, cond)))                         # (B, C, H, W)
        return h + x


class VisualEncoder(nn.Module):
    """UNet feature groups -> one `pixel_dim`-channel pixel map at the finest group's size."""

    def __init__(self, cfg: GroundingHeadConfig) -> None:
        super().__init__()
        assert len(cfg.in_channels) == len(cfg.reduced), "one reduced width per feature group"
        self.reduce = nn.ModuleList(nn.Conv2d(c, r, 1, bias=False)
                                    for c, r in zip(cfg.in_channels, cfg.reduced, strict=True))
        widths = [sum(cfg.reduced[:i + 1]) for i in range(len(cfg.reduced))]  # 16, 48, 112, 240
        cond_dim = cfg.text_dim if cfg.conditional_norm else None
        self.mix = nn.ModuleList(SegBlock(w, cond_dim) for w in widths[1:])

    def forward(self, feats: list[Tensor], cond: Tensor | None = None) -> Tensor:
        # The official code upsamples every group but the finest 2x, then applies the 1x1 conv.
        # A 1x1 conv mixes channels pixel by pixel and bilinear upsampling mixes pixels channel
        # by channel, so the two commute: reducing first gives the same maps without upsampling
        # 15360-channel ones (tests/test_grounding.py checks it).
        *coarse, finest = feats
        maps = [upsample(r(f), (2 * f.shape[-2], 2 * f.shape[-1]))
                for r, f in zip(self.reduce[:-1], coarse, strict=True)]     # (B, r_i, 2h_i, 2w_i)
        maps.append(self.reduce[-1](finest))                                # (B, r_3, H, W)
        x = maps[0]
        for mix, m in zip(self.mix, maps[1:], strict=True):
            x = mix(torch.cat([upsample(x, m.shape[-2:]), m], dim=1), cond)  # (B, w_i, H_i, W_i)
        return x                                                            # (B, pixel_dim, H, W)


class Fusion(nn.Module):
    """Class queries attend to the pixel map's patches; an MLP makes each a mask embedding."""

    def __init__(self, cfg: GroundingHeadConfig) -> None:
        super().__init__()
        self.patch = cfg.patch
        self.visual_proj = nn.Linear(cfg.pixel_dim * cfg.patch**2, cfg.d_model, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.d_model, bias=False)
        # the official pre-norm layer, except that torch's attention projections have biases
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layers)  # no final norm, as official
        self.mask_mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(),
                                      nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(),
                                      nn.Linear(cfg.d_model, cfg.pixel_dim))

    def forward(self, pix: Tensor, text: Tensor, valid: Tensor) -> Tensor:
        p = self.patch
        tokens = F.unfold(pix, kernel_size=p, stride=p).transpose(1, 2)     # (B, HW/p^2, C p^2)
        q = self.decoder(self.text_proj(text), self.visual_proj(tokens),
                         tgt_key_padding_mask=~valid)                        # (B, K, d_model)
        return self.mask_mlp(q)                                             # (B, K, pixel_dim)


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
        pix = self.visual(feats, cond)                                      # (B, pixel_dim, H, W)
        emb = self.fusion(pix, text, valid)                                 # (B, K, pixel_dim)
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
    """Sigmoid + BCE per (sample, class), the pixel mean, summed over the pairs that count and
    divided by the batch size, as the official train.py (one BCEWithLogitsLoss per class, their
    sum / batch size): a sample's two classes weigh as much each as a one-class sample's one.
    logits, masks: B x K x H x W; valid: B x K, False for padding and unseen classes.
    skip_empty: leave out classes whose oracle mask is empty ("training without zero masks",
    the detector's false negatives; +12 unseen mIoU in the paper). No pair that counts: 0, with
    the graph kept (DDP needs every rank to backprop)."""
    use = trained_pairs(masks, valid) if skip_empty else valid               # (B, K)
    per_class = F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype),
                                                   reduction="none").mean((2, 3))  # (B, K)
    return per_class[use].sum() / logits.shape[0]
