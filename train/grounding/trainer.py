"""One training step of the grounding head, free of Ray: the frozen SD parts
(`actors.frozen_sd.FrozenSD`) recompute features and class embeddings on the trainer's device,
the head predicts, the loss and IoU are computed.
`train.grounding.job` runs it under Ray Train; tests run it directly."""

from __future__ import annotations

import torch
from torch import Tensor

from actors.names import TINY
from train.grounding.model import grounding_loss, trained_pairs


def head_for(model: str) -> str:
    """The head variant that fits an SD: "tiny" for the tiny SD, else the paper's."""
    return "tiny" if model == TINY else "paper"


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
