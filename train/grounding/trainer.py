"""One training step of the grounding head, free of Ray: the frozen SD parts recompute features
and class embeddings on the trainer's device, the head predicts, the loss and IoU are computed.
`train.grounding.job` runs it under Ray Train; tests run it directly."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from actors.class_embeddings import ClassEmbedder
from actors.features import FeatureExtractor, encode_prompts
from actors.names import TINY
from actors.sd import load_sd
from train.grounding.model import grounding_loss, trained_pairs


def head_for(model: str) -> str:
    """The head variant that fits an SD: "tiny" for the tiny SD, else the paper's."""
    return "tiny" if model == TINY else "paper"


class FrozenSD:
    """SD's UNet (features) and text encoder (class embeddings), loaded once per worker, frozen;
    bf16 on a GPU, float32 on the CPU."""

    def __init__(self, model: str, device: str | torch.device) -> None:
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_sd(model, device=self.device, dtype=dtype)
        self.extractor = FeatureExtractor(self.pipe.unet)
        self.embedder = ClassEmbedder(self.pipe.tokenizer, self.pipe.text_encoder)

    def head_overrides(self) -> dict:
        """The head's config fields that depend on this SD."""
        return {"in_channels": tuple(self.extractor.channels),
                "text_dim": self.pipe.text_encoder.config.hidden_size}

    def features(self, batch: dict[str, np.ndarray]) -> list[Tensor]:
        """The feature groups of a batch with x_t (B, 4, h, w), t (B,) and prompt (B,)."""
        # copies: Ray Data hands read-only arrays, which torch.from_numpy warns about
        x_t = torch.from_numpy(np.array(batch["x_t"])).to(self.device)
        t = torch.from_numpy(np.array(batch["t"])).to(self.device)
        cond, uncond = encode_prompts(self.pipe, [str(p) for p in batch["prompt"]])
        return self.extractor(x_t, t, cond, uncond)

    def class_embeddings(self, names: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Per sample a list of class names ("" = padding) -> embeddings B x K x D and valid
        B x K (a real name), padded to the longest list."""
        k = max(map(len, names))
        rows = [list(r) + [""] * (k - len(r)) for r in names]
        flat = [n for row in rows for n in row if n]
        emb = dict(zip(flat, self.embedder(flat), strict=True)) if flat else {}
        dim = self.pipe.text_encoder.config.hidden_size
        text = torch.stack([torch.stack([emb[n] if n else torch.zeros(dim) for n in row])
                            for row in rows]).to(self.device)               # (B, K, D)
        valid = torch.tensor([[bool(n) for n in row] for row in rows], device=self.device)
        return text, valid

    def inputs(self, batch: dict[str, np.ndarray]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """A `training_batch` -> (features, class embeddings B x K x D, valid B x K, masks
        B x K x H x W), on this device."""
        text, _ = self.class_embeddings([list(c) for c in batch["classes"]])
        valid = torch.from_numpy(np.asarray(batch["valid"], dtype=bool)).to(self.device)
        masks = torch.from_numpy(np.asarray(batch["masks"])).to(self.device)
        return self.features(batch), text, valid, masks


def mask_iou(logits: Tensor, masks: Tensor, use: Tensor) -> float:
    """Mean IoU of the thresholded predictions (sigmoid > 0.5) over the (sample, class) pairs in
    `use` (B x K)."""
    pred, gt = logits > 0, masks > 0
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float()
    iou = inter / union.clamp(min=1)
    return float(iou[use].mean()) if use.any() else float("nan")


def train_step(head: torch.nn.Module, opt: torch.optim.Optimizer, inputs, *,
               skip_empty: bool = True) -> dict[str, float]:
    feats, text, valid, masks = inputs
    logits = head(feats, text, valid, size=masks.shape[-2:])                # (B, K, H, W)
    loss = grounding_loss(logits, masks, valid, skip_empty=skip_empty)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()),
            "iou": mask_iou(logits.detach(), masks, trained_pairs(masks, valid))}
