"""MaskFormer training speed on one GPU (Protocol II's segmenter): samples/s of the training step
at the paper's settings (ResNet-101, 224x224 crops, batch 8, AdamW), targets made by the image
processor from label maps as the Ray Train job makes them.

    python benchmarks/train_maskformer.py                       # on the GPU machine
    python benchmarks/train_maskformer.py --variant tiny --device cpu --steps 3 --crop 64

Writes benchmarks/results/train_maskformer-CARD.json.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.generate import (  # noqa: E402
    device_name,
    results_path,
    sync,
    write_result,
)
from train.maskformer.model import build_maskformer, image_processor  # noqa: E402


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
    model = build_maskformer(a.variant, a.classes).to(a.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    processor = image_processor()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch_size, a.crop, a.crop, 3), dtype=np.uint8)
    labels = np.zeros((a.batch_size, a.crop, a.crop), dtype=np.uint8)
    for i in range(a.batch_size):  # two classes a crop, as a two-object prompt's label map
        c = rng.choice(np.arange(1, a.classes), 2, replace=False)
        labels[i, : a.crop // 2], labels[i, a.crop // 2:, : a.crop // 2] = c

    def step() -> float:
        enc = processor(images=list(images), segmentation_maps=list(labels),
                        return_tensors="pt", input_data_format="channels_last")
        out = model(pixel_values=enc["pixel_values"].to(a.device),
                    mask_labels=[m.to(a.device) for m in enc["mask_labels"]],
                    class_labels=[c.to(a.device) for c in enc["class_labels"]])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        return out.loss.item()

    for _ in range(3):
        step()
    sync(a.device)
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(a.device)
    seconds = time.perf_counter() - start
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "device": device_name(a.device), "torch": torch.__version__, "variant": a.variant,
        "batch_size": a.batch_size, "crop": a.crop,
        "samples_per_s": a.steps * a.batch_size / seconds,
        "ms_per_step": 1e3 * seconds / a.steps,
        "hours_for_40k_steps": 40_000 * seconds / a.steps / 3600,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if a.device.startswith("cuda") else None),
    }
    out = a.out or results_path("train_maskformer", a.device)
    write_result(result, out)
    print(f"{result['samples_per_s']:.1f} samples/s ({result['ms_per_step']:.0f} ms a step of "
          f"{a.batch_size} at {a.crop}x{a.crop}); 40k steps: "
          f"{result['hours_for_40k_steps']:.1f} h on one {result['device']} -> {out}")


if __name__ == "__main__":
    main()
