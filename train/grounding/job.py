"""`python -m train.grounding`: train the grounding head on `factory generate` triplets with Ray
Train, one DDP worker per GPU (or CPU workers), locally or as `ray job submit ... -- uv run
python -m train.grounding ...`.

The paper's recipe (sec. 5.1): Adam, lr 1e-4, weight decay 1e-4, batch 8, 5k iterations, on
seen classes only, skipping classes whose oracle mask is empty (the official train.py instead:
lr 1e-5, no weight decay, batch 1, a new image every step; README, differences). The loss is the
official one, each sample's classes summed, divided by the batch size. Features are recomputed
from the stored x_t on each worker's device by a frozen UNet (bf16 on GPUs; the head in fp32).

The data is a stream shuffled per epoch with the run's seed (`train.stream`). A checkpoint
records the step and the stream position (samples consumed); `--resume` and Ray Train's own
restarts after a worker failure continue at both.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time

import click
import numpy as np

from factory.errors import FactoryError
from train import jobs

log = logging.getLogger(__name__)

RUN_NAME = "grounding"  # Ray Train's run folder under --out
LOG_FILE = "train.log"  # Ray's and Ray Train's own output, under --out


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from actors.frozen_sd import FrozenSD
    from train.grounding.checkpoint import TRAIN_STATE, save_checkpoint
    from train.grounding.model import build_grounding_head
    from train.grounding.trainer import train_step

    sd = FrozenSD(cfg["model"], ray.train.torch.get_device())
    torch.manual_seed(cfg["seed"])  # every rank starts from the same head
    head = build_grounding_head(cfg["head"], **sd.head_overrides()).to(sd.device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, state = cfg["start_step"], None
    ckpt = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location=sd.device)
    elif cfg["resume_from"]:  # --resume: the latest checkpoint of an earlier job
        state = torch.load(os.path.join(cfg["resume_from"], TRAIN_STATE), map_location=sd.device)
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    model = ray.train.torch.prepare_model(head)
    rank = ray.train.get_context().get_world_rank()
    per_step = cfg["batch_size"] * ray.train.get_context().get_world_size()
    window: list[dict] = []
    # what this job really trained on, for its reports: where it started, and the first
    # stream item this worker saw
    started_at, first_item = step, None
    for batch in jobs.worker_batches(cfg, step):
        window.append(train_step(model, opt, sd.inputs(batch), skip_empty=cfg["skip_empty"]))
        low = int(batch["position"].min())
        first_item = low if first_item is None else min(first_item, low)
        step += 1
        if step % cfg["report_every"] == 0 or step == cfg["steps"]:
            position = cfg["start_position"] + (step - cfg["start_step"]) * per_step
            metrics = {"step": step, "loss": float(np.mean([m["loss"] for m in window])),
                       "iou": float(np.nanmean([m["iou"] for m in window])),
                       "position": position, "epoch": position // cfg["per_epoch"],
                       "job_started_at_step": started_at, "job_first_item": first_item}
            window = []
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(d, head, opt, step, {**cfg["info"], "metrics": metrics,
                                                         "position": position})
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                    log.info("step %d: loss %.4f, train IoU %s", step, metrics["loss"],
                             iou_text(metrics["iou"]))
                ray.train.report(metrics, checkpoint=checkpoint)  # all ranks report
        if step >= cfg["steps"]:
            break


def train(data: str, out: str, *, model: str | None = None, head: str | None = None,
          steps: int = 5000, batch_size: int = 8, lr: float = 1e-4, weight_decay: float = 1e-4,
          num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1.0,
          report_every: int = 100, skip_empty: bool = True, resume: bool = False,
          allow_partial: bool = False, seed: int = 0, address: str | None = None):
    """Check the arguments, then run the Ray Train job; returns Ray Train's result."""
    from actors.names import check_model_name
    from train.grounding.checkpoint import HEAD_INFO, latest_checkpoint, read_info
    from train.grounding.data import check_training_data, load_batch, shard_groups
    from train.grounding.model import HEAD_CONFIGS
    from train.grounding.trainer import head_for
    from train.stream import stream, worker_items

    for name, value in (("steps", steps), ("batch size", batch_size),
                        ("workers", num_workers), ("report every", report_every), ("lr", lr),
                        ("CPUs per worker", cpus_per_worker)):
        if value <= 0:
            raise FactoryError(f"{name} must be > 0, got {value}")
    if weight_decay < 0:
        raise FactoryError(f"weight decay must be >= 0, got {weight_decay}")
    try:
        store = check_training_data(data, allow_partial)
    except ValueError as e:
        raise FactoryError(str(e)) from None
    shards, rows = shard_groups(store)
    run = store.manifest["run"]
    model = model or run["model"]
    try:
        check_model_name(model)
    except ValueError as e:  # ModelNotFoundError, ModelStructureError
        raise FactoryError(str(e)) from None
    head = head or head_for(model)
    if head not in HEAD_CONFIGS:
        raise FactoryError(f"unknown head {head!r}: one of {', '.join(HEAD_CONFIGS)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FactoryError(f"--out {out!r} is a file: give a folder for the run")
    previous = latest_checkpoint(out) if os.path.isdir(out) else None
    if resume and previous is None:
        raise FactoryError(f"nothing to resume: {out!r} holds no grounding-head checkpoint")
    if not resume and os.path.isdir(out) and os.listdir(out):
        raise FactoryError(f"{out!r} is not empty: pass --resume to continue its training, or "
                           "choose a new --out")
    info = {"kind": "grounding-head", "split": run["split"], "fold": run["fold"],
            "model": model, "data": os.path.abspath(data), "seen": store.manifest["seen"],
            "seed": seed, "shards": len(shards), "samples": sum(map(len, rows))}
    start_step, start_position = 0, 0
    if previous is not None:
        old = read_info(previous)
        if any(old.get(k) != info[k] for k in ("split", "fold", "model")):
            raise FactoryError(f"{out!r} trains a head for {old.get('split')} fold "
                               f"{old.get('fold')} on {old.get('model')}, not this data")
        # the stream position means the same items only over the same shards and seed
        changed = [f"{k} {old.get(k)} then, {info[k]} now" for k in ("seed", "shards")
                   if old.get(k) != info[k]]
        if changed or "position" not in old:
            raise FactoryError(f"cannot resume {out!r} where it stopped in the data ("
                               f"{'; '.join(changed) or 'its checkpoint records no position'})"
                               ": train into a new --out")
        if old["step"] >= steps:
            raise FactoryError(f"{out!r} is trained to step {old['step']} already: raise --steps")
        start_step, start_position = old["step"], old["position"]

    import ray

    from factory.console import ray_logs_to
    from factory.pools import connect_ray

    fresh = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        with ray_logs_to(os.path.join(out, LOG_FILE)):
            connect_ray(address)
            jobs.check_placement(num_workers, use_gpu, cpus_per_worker)
            items = stream(rows, seed, start_position, (steps - start_step) * batch_size
                           * num_workers)
            per_worker = [ray.data.from_items(mine).map_batches(
                load_batch, fn_kwargs={"shards": shards, "seen": store.manifest["seen"]},
                batch_size=64, num_cpus=0.25)
                for mine in worker_items(items, batch_size, num_workers)]
            cfg = {"model": model, "head": head, "steps": steps, "batch_size": batch_size,
                   "lr": lr, "weight_decay": weight_decay, "report_every": report_every,
                   "skip_empty": skip_empty, "seed": seed, "resume_from": previous,
                   "start_step": start_step, "start_position": start_position,
                   "per_epoch": info["samples"], "info": info}
            return jobs.fit(train_loop_per_worker, cfg, per_worker, out=out, name=RUN_NAME,
                            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                            info_file=HEAD_INFO)
    except FactoryError:
        if fresh:  # refused before training: leave nothing behind
            shutil.rmtree(out)
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", required=True, help="`factory generate --subset train` output folder.")
@click.option("--out", required=True, help="Folder for Ray Train's run and checkpoints.")
@click.option("--model", default=None, help="SD for the features [default: the data's].")
@click.option("--head", default=None, help="Head variant: paper | tiny [default: by model].")
@click.option("--steps", type=int, default=5000)
@click.option("--batch-size", type=int, default=8, help="Per worker.")
@click.option("--lr", type=float, default=1e-4)
@click.option("--weight-decay", type=float, default=1e-4)
@click.option("--num-workers", type=int, default=1, help="DDP workers (one per GPU).")
@click.option("--use-gpu", is_flag=True, help="One GPU per worker.")
@click.option("--cpus-per-worker", type=float, default=1.0)
@click.option("--report-every", type=int, default=100, help="Steps between checkpoints.")
@click.option("--keep-empty-masks", is_flag=True,
              help="Train on empty oracle masks too (the paper's 'normal training').")
@click.option("--resume", is_flag=True,
              help="Continue from --out's latest checkpoint, at its step and data position.")
@click.option("--allow-partial", is_flag=True,
              help="Train on the finished shards of an unfinished `factory generate` run.")
@click.option("--seed", type=int, default=0, help="Head initialisation and data order.")
@click.option("--address", default=None, help="Ray cluster [default: start a local Ray].")
def cli(keep_empty_masks: bool, **kwargs) -> None:
    """Train the grounding head with Ray Train."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    result = train(skip_empty=not keep_empty_masks, **kwargs)
    m = result.metrics or {}
    click.echo(f"trained to step {m.get('step')} in {time.perf_counter() - start:.0f} s: loss "
               f"{m.get('loss', float('nan')):.4f}, train IoU {iou_text(m.get('iou'))}; "
               f"checkpoint {result.checkpoint.path if result.checkpoint else None}")


def iou_text(iou: float | None) -> str:
    """The training IoU as the console shows it: "n/a" with the reason where no sample had an
    oracle mask to score (the mean of nothing)."""
    if iou is None or math.isnan(iou):
        return "n/a: no oracle mask to learn from"
    return f"{iou:.3f}"


def main(argv: list[str] | None = None) -> None:
    from factory.command import run_command

    run_command(cli, argv, prog_name="python -m train.grounding")
