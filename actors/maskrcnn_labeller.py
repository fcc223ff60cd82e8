"""`MaskRCNNLabeller`: oracle masks for the classes named in each prompt (paper sec. 4.1).

Backends: torchvision's `maskrcnn_resnet50_fpn_v2` (COCO mask AP 41.8; weights from a local file
or torchvision's cache), its random-weight `tiny` variant for tests, and detectron2's
`mask_rcnn_R_50_FPN_3x` when detectron2 is installed. All report COCO category ids, which the
vocabulary maps to prompt names. `test-bright-pixels` is a test fixture, not a detector
(BrightPixelsTestDetector). (The paper's public code used mmdet's Mask R-CNN with a Swin-S
backbone, which none of these is.)

Oracles: `union` joins every instance of a class scoring >= 0.5 (the semantic mask, the
default); `top1` takes only the class's top-scoring instance, at mmdet's default test score
threshold 0.05, as the paper's public code does. An explicit `score_threshold` replaces either
default.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.batch import as_lists, check_columns, default_device, object_column, with_lists
from actors.names import (
    DETECTRON2_CONFIG,
    ORACLES,
    TEST_DETECTOR,
    check_detector,
    oracle_score_threshold,
    torchvision_weights_path,
)
from factory.schema import encode_masks
from factory.vocab import COCO_CATEGORIES, VOCABULARIES


def build_torchvision_maskrcnn(name: str = "torchvision", weights: str | None = None,
                               seed: int = 0) -> torch.nn.Module:
    """Mask R-CNN v2 with COCO's 91 label slots. `tiny`: the same network with random weights
    (seeded), sized for 64x64 images and few proposals so that tests run fast on a CPU."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    if name == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return maskrcnn_resnet50_fpn_v2(
                weights=None, weights_backbone=None, num_classes=91, min_size=64, max_size=64,
                rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(torch.load(torchvision_weights_path(weights), map_location="cpu",
                                     weights_only=True))
    return model


class Detectron2MaskRCNN(torch.nn.Module):
    """detectron2's predictor behind torchvision's detection interface: a list of (3, H, W)
    float images in [0, 1] in, a list of {labels (COCO ids), scores, masks (N, 1, H, W)} out."""

    def __init__(self, weights: str) -> None:
        super().__init__()
        from detectron2 import model_zoo
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model

        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(DETECTRON2_CONFIG))
        cfg.MODEL.DEVICE = "cpu"  # moved with .to() like any module
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05  # as torchvision's default
        self.model = build_model(cfg)
        DetectionCheckpointer(self.model).load(weights)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.register_buffer("coco_ids", torch.tensor(sorted(COCO_CATEGORIES)))  # 0..79 -> id

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        inputs = []
        for im in images:  # detectron2 wants BGR 0-255, resized as in its DefaultPredictor
            bgr = (im.flip(0) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            resized = self.resize.get_transform(bgr).apply_image(bgr)
            inputs.append({"image": torch.as_tensor(resized.transpose(2, 0, 1).astype("float32")),
                           "height": im.shape[1], "width": im.shape[2]})
        outs = []
        for out in self.model(inputs):
            inst = out["instances"]
            outs.append({"labels": self.coco_ids[inst.pred_classes], "scores": inst.scores,
                         "masks": inst.pred_masks[:, None].float()})  # (N, 1, H, W)
        return outs


class BrightPixelsTestDetector(torch.nn.Module):
    """A test fixture, not a detector: the random-weight `tiny` Mask R-CNN finds nothing, so
    tests of mask determinism (resume, batch size) would compare empty masks. This fixture's
    detections are a fixed function of the image instead: one instance of every COCO category,
    whose mask is the pixels where colour channel (category id mod 3) is at least 128 and whose
    score is 0.5 plus half that mask's share of the image. Same interface as torchvision's
    Mask R-CNN (a list of (3, H, W) images in [0, 1] in)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("coco_ids", torch.tensor(sorted(COCO_CATEGORIES)))        # (80,)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outs = []
        for im in images:                                                   # (3, H, W)
            masks = (im >= 128 / 255)[self.coco_ids % 3, None].float()      # (80, 1, H, W)
            outs.append({"labels": self.coco_ids, "masks": masks,
                         "scores": 0.5 + 0.5 * masks.mean((1, 2, 3))})       # (80,)
        return outs


def class_masks(det: dict[str, torch.Tensor], class_ids: list[int], hw: tuple[int, int], *,
                score_threshold: float, mask_threshold: float = 0.5,
                oracle: str = "union") -> tuple[np.ndarray, np.ndarray]:
    """One binary mask per requested COCO class id from one image's detections.

    det: labels (N,), scores (N,), masks (N, 1, H, W) probabilities, as torchvision returns.
    union: all instances of the class scoring >= score_threshold (the semantic mask);
    top1: only its top-scoring such instance (what the paper's public code does, at 0.05).
    Returns masks (K, H, W) bool, empty where nothing passed, and scores (K,) float32, the
    best score among the class's detections (0 if none)."""
    if oracle not in ORACLES:
        raise ValueError(f"unknown oracle {oracle!r}: one of {', '.join(ORACLES)}")
    masks = np.zeros((len(class_ids), *hw), dtype=bool)
    scores = np.zeros(len(class_ids), dtype=np.float32)
    for k, cid in enumerate(class_ids):
        of_class = (det["labels"] == cid).nonzero().flatten()
        if len(of_class) == 0:
            continue
        cls_scores = det["scores"][of_class]
        scores[k] = float(cls_scores.max())
        keep = of_class[cls_scores >= score_threshold]
        if oracle == "top1":
            keep = keep[det["scores"][keep].argsort(descending=True)[:1]]
        if len(keep):
            masks[k] = (det["masks"][keep, 0] >= mask_threshold).any(0).cpu().numpy()
    return masks, scores


class MaskRCNNLabeller:
    """Detector oracle masks for each sample's prompt classes, as COCO RLE.

    Input batch:  image (B, H, W, 3) uint8; classes (B,) lists of prompt names of `vocab`.
    Output batch: the input plus masks (B,) lists of RLE dicts {size, counts}, aligned with
    classes; scores (B,) lists of float; areas (B,) lists of int (pixels per mask).
    score_threshold: None takes the oracle's own (ORACLE_SCORE_THRESHOLDS)."""

    def __init__(self, vocab: str = "pascal", *, detector: str = "torchvision",
                 weights: str | None = None, score_threshold: float | None = None,
                 mask_threshold: float = 0.5, oracle: str = "union",
                 device: str | None = None) -> None:
        check_detector(detector, weights)
        score_threshold = oracle_score_threshold(oracle, score_threshold)
        self.vocab = VOCABULARIES[vocab]
        self.device = device or default_device()
        if detector == "detectron2":
            model = Detectron2MaskRCNN(weights)
        elif detector == TEST_DETECTOR:
            model = BrightPixelsTestDetector()
        else:
            model = build_torchvision_maskrcnn(detector, weights)
        self.model = model.eval().to(self.device)
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.oracle = oracle

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_columns(batch, ("image", "classes"))
        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        images = images.permute(0, 3, 1, 2).float() / 255                  # (B, 3, H, W)
        dets = self.model(list(images))
        hw = tuple(images.shape[2:])
        all_masks, all_scores, all_areas = [], [], []
        for det, names in zip(dets, as_lists(batch["classes"]), strict=True):
            unknown = [n for n in names if n not in self.vocab]
            if unknown:
                raise ValueError(f"classes {unknown} are not in vocabulary {self.vocab.name!r}")
            masks, scores = class_masks(
                det, [self.vocab.detector_ids[n] for n in names], hw,
                score_threshold=self.score_threshold, mask_threshold=self.mask_threshold,
                oracle=self.oracle)
            all_masks.append(encode_masks(masks))
            all_scores.append(scores.tolist())
            all_areas.append(masks.sum((1, 2)).tolist())
        return {**with_lists(batch), "masks": object_column(all_masks),
                "scores": object_column(all_scores), "areas": object_column(all_areas)}
