"""Grounding-head checkpoints: a folder with the head's weights and what it was trained for.

    head.pt      the head's state dict (what `load_grounding_head` loads)
    head.json    {"config": GroundingHeadConfig fields, "split", "fold", "model", "step", ...}
    train.pt     head and optimizer state and the step, for resuming (training checkpoints
                 only: `convert_official` writes a head of the official code without it)

A training `--out` folder holds Ray Train's checkpoint folders; the latest is the one whose
head.json has the highest step.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict

import torch

from train import jobs
from train.grounding.model import GroundingHead, GroundingHeadConfig

HEAD_WEIGHTS, HEAD_INFO, TRAIN_STATE = "head.pt", "head.json", "train.pt"
TRAINED_FOR = ("split", "fold", "model")  # what a head is usable with: its features and classes


class CheckpointError(ValueError):
    """A path that holds no grounding-head checkpoint."""


def save_head(folder: str, head: GroundingHead, step: int, info: dict) -> None:
    """What a later stage loads: the weights and the info, without the training state."""
    torch.save(head.state_dict(), os.path.join(folder, HEAD_WEIGHTS))
    with open(os.path.join(folder, HEAD_INFO), "w", encoding="utf-8") as f:
        json.dump({**info, "config": asdict(head.cfg), "step": step}, f, indent=2)


def save_checkpoint(folder: str, head: GroundingHead, opt: torch.optim.Optimizer, step: int,
                    info: dict) -> None:
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step},
               os.path.join(folder, TRAIN_STATE))
    save_head(folder, head, step, info)


def read_info(folder: str) -> dict:
    return jobs.read_info(folder, HEAD_INFO)


def latest_checkpoint(path: str) -> str | None:
    """`path` itself if it is a checkpoint folder, else its latest checkpoint below, or None."""
    return jobs.latest_checkpoint(path, HEAD_INFO)


def load_grounding_head(path: str, device: str | torch.device = "cpu"
                        ) -> tuple[GroundingHead, dict]:
    """The head of a checkpoint folder, or of a training `--out` folder's latest checkpoint, in
    eval mode (normalisation is per image in both modes; eval only stops the spectral norm's
    power iteration), with its info (config, split, fold, model, step, and `folder`, the
    checkpoint folder's absolute path)."""
    folder = latest_checkpoint(path)
    if folder is None:
        raise CheckpointError(f"no grounding-head checkpoint ({HEAD_INFO}) in {path!r}")
    try:
        info = read_info(folder)
        cfg = GroundingHeadConfig(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in info["config"].items()})
        head = GroundingHead(cfg)
        state = torch.load(os.path.join(folder, HEAD_WEIGHTS), map_location="cpu",
                           weights_only=True)
        if any(k.endswith(".bn.running_mean") for k in state):
            raise CheckpointError(f"the head in {folder!r} was trained with batch statistics; "
                                  "this head normalises each image on its own, as the official "
                                  "code: retrain it")
        head.load_state_dict(state)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError,
            pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the checkpoint in {folder!r}: {first}") from None
    missing = [k for k in TRAINED_FOR if k not in info]
    if missing:
        raise CheckpointError(f"the checkpoint {folder!r} does not say its {', '.join(missing)}")
    return head.to(device).eval(), {**info, "folder": os.path.abspath(folder)}
