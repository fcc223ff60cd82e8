"""MaskFormer training speed on one GPU (Protocol II's segmenter): samples/s of the training step
at the paper's settings (ResNet-101, 224x224 crops, batch 8), with the job's own step:
MaskFormer's loss with deep supervision, AdamW with the backbone at 0.1x and the poly schedule,
full-model gradient clipping (`train.maskformer.optim`), targets made by the image processor from
label maps as the Ray Train job makes them. The backbone's weights are random (speed does not
depend on them); for `paper` its BatchNorm is frozen, as with the ImageNet weights of a real run.

    python benchmarks/train_maskformer.py                       # on the GPU machine
    python benchmarks/train_maskformer.py --variant tiny --device cpu --steps 3 --crop 64

Merges its figures into benchmarks/results/train_maskformer-CARD.json (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.record import provenance, results_path, sync, update_result  # noqa: E402
from train.maskformer.model import (  # noqa: E402
    MaskFormerTraining,
    build_maskformer,
    freeze_backbone_norm,
    image_processor,
    targets,
)
from train.maskformer.optim import Schedule, build_optimizer, clip_and_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--classes", type=int, default=21, help="training ids (PASCAL: 21)")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after 3 warm-up steps")
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/train_maskformer-CARD.json]")
    a = p.parse_args()
    model = build_maskformer(a.variant, a.classes)
    if a.variant == "paper":
        freeze_backbone_norm(model)
    trainer = MaskFormerTraining(model).to(a.device).train()
    schedule = Schedule()  # MaskFormer's, the paper's lr and weight decay, over 40k steps
    opt, lr_schedule = build_optimizer(trainer, schedule)
    processor = image_processor()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch_size, a.crop, a.crop, 3), dtype=np.uint8)
    labels = np.zeros((a.batch_size, a.crop, a.crop), dtype=np.uint8)
    for i in range(a.batch_size):  # two classes a crop, as a two-object prompt's label map
        c = rng.choice(np.arange(1, a.classes), 2, replace=False)
        labels[i, : a.crop // 2], labels[i, a.crop // 2:, : a.crop // 2] = c

    def step() -> float:
        loss = sum(trainer(**targets(processor, images, labels, a.device)).values())
        opt.zero_grad()
        loss.backward()
        clip_and_step(trainer, opt, lr_schedule, schedule)
        return loss.item()

    for _ in range(3):
        step()
    sync(a.device)
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(a.device)
    seconds = time.perf_counter() - start
    out = a.out or results_path("train_maskformer", a.device)
    result = update_result(
        out, **provenance(a.device), variant=a.variant, batch_size=a.batch_size, crop=a.crop,
        recipe="deep supervision, backbone lr x0.1, poly lr, clip 0.01"
               + (", frozen backbone BN" if a.variant == "paper" else ""),
        samples_per_s=a.steps * a.batch_size / seconds,
        ms_per_step=1e3 * seconds / a.steps,
        hours_for_40k_steps=40_000 * seconds / a.steps / 3600,
        peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30
                         if a.device.startswith("cuda") else None))
    print(f"{result['samples_per_s']:.1f} samples/s ({result['ms_per_step']:.0f} ms a step of "
          f"{a.batch_size} at {a.crop}x{a.crop}); 40k steps: "
          f"{result['hours_for_40k_steps']:.1f} h on one {result['device']} -> {out}")


if __name__ == "__main__":
    main()
