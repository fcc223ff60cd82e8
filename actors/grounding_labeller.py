"""`GroundingLabeller`: a trained grounding head labels generated images (paper sec. 5.2,
appendix B.3), for any class the prompt names, seen in training or not.

From each sample's stored latent x_t it recomputes SD's features (one guided UNet forward,
`FeatureExtractor`), embeds the prompt's class names, and lets the head predict one mask
probability per class. Each class's mask is its own probability > `threshold`, as the paper's
inference (`test.py`: `label_pred_prob > 0.5`) thresholds each class's sigmoid on its own, so the
masks of a prompt's two classes may overlap. The semantic label map, which must be exclusive,
gives each pixel the class of highest probability if that probability exceeds `threshold`, else
background; with an uncertainty band (low, high) pixels whose highest probability lies in
(low, high] are labelled 255, ignore (as Dataset Diffusion does), those at or below `low`
background, and a class's mask is its probability > high.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from actors.batch import check_columns, default_device, object_column, with_lists
from factory.schema import IGNORE, encode_masks

# How per-class scores in [0, 1] (the head's probabilities, DAAM's normalised heat) become masks
MASK_RULES = {
    "independent": "each class's score above the threshold on its own (the head: >, as the "
                   "paper's test.py; DAAM: >=), so masks may overlap",
    "exclusive": "each pixel to the class of highest score if that is above the threshold, so "
                 "masks are disjoint (a label map's)",
}


def check_band(threshold: float, ignore_band: tuple[float, float] | None) -> tuple[float, float]:
    """(low, high): pixels with top probability > high are labelled, <= low are background, the
    rest ignore. Without a band, low = high = threshold."""
    low, high = ignore_band if ignore_band is not None else (threshold, threshold)
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"thresholds must satisfy 0 < low <= high < 1, got {low} and {high}"
                         if ignore_band is not None else
                         f"threshold must lie in (0, 1), got {threshold}")
    return low, high


def label_maps(probs: Tensor, class_ids: Tensor, valid: Tensor, low: float, high: float
               ) -> Tensor:
    """probs: B x K x H x W mask probabilities; class_ids: B x K label ids; valid: B x K (False
    for padding). Returns B x H x W uint8 label maps: the most probable class where its
    probability is > high, 0 where it is <= low, 255 (ignore) in between."""
    p = probs.masked_fill(~valid[..., None, None], -1.0)                     # (B, K, H, W)
    top, k = p.max(dim=1)                                                    # (B, H, W)
    ids = torch.gather(class_ids, 1, k.flatten(1)).view_as(k)                # (B, H, W)
    label = torch.where(top > high, ids, torch.full_like(ids, IGNORE))
    return torch.where(top <= low, torch.zeros_like(ids), label).to(torch.uint8)


def check_mask_rule(rule: str) -> None:
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}: one of {', '.join(MASK_RULES)}")


def apply_mask_rule(scores: Tensor, threshold: float, rule: str = "independent",
                    valid: Tensor | None = None, *, inclusive: bool = False) -> Tensor:
    """Per-class masks by `rule` (see MASK_RULES) from per-class scores in [0, 1]: a score
    counts where it is > threshold (the head, as test.py), or >= with `inclusive` (DAAM).
    scores: ... x K x H x W; valid: ... x K, False for padding classes, whose masks are empty
    (None: all valid). Returns ... x K x H x W bool."""
    check_mask_rule(rule)
    if valid is None:
        valid = torch.ones(scores.shape[:-2], dtype=torch.bool, device=scores.device)
    valid = valid[..., None, None]                                           # (..., K, 1, 1)
    above = torch.ge if inclusive else torch.gt
    if rule == "independent":
        return above(scores, threshold) & valid
    top, k = scores.masked_fill(~valid, -1.0).max(dim=-3, keepdim=True)      # (..., 1, H, W)
    classes = torch.arange(scores.shape[-3], device=scores.device)[:, None, None]  # (K, 1, 1)
    return (k == classes) & above(top, threshold)


def mask_scores(probs: Tensor, masks: Tensor) -> Tensor:
    """Each class's mean probability inside its mask (0 for an empty mask): B x K."""
    inside = (probs * masks).flatten(2).sum(-1)
    return inside / masks.flatten(2).sum(-1).clamp(min=1)


class GroundingLabeller:
    """The grounding head as a batch stage.

    Input batch:  prompt (B,) str; classes, class_ids (B,) lists of K = 1-2; x_t (B, 4, h, w);
    t (B,); image (B, H, W, 3) or height, width (B,), for the output size.
    Output batch: the input plus label (B, H, W) uint8, the exclusive label map (module
    docstring); masks (B,) lists of K COCO RLEs, the head's own mask of each class: its
    probability > `threshold` (> high with an `ignore_band`), whatever the other class's, so
    two classes' masks may overlap where the label map picked one (with `mask_rule`
    "exclusive", Protocol I's option, each class's pixels of the label map instead); scores
    (B,) lists of K mean probabilities inside those masks; areas (B,) lists of K pixel counts;
    quality (B,) float32, the mean of a sample's scores (a class the head did not find counts
    0)."""

    def __init__(self, checkpoint: str, *, model: str | None = None, threshold: float = 0.5,
                 ignore_band: tuple[float, float] | None = None,
                 mask_rule: str = "independent", device: str | None = None) -> None:
        from actors.frozen_sd import FrozenSD
        from train.grounding.checkpoint import load_grounding_head

        self.low, self.high = check_band(threshold, ignore_band)
        check_mask_rule(mask_rule)
        self.mask_rule = mask_rule
        self.device = device or default_device()
        self.head, self.info = load_grounding_head(checkpoint, device=self.device)
        if model is not None and model != self.info.get("model"):
            raise ValueError(f"the head in {checkpoint!r} reads the features of "
                             f"{self.info.get('model')!r}, not {model!r}")
        self.sd = FrozenSD(self.info["model"], self.device)

    @torch.inference_mode()
    def probabilities(self, batch: dict[str, np.ndarray], size: tuple[int, int]
                      ) -> tuple[Tensor, Tensor]:
        """Mask probabilities B x K x H x W (padding classes 0) and valid B x K."""
        text, valid = self.sd.class_embeddings([list(c) for c in batch["classes"]])
        logits = self.head(self.sd.features(batch), text, valid, size=size)  # (B, K, H, W)
        return torch.sigmoid(logits.float()) * valid[..., None, None], valid

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_columns(batch, ("prompt", "classes", "class_ids", "x_t", "t"))
        if "image" in batch:
            size = tuple(batch["image"].shape[1:3])
        else:
            size = (int(batch["height"][0]), int(batch["width"][0]))
        probs, valid = self.probabilities(batch, size)
        k = valid.shape[1]
        ids = torch.tensor([[int(c) for c in row] + [0] * (k - len(row))
                            for row in batch["class_ids"]], device=self.device)  # (B, K)
        label = label_maps(probs, ids, valid, self.low, self.high)               # (B, H, W)
        masks = apply_mask_rule(probs, self.high, self.mask_rule, valid)        # (B, K, H, W)
        scores = mask_scores(probs, masks)                                       # (B, K)
        label, masks, scores = label.cpu().numpy(), masks.cpu().numpy(), scores.cpu().numpy()
        n = [len(c) for c in batch["classes"]]
        return {
            **with_lists(batch),
            "label": label,
            "masks": object_column([encode_masks(m[:j]) for m, j in zip(masks, n, strict=True)]),
            "scores": object_column([s[:j].tolist() for s, j in zip(scores, n, strict=True)]),
            "areas": object_column([m[:j].sum((1, 2)).tolist()
                                    for m, j in zip(masks, n, strict=True)]),
            "quality": np.array([s[:j].mean() for s, j in zip(scores, n, strict=True)],
                                dtype=np.float32),
        }
