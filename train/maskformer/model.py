"""MaskFormer for Protocol II (paper sec. 5.2): transformers' `MaskFormerForInstanceSegmentation`
with a ResNet backbone, its Hungarian-matched loss and its image processor, built from configs.

Variants: `paper` (ResNet-101, the MaskFormer paper's pixel decoder and 6-layer transformer
decoder with 100 queries) and `tiny` (a small ResNet, for tests and the demo). The backbone
starts from ImageNet weights (`--backbone-weights`: torchvision's resnet101 state dict, or a
folder holding a transformers ResNet), never from a segmentation checkpoint, which has seen the
unseen classes; its BatchNorm is then frozen, as detectron2's FrozenBN in MaskFormer's R-101
configs (their RESNETS.NORM is left at detectron2's default).

Training (`MaskFormerTraining`) is MaskFormer's loss as its own code computes it: deep
supervision (the Hungarian-matched loss on every decoder layer's output, each through the
decoder's final LayerNorm, as DETR's `return_intermediate`), and the mask loss normalised by
the number of target masks averaged over all DDP workers (`criterion.py`'s all-reduce; the
transformers loss only does so under accelerate). transformers' own `use_auxiliary_loss` path
is not used: it fails unless hidden states are asked for, and then it also supervises the
decoder's zero input, and the earlier layers' outputs without the final LayerNorm.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    DetrConfig,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerImageProcessor,
    ResNetBackbone,
    ResNetConfig,
)
from transformers.models.maskformer.modeling_maskformer import MaskFormerLoss

from factory.schema import IGNORE  # label-map value that no loss or metric counts

STAGES = ["stage1", "stage2", "stage3", "stage4"]
BACKBONE = "pixel_level_module.encoder."  # parameter names of the backbone contain this
SEGMENTATION_PRETRAINED = re.compile(r"mask2?former", re.IGNORECASE)


@dataclass(frozen=True)
class MaskFormerSpec:
    """Sizes of a MaskFormer (defaults: the paper's, MaskFormer R-101 as in its ADE/COCO runs)."""

    depths: tuple[int, ...] = (3, 4, 23, 3)  # ResNet-101
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    stem: int = 64
    block: str = "bottleneck"
    d_model: int = 256  # pixel decoder (FPN) and transformer decoder width
    decoder_layers: int = 6
    heads: int = 8
    ffn: int = 2048
    queries: int = 100

    @classmethod
    def tiny(cls) -> MaskFormerSpec:
        return cls(depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), stem=16, block="basic",
                   d_model=32, decoder_layers=2, heads=4, ffn=64, queries=16)


SPECS = {"paper": MaskFormerSpec, "tiny": MaskFormerSpec.tiny}


def maskformer_config(spec: MaskFormerSpec, num_labels: int) -> MaskFormerConfig:
    """The transformers config: `num_labels` classes, plus the no-object class the head adds."""
    backbone = ResNetConfig(embedding_size=spec.stem, hidden_sizes=list(spec.widths),
                            depths=list(spec.depths), layer_type=spec.block,
                            out_features=STAGES)
    decoder = DetrConfig(d_model=spec.d_model, decoder_layers=spec.decoder_layers,
                         decoder_attention_heads=spec.heads, decoder_ffn_dim=spec.ffn,
                         encoder_layers=0, num_queries=spec.queries)
    return MaskFormerConfig(backbone_config=backbone, decoder_config=decoder,
                            num_labels=num_labels, fpn_feature_size=spec.d_model,
                            mask_feature_size=spec.d_model)


def build_maskformer(variant: str, num_labels: int, backbone_weights: str | None = None,
                     seed: int = 0) -> MaskFormerForInstanceSegmentation:
    """A MaskFormer with random weights (seeded), the backbone from `backbone_weights` if
    given (its BatchNorm then frozen)."""
    if variant not in SPECS:
        raise ValueError(f"unknown MaskFormer variant {variant!r}: one of {', '.join(SPECS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskFormerForInstanceSegmentation(maskformer_config(SPECS[variant](), num_labels))
        init_like_the_original(model)
    if backbone_weights:
        load_backbone(model, backbone_weights)
        freeze_backbone_norm(model)
    return model


def freeze_backbone_norm(model: MaskFormerForInstanceSegmentation) -> None:
    """The backbone's BatchNorm layers -> torchvision's FrozenBatchNorm2d (detectron2's
    FrozenBN): ImageNet statistics and affine kept, whatever the batch or train mode. The
    state-dict keys stay those of BatchNorm (num_batches_tracked kept as a buffer), so
    transformers reloads a checkpoint as a plain model, to be frozen again for training."""
    from torchvision.ops import FrozenBatchNorm2d

    encoder = model.model.pixel_level_module.encoder
    for name, module in list(encoder.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(module, key).detach())
            frozen.register_buffer("num_batches_tracked", module.num_batches_tracked.clone())
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent) if parent else encoder, child,
                    frozen.to(module.weight.device))


def init_like_the_original(model: MaskFormerForInstanceSegmentation) -> None:
    """The transformer decoder initialised as MaskFormer's own code does (DETR's): xavier
    weights and N(0, 1) query embeddings. transformers draws both from N(0, 0.02), which suits
    loading its checkpoints but, trained from scratch, leaves every query's output alike (the
    decoder starts from zeros and its attention stays uniform), so all queries learn one mask."""
    transformer = model.model.transformer_module
    for p in transformer.decoder.parameters():
        if p.dim() > 1:
            torch.nn.init.xavier_uniform_(p)
    torch.nn.init.normal_(transformer.queries_embedder.weight)


class AllReducedMaskFormerLoss(MaskFormerLoss):
    """transformers' MaskFormer loss with MaskFormer's normaliser: the number of target masks
    summed over all DDP workers and divided by their number (`criterion.py`), so that every
    worker's mask loss has one scale. Keeps the last step's counts for reports."""

    def get_num_masks(self, class_labels: list[torch.Tensor], device: torch.device
                      ) -> torch.Tensor:
        local = sum(len(c) for c in class_labels)
        num_masks = torch.as_tensor(float(local), device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            world = torch.distributed.get_world_size()
        num_masks = torch.clamp(num_masks / world, min=1)
        self.last_counts = (local, float(num_masks))  # (this worker's masks, the normaliser)
        return num_masks


class MaskFormerTraining(nn.Module):
    """What a training step runs (and what DDP wraps): the model's forward and MaskFormer's
    loss terms, weighted. deep_supervision adds the terms of each earlier decoder layer
    (`loss_mask_0`, ... as transformers names them). The wrapped model is `.model`."""

    def __init__(self, model: MaskFormerForInstanceSegmentation, *,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        self.model = model
        self.deep_supervision = deep_supervision
        self.criterion = AllReducedMaskFormerLoss(
            model.config.num_labels, matcher=model.matcher, weight_dict=model.weight_dict,
            eos_coef=model.config.no_object_weight)

    def forward(self, pixel_values: torch.Tensor, mask_labels: list[torch.Tensor],
                class_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """pixel_values: B x 3 x S x S; mask_labels[b]: M_b x S x S; class_labels[b]: (M_b,).
        Returns the weighted loss terms; their sum is the loss."""
        m = self.model
        out = m.model(pixel_values, output_hidden_states=True)
        # the decoder's zero input, each layer's output, and the last layer's through the final
        # LayerNorm (the decoder's last_hidden_state, what inference predicts from)
        states = out.transformer_decoder_hidden_states
        n_layers = m.config.decoder_config.decoder_layers
        if len(states) != n_layers + 1:
            raise RuntimeError(f"expected the decoder's input and {n_layers} layer outputs, got "
                               f"{len(states)} hidden states")
        layers = [out.transformer_decoder_last_hidden_state]
        if self.deep_supervision:  # DETR's return_intermediate: norm(output) of every layer
            norm = m.model.transformer_module.decoder.layernorm
            layers = [norm(h) for h in states[1:-1]] + layers
        hidden = torch.stack(layers)                                            # (L, B, Q, C)
        classes = m.class_predictor(hidden)                                     # (L, B, Q, K + 1)
        masks = torch.einsum("lbqc,bchw->lbqhw", m.mask_embedder(hidden),
                             out.pixel_decoder_last_hidden_state)               # (L, B, Q, h, w)
        aux = [{"masks_queries_logits": masks[i], "class_queries_logits": classes[i]}
               for i in range(len(layers) - 1)]
        terms = self.criterion(masks[-1], classes[-1], mask_labels, class_labels, aux or None)
        return {key: value * next(w for k, w in m.weight_dict.items() if k in key)
                for key, value in terms.items()}


def targets(processor: MaskFormerImageProcessor, images: np.ndarray, labels: np.ndarray,
            device: torch.device | str) -> dict:
    """MaskFormer's inputs and targets for fixed-size crops. images: B x S x S x 3 uint8;
    labels: B x S x S training ids, IGNORE where no class counts."""
    enc = processor(images=list(images), segmentation_maps=list(labels), return_tensors="pt",
                    input_data_format="channels_last")
    return {"pixel_values": enc["pixel_values"].to(device),
            "mask_labels": [m.to(device) for m in enc["mask_labels"]],
            "class_labels": [c.to(device) for c in enc["class_labels"]]}


def semantic_scores(model: MaskFormerForInstanceSegmentation,
                    processor: MaskFormerImageProcessor, image: np.ndarray,
                    short_side: int) -> torch.Tensor:
    """K x H x W class scores for an H x W x 3 uint8 image, predicted with its shorter side
    resized to `short_side` (the training crop size) and the scores resized back: transformers'
    `post_process_semantic_segmentation` (MaskFormer's semantic inference), before its argmax."""
    h, w = image.shape[:2]
    scale = short_side / min(w, h)
    small = np.asarray(Image.fromarray(image).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
    enc = processor(images=[small], return_tensors="pt", input_data_format="channels_last")
    with torch.no_grad():
        out = model(pixel_values=enc["pixel_values"].to(next(model.parameters()).device))
        classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]   # (1, Q, K), no "no object"
        masks = out.masks_queries_logits.sigmoid()                      # (1, Q, h, w)
        scores = torch.einsum("bqc,bqhw->bchw", classes, masks)        # (1, K, h, w)
        return torch.nn.functional.interpolate(scores, size=(h, w), mode="bilinear",
                                               align_corners=False)[0].cpu()


def image_processor() -> MaskFormerImageProcessor:
    """Targets and normalisation for fixed-size uint8 crops: no resizing, ImageNet mean/std,
    255 ignored. `do_reduce_labels` stays off: it would turn the ignore label 255 into 254 (a
    real class id); label maps are mapped to training ids beforehand instead."""
    return MaskFormerImageProcessor(do_resize=False, do_rescale=True, do_normalize=True,
                                    ignore_index=IGNORE, do_reduce_labels=False)


def torchvision_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet state-dict keys -> transformers `ResNetBackbone` keys (fc dropped)."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        k = re.sub(r"^conv1\.", "embedder.embedder.convolution.", key)
        k = re.sub(r"^bn1\.", "embedder.embedder.normalization.", k)
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
        if m:
            stage, layer, rest = int(m[1]) - 1, m[2], m[3]
            rest = re.sub(r"^conv(\d)\.", lambda c: f"layer.{int(c[1]) - 1}.convolution.", rest)
            rest = re.sub(r"^bn(\d)\.", lambda c: f"layer.{int(c[1]) - 1}.normalization.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.convolution.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.normalization.", rest)
            k = f"encoder.stages.{stage}.layers.{layer}.{rest}"
        out[k] = value
    return out


def load_backbone(model: MaskFormerForInstanceSegmentation, path: str) -> None:
    """ImageNet weights into the backbone: a torchvision resnet state-dict file, or a folder
    holding a transformers ResNet (`save_pretrained`). Segmentation checkpoints are refused."""
    if SEGMENTATION_PRETRAINED.search(os.path.basename(os.path.normpath(path))):
        raise ValueError(f"{path!r} looks like a MaskFormer/Mask2Former checkpoint: those are "
                         "trained on COCO or ADE segmentation and have seen the unseen classes; "
                         "start from ImageNet backbone weights")
    encoder = model.model.pixel_level_module.encoder
    if os.path.isdir(path):
        state = ResNetBackbone.from_pretrained(path, out_features=STAGES).state_dict()
    elif os.path.isfile(path):
        state = torchvision_to_hf(torch.load(path, map_location="cpu", weights_only=True))
    else:
        raise ValueError(f"no backbone weights at {path!r}")
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path!r} does not fit the backbone: "
                         f"{str(e).splitlines()[1].strip()}") from None
