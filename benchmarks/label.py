"""Grounding-labeller speed on one GPU: images/s of `GroundingLabeller` (feature recomputation
from x_t, class embeddings, the paper-sized head, label maps and RLE masks) at the SD-1.5 size,
against `SDGenerator` on the same GPU in the same run, and so how many generator GPUs one
labeller GPU keeps up with (DESIGN.md's target: at least 4).

    python benchmarks/label.py                         # SD-1.5-sized random weights, H100
    python benchmarks/label.py --model tiny --device cpu --batch-sizes 2 --batches 2 \\
        --gen-steps 2 --gen-batch-size 2

Prints a table and merges each figure, as soon as it is measured, into
benchmarks/results/label-CARD.json (benchmarks/record.py); factory/speeds.py reads the
labeller's images/s at `factory label`'s batch size (8) from there.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.batch import object_column  # noqa: E402
from actors.frozen_sd import FrozenSD  # noqa: E402
from actors.grounding_labeller import GroundingLabeller  # noqa: E402
from actors.names import SD15_RANDOM  # noqa: E402
from actors.sd_generator import SDGenerator  # noqa: E402
from benchmarks.record import provenance, results_path, sync, update_result  # noqa: E402
from factory.prompts import SamplePlan  # noqa: E402
from factory.vocab import get_split  # noqa: E402
from train.grounding.checkpoint import save_checkpoint  # noqa: E402
from train.grounding.model import build_grounding_head  # noqa: E402
from train.grounding.trainer import head_for  # noqa: E402


def specs(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    """`factory label`'s first PASCAL samples: prompts, seeds, classes and their ids."""
    plan = SamplePlan(get_split("pascal", "1"), "label", seed=0)
    vocab = plan.split.vocab
    s = [plan.sample(offset + i) for i in range(n)]
    return {"prompt": np.array([x.prompt for x in s], dtype=object),
            "noise_seed": np.array([x.noise_seed for x in s], dtype=np.int64),
            "classes": object_column([list(x.classes) for x in s]),
            "class_ids": object_column([[vocab.id_of(c) for c in x.classes] for x in s])}


def random_checkpoint(model: str, folder: str) -> str:
    """A paper-sized head with random weights for `model`, saved as training would."""
    sd = FrozenSD(model, "cpu")
    head = build_grounding_head(head_for(model), **sd.head_overrides())
    save_checkpoint(folder, head, torch.optim.Adam(head.parameters()), 0,
                    {"kind": "grounding-head", "split": "pascal", "fold": "1", "model": model,
                     "seen": list(get_split("pascal", "1").seen)})
    return folder


def time_labeller(labeller: GroundingLabeller, batch_size: int, batches: int, latent: int,
                  device: str) -> float:
    """Images/s over `batches` timed calls, after one warm-up call."""
    rng = np.random.default_rng(0)
    calls = []
    for i in range(batches + 1):
        b = specs(batch_size, offset=i * batch_size)
        b.update(x_t=rng.standard_normal((batch_size, 4, latent, latent)).astype(np.float16),
                 t=np.ones(batch_size, dtype=np.int32),
                 height=np.full(batch_size, 8 * latent), width=np.full(batch_size, 8 * latent))
        calls.append(b)
    labeller(calls[0])
    sync(device)
    start = time.perf_counter()
    for b in calls[1:]:
        labeller(b)
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def time_generator(a) -> float:
    gen = SDGenerator(a.model, steps=a.gen_steps, device=a.device, precision=a.gen_precision,
                      compile=a.gen_compile)
    gen(specs(a.gen_batch_size))  # warm-up (and compilation)
    sync(a.device)
    start = time.perf_counter()
    for i in range(a.gen_batches):
        gen(specs(a.gen_batch_size, offset=(i + 1) * a.gen_batch_size))
    sync(a.device)
    return a.gen_batches * a.gen_batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SD15_RANDOM)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", default="8,16,32", help="labeller batch sizes to time")
    p.add_argument("--batches", type=int, default=8, help="timed labeller calls per batch size")
    p.add_argument("--gen-steps", type=int, default=50)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--gen-batches", type=int, default=2, help="0: no generator")
    p.add_argument("--gen-precision", default="bfloat16")
    p.add_argument("--gen-compile", action="store_true")
    p.add_argument("--out", default=None,
                   help="[default: benchmarks/results/label-CARD.json, e.g. label-h100]")
    a = p.parse_args()
    a.out = a.out or results_path("label", a.device)
    update_result(a.out, **provenance(a.device), model=a.model, labeller_images_per_s={},
                  generator=None, generator_gpus_per_labeller_gpu=None,
                  labeller_gpus_per_generator_gpu=None)
    label_ips: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        labeller = GroundingLabeller(random_checkpoint(a.model, folder), device=a.device)
        latent = labeller.sd.pipe.unet.config.sample_size
        # the maps the head reads: 25 for SD 1.x (h200-b9f3fe7/label.json's figures had 9)
        update_result(a.out, image_size=8 * latent, feature_maps=len(labeller.sd.extractor.maps))
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for b in a.batch_sizes.split(","):
            label_ips[str(int(b))] = time_labeller(labeller, int(b), a.batches, latent, a.device)
            peak = (torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda")
                    else None)
            update_result(a.out, labeller_images_per_s=label_ips, labeller_peak_memory_gib=peak)
            print(f"labeller batch {int(b):>3}: {label_ips[str(int(b))]:8.2f} images/s")
        del labeller
    if not a.gen_batches:
        return
    gen_ips = time_generator(a)
    best = max(label_ips.values())
    update_result(a.out, generator={"images_per_s": gen_ips, "steps": a.gen_steps,
                                    "batch_size": a.gen_batch_size,
                                    "precision": a.gen_precision, "compile": a.gen_compile},
                  generator_gpus_per_labeller_gpu=best / gen_ips,
                  labeller_gpus_per_generator_gpu=gen_ips / best)
    print(f"generator batch {a.gen_batch_size} ({a.gen_precision}, {a.gen_steps} steps): "
          f"{gen_ips:.2f} images/s")
    print(f"one labeller GPU keeps up with {best / gen_ips:.1f} generator GPUs -> {a.out}")


if __name__ == "__main__":
    main()
