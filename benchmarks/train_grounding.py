"""Grounding-head training speed on one GPU: samples/s of the training step with the UNet
recomputing features from x_t (what every Ray Train worker does), and the share of the step
spent on that recomputation.

    python benchmarks/train_grounding.py                   # SD-1.5-sized random weights, H100
    python benchmarks/train_grounding.py --model tiny --device cpu --steps 3

Prints a line and merges its figures into benchmarks/results/train_grounding-CARD.json
(benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.frozen_sd import FrozenSD  # noqa: E402
from actors.names import SD15_RANDOM  # noqa: E402
from benchmarks.record import provenance, results_path, sync, update_result  # noqa: E402
from factory.prompts import SamplePlan  # noqa: E402
from factory.vocab import get_split  # noqa: E402
from train.grounding.data import MAX_CLASSES  # noqa: E402
from train.grounding.model import build_grounding_head  # noqa: E402
from train.grounding.trainer import head_for, train_step  # noqa: E402


def synthetic_batch(sd: FrozenSD, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A training batch of the right shapes: pascal prompts, random latents and block masks."""
    rng = np.random.default_rng(seed)
    plan = SamplePlan(get_split("pascal", "1"), "train", seed=seed)
    specs = [plan.sample(i) for i in range(batch_size)]
    latent = sd.pipe.unet.config.sample_size
    size = latent * 8
    cells = rng.random((batch_size, MAX_CLASSES, latent, latent)) > 0.7
    return {
        "x_t": rng.standard_normal((batch_size, 4, latent, latent)).astype(np.float32),
        "t": np.full(batch_size, 1),
        "prompt": np.array([s.prompt for s in specs], dtype=object),
        "classes": [list(s.classes) + [""] * (MAX_CLASSES - len(s.classes)) for s in specs],
        "masks": np.kron(cells, np.ones((8, 8), dtype=np.uint8)).reshape(
            batch_size, MAX_CLASSES, size, size),
        "valid": np.array([[k < len(s.classes) for k in range(MAX_CLASSES)] for s in specs]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after 3 warm-up steps")
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/train_grounding-CARD.json]")
    a = p.parse_args()
    a.out = a.out or results_path("train_grounding", a.device)
    sd = FrozenSD(a.model, a.device)
    head = build_grounding_head(head_for(a.model), **sd.head_overrides()).to(sd.device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-4, weight_decay=1e-4)
    batches = [synthetic_batch(sd, a.batch_size, seed) for seed in range(4)]
    for b in batches[:3]:  # warm-up
        train_step(head, opt, sd.inputs(b))
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    feature_s = step_s = 0.0
    for i in range(a.steps):
        b = batches[i % len(batches)]
        sync(a.device)
        start = time.perf_counter()
        inputs = sd.inputs(b)  # features and class embeddings: the frozen SD's share
        sync(a.device)
        mid = time.perf_counter()
        train_step(head, opt, inputs)
        sync(a.device)
        feature_s += mid - start
        step_s += time.perf_counter() - start
    result = update_result(
        a.out, **provenance(a.device), model=a.model, batch_size=a.batch_size,
        feature_maps=len(sd.extractor.maps),  # 25 for SD 1.x (h200-b9f3fe7's figures had 9)
        samples_per_s=a.steps * a.batch_size / step_s,
        feature_share_of_step=feature_s / step_s,
        step_ms=1e3 * step_s / a.steps,
        peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30
                         if a.device.startswith("cuda") else None))
    print(f"batch {a.batch_size}: {result['samples_per_s']:.1f} samples/s, "
          f"{result['step_ms']:.0f} ms/step, features {100 * result['feature_share_of_step']:.0f}% "
          f"of the step -> {a.out}")


if __name__ == "__main__":
    main()
