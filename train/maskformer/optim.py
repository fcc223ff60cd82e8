"""MaskFormer's optimisation (its `train_net.py` and the solver of its and ZegFormer's configs),
for any model that knows nothing of it:

- AdamW, the backbone's parameters at `backbone_multiplier` x the learning rate
  (SOLVER.BACKBONE_MULTIPLIER 0.1), no weight decay on normalisation layers and embeddings
  (detectron2's SOLVER.WEIGHT_DECAY_NORM 0.0, MaskFormer's SOLVER.WEIGHT_DECAY_EMBED 0.0);
- detectron2's WarmupPolyLR: lr(i) = base x warm-up(i) x (1 - i / steps) ** power (DeepLab's
  POLY_LR_POWER 0.9), the linear warm-up rising from `warmup_factor` to 1 over `warmup_steps`
  (MaskFormer's semantic-segmentation configs and ZegFormer's VOC config set WARMUP_ITERS 0);
- the gradient norm of the full model clipped at `clip` (CLIP_GRADIENTS: full_model, 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.maskformer.model import BACKBONE

NO_DECAY = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
            nn.Embedding)


@dataclass(frozen=True)
class Schedule:
    """The optimiser and learning-rate schedule (defaults: MaskFormer's, the paper's lr and
    weight decay)."""

    steps: int = 40_000  # the schedule's length: poly decay reaches 0 here
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_multiplier: float = 0.1
    poly_power: float = 0.9
    warmup_steps: int = 0
    warmup_factor: float = 0.001  # detectron2's SOLVER.WARMUP_FACTOR: lr x this at step 0
    clip: float = 0.01  # full-model gradient-norm clip; 0: none

    def check(self) -> None:
        """ValueError naming the first bad value."""
        for name, value, ok, rule in (
                ("steps", self.steps, self.steps > 0, "> 0"),
                ("lr", self.lr, self.lr > 0, "> 0"),
                ("weight decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                ("backbone lr multiplier", self.backbone_multiplier,
                 self.backbone_multiplier >= 0, ">= 0"),
                ("poly power", self.poly_power, self.poly_power >= 0, ">= 0"),
                ("warm-up steps", self.warmup_steps, 0 <= self.warmup_steps < self.steps,
                 f"in 0 .. {self.steps - 1} (below --steps)"),
                ("warm-up factor", self.warmup_factor, 0 < self.warmup_factor <= 1,
                 "in (0, 1]"),
                ("gradient clip", self.clip, self.clip >= 0, ">= 0 (0: none)")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {value}")

    def factor(self, step: int) -> float:
        """The learning rate of update `step` (0-based) over the base: WarmupPolyLR's."""
        warmup = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            warmup = self.warmup_factor * (1 - alpha) + alpha
        return warmup * (1 - min(step, self.steps) / self.steps) ** self.poly_power


def param_groups(model: nn.Module, s: Schedule) -> list[dict]:
    """AdamW parameter groups as MaskFormer's `build_optimizer` makes them, merged by their
    (lr, weight decay): each group is named ("backbone" or "head", "/no-decay")."""
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            backbone = BACKBONE in f"{module_name}.{name}"
            decay = not isinstance(module, NO_DECAY)
            key = ("backbone" if backbone else "head") + ("" if decay else "/no-decay")
            group = groups.setdefault(key, {
                "name": key, "params": [],
                "lr": s.lr * (s.backbone_multiplier if backbone else 1.0),
                "weight_decay": s.weight_decay if decay else 0.0})
            group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, s: Schedule, start: int = 0, state: dict | None = None
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` and its WarmupPolyLR schedule standing at step `start`, with
    the optimiser's `state` (a saved `state_dict`) when a run continues. The schedule is a
    function of the step: it has no state to save."""
    opt = torch.optim.AdamW(param_groups(model, s), lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: s.factor(start + i))
    if state is not None:
        opt.load_state_dict(state)  # moments; its lrs are those of the saved schedule
        for group, base in zip(opt.param_groups, schedule.base_lrs, strict=True):
            group["lr"] = base * s.factor(start)
    return opt, schedule


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer,
                  schedule: torch.optim.lr_scheduler.LRScheduler, s: Schedule) -> dict:
    """After backward: clip the full model's gradient norm, step the optimiser and the
    schedule. Returns the gradient norm before clipping and each group's lr of this update."""
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    norm = float("nan")
    if s.clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], s.clip))
    opt.step()
    schedule.step()
    return {"grad_norm": norm, "lr": lrs}
