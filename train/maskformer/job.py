"""`python -m train.maskformer` (also `factory train maskformer`): train a MaskFormer on
`factory label` outputs (and VOC-layout folders) with Ray Train, one DDP worker per GPU (or CPU
workers), for Protocol II (paper sec. 5.2).

The paper's recipe is the default: MaskFormer R-101, 224x224 crops, 40k iterations, batch 8,
AdamW lr 1e-4, weight decay 1e-4. Crops and flips run in Ray Data's CPU tasks; the workers turn
label maps into MaskFormer targets with transformers' image processor and train with its
Hungarian-matched loss.

Checkpoints (under --out, every --report-every steps) are folders holding the model as
transformers saves it (`config.json`, weights), `train.pt` (optimizer, step, stream position),
`maskformer.json` (what it was trained for) and `probe.pt` (its logits on a fixed input, so a
reload can be checked). `--resume` continues from the latest at its step and stream position.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import click
import numpy as np

from factory.errors import FactoryError
from train import jobs

log = logging.getLogger(__name__)

RUN_NAME = "maskformer"
LOG_FILE = "train.log"
INFO, TRAIN_STATE, PROBE = "maskformer.json", "train.pt", "probe.pt"


def probe_input():
    """A fixed input whose logits each checkpoint stores."""
    import torch

    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def save_checkpoint(folder: str, model, opt, step: int, position: int, info: dict) -> None:
    import torch

    model.save_pretrained(folder)
    torch.save({"opt": opt.state_dict(), "step": step, "position": position},
               os.path.join(folder, TRAIN_STATE))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=probe_input().to(next(model.parameters()).device))
    model.train(was_training)
    torch.save({"class": out.class_queries_logits.cpu(), "mask": out.masks_queries_logits.cpu()},
               os.path.join(folder, PROBE))
    with open(os.path.join(folder, INFO), "w", encoding="utf-8") as f:
        json.dump({**info, "step": step, "position": position}, f, indent=2)


def read_info(folder: str) -> dict:
    return jobs.read_info(folder, INFO)


def latest_checkpoint(path: str) -> str | None:
    """`path` itself if it is a checkpoint folder, else its latest checkpoint below, or None."""
    return jobs.latest_checkpoint(path, INFO)


def load_maskformer(path: str, device: str = "cpu"):
    """(model in eval mode, info) from a checkpoint folder or a training --out (its latest)."""
    from transformers import MaskFormerForInstanceSegmentation

    folder = latest_checkpoint(path)
    if folder is None:
        raise ValueError(f"no MaskFormer checkpoint ({INFO}) in {path!r}")
    try:
        model = MaskFormerForInstanceSegmentation.from_pretrained(folder)
        info = read_info(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the MaskFormer checkpoint in {folder!r}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), {**info, "folder": os.path.abspath(folder)}


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import MaskFormerForInstanceSegmentation

    from train.maskformer.model import build_maskformer, image_processor, training_loss

    device = ray.train.torch.get_device()
    state, folder = None, None
    ckpt = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    if ckpt is not None:
        folder = ckpt.to_directory()
    elif cfg["resume_from"]:  # --resume: the latest checkpoint of an earlier job
        folder = cfg["resume_from"]
    if folder is not None:
        model = MaskFormerForInstanceSegmentation.from_pretrained(folder)
        state = torch.load(os.path.join(folder, TRAIN_STATE), map_location="cpu")
    else:
        model = build_maskformer(cfg["variant"], cfg["num_labels"], cfg["backbone_weights"],
                                 seed=cfg["seed"])
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = cfg["start_step"]
    if state is not None:
        opt.load_state_dict(state["opt"])
        step = state["step"]
    world = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    per_step = cfg["batch_size"] * world
    ddp = ray.train.torch.prepare_model(model)
    processor = image_processor()
    losses: list[float] = []
    # what this job really trained on, for its reports: where it started, and the first
    # stream item this worker saw
    started_at, first_item = step, None
    for batch in jobs.worker_batches(cfg, step):
        loss = training_loss(ddp, processor, batch["image"], batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        low = int(batch["position"].min())
        first_item = low if first_item is None else min(first_item, low)
        step += 1
        if step % cfg["report_every"] == 0 or step == cfg["steps"]:
            position = cfg["start_position"] + (step - cfg["start_step"]) * per_step
            metrics = {"step": step, "loss": float(np.mean(losses)), "position": position,
                       "job_started_at_step": started_at, "job_first_item": first_item}
            losses = []
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(d, model, opt, step, position,
                                    {**cfg["info"], "loss": metrics["loss"]})
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                    log.info("step %d: loss %.4f", step, metrics["loss"])
                ray.train.report(metrics, checkpoint=checkpoint)  # all ranks report
        if step >= cfg["steps"]:
            break


def train(data: list[str], out: str, *, variant: str = "paper", steps: int = 40_000,
          batch_size: int = 8, crop: int = 224, lr: float = 1e-4, weight_decay: float = 1e-4,
          backbone_weights: str | None = None, num_workers: int = 1, use_gpu: bool = False,
          cpus_per_worker: float = 1.0, report_every: int = 500, resume: bool = False,
          allow_partial: bool = False, seed: int = 0, address: str | None = None):
    """Check the arguments, then run the Ray Train job; returns Ray Train's result."""
    from train.maskformer.data import load_batch, open_sources, stream
    from train.maskformer.model import SEGMENTATION_PRETRAINED, SPECS
    from train.stream import worker_items

    for name, value in (("steps", steps), ("batch size", batch_size), ("crop", crop),
                        ("workers", num_workers), ("report every", report_every)):
        if value <= 0:
            raise FactoryError(f"{name} must be > 0, got {value}")
    if variant not in SPECS:
        raise FactoryError(f"unknown variant {variant!r}: one of {', '.join(SPECS)}")
    if not data:
        raise FactoryError("give at least one --data folder")
    if backbone_weights and SEGMENTATION_PRETRAINED.search(backbone_weights):
        raise FactoryError(f"--backbone-weights {backbone_weights!r} names a MaskFormer/"
                           "Mask2Former checkpoint: trained on COCO or ADE segmentation, it has "
                           "seen the unseen classes; use ImageNet backbone weights")
    if backbone_weights and not os.path.exists(backbone_weights):
        raise FactoryError(f"no backbone weights at {backbone_weights!r}")
    try:
        sources, classes, fold = open_sources(data, allow_partial)
    except (ValueError, OSError) as e:
        raise FactoryError(str(e)) from None
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FactoryError(f"--out {out!r} is a file: give a folder for the run")
    previous = latest_checkpoint(out) if os.path.isdir(out) else None
    if resume and previous is None:
        raise FactoryError(f"nothing to resume: {out!r} holds no MaskFormer checkpoint")
    if not resume and os.path.isdir(out) and os.listdir(out):
        raise FactoryError(f"{out!r} is not empty: pass --resume to continue its training, or "
                           "choose a new --out")
    info = {"kind": "maskformer", "split": classes.name, "fold": fold, "variant": variant,
            "classes": list(classes.names), "background": classes.background, "crop": crop,
            "seed": seed, "data": [os.path.abspath(p) for p in data]}
    start_step, start_position = 0, 0
    if previous is not None:
        old = read_info(previous)
        if any(old.get(k) != info[k] for k in ("split", "fold", "variant", "seed")):
            raise FactoryError(f"{out!r} trains a {old.get('variant')} MaskFormer for "
                               f"{old.get('split')} fold {old.get('fold')}, not this run")
        if old["step"] >= steps:
            raise FactoryError(f"{out!r} is trained to step {old['step']} already: raise --steps")
        start_step, start_position = old["step"], old["position"]

    import ray

    from factory.console import ray_logs_to
    from factory.pools import connect_ray
    from train.grounding.job import check_placement

    fresh = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        with ray_logs_to(os.path.join(out, LOG_FILE)):
            connect_ray(address)
            check_placement(num_workers, use_gpu, cpus_per_worker)
            items = stream(sources, seed, start_position, (steps - start_step) * batch_size
                           * num_workers)
            per_worker = [ray.data.from_items(mine).map_batches(
                load_batch, fn_kwargs={"sources": sources, "seed": seed, "size": crop},
                batch_size=64, num_cpus=0.25)
                for mine in worker_items(items, batch_size, num_workers)]
            cfg = {"variant": variant, "num_labels": len(classes.names),
                   "backbone_weights": backbone_weights, "steps": steps,
                   "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                   "report_every": report_every, "seed": seed, "resume_from": previous,
                   "start_step": start_step, "start_position": start_position, "info": info}
            return jobs.fit(train_loop_per_worker, cfg, per_worker, out=out, name=RUN_NAME,
                            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)
    except FactoryError:
        if fresh:  # refused before training: leave nothing behind
            shutil.rmtree(out)
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", multiple=True, required=True,
              help="`factory label` output or VOC-layout folder; repeat to mix.")
@click.option("--out", required=True, help="Folder for Ray Train's run and checkpoints.")
@click.option("--variant", default="paper", help="paper (ResNet-101) | tiny.")
@click.option("--steps", type=int, default=40_000)
@click.option("--batch-size", type=int, default=8, help="Per worker.")
@click.option("--crop", type=int, default=224, help="Training crop size (pixels).")
@click.option("--lr", type=float, default=1e-4)
@click.option("--weight-decay", type=float, default=1e-4)
@click.option("--backbone-weights", default=None,
              help="ImageNet weights: torchvision resnet101 state dict, or a transformers ResNet "
                   "folder [default: random].")
@click.option("--num-workers", type=int, default=1, help="DDP workers (one per GPU).")
@click.option("--use-gpu", is_flag=True, help="One GPU per worker.")
@click.option("--cpus-per-worker", type=float, default=1.0)
@click.option("--report-every", type=int, default=500, help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from --out's latest checkpoint.")
@click.option("--allow-partial", is_flag=True,
              help="Train on the finished shards of unfinished `factory label` runs.")
@click.option("--seed", type=int, default=0)
@click.option("--address", default=None, help="Ray cluster [default: start a local Ray].")
def cli(data: tuple[str, ...], **kwargs) -> None:
    """Train a MaskFormer on synthetic (and real) segmentation sets with Ray Train."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    result = train(list(data), **kwargs)
    m = result.metrics or {}
    click.echo(f"trained to step {m.get('step')} in {time.perf_counter() - start:.0f} s: loss "
               f"{m.get('loss', float('nan')):.4f}; checkpoint "
               f"{result.checkpoint.path if result.checkpoint else None}")


def main(argv: list[str] | None = None) -> None:
    from factory.command import run_command

    run_command(cli, argv, prog_name="python -m train.maskformer")
