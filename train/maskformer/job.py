"""`python -m train.maskformer` (also `factory train maskformer`): train a MaskFormer on
`factory label` outputs (and VOC-layout folders) with Ray Train, one DDP worker per GPU (or CPU
workers), for Protocol II (paper sec. 5.2).

The paper's recipe is the default: MaskFormer R-101 from ImageNet weights (`--backbone-weights`,
required for `--variant paper` unless `--random-backbone`), 224x224 crops, 40k iterations at a
global batch of 8 (split across the workers), AdamW lr 1e-4, weight decay 1e-4, with
MaskFormer's own schedule (`train.maskformer.optim`: backbone lr x0.1, poly decay, full-model
gradient clipping at 0.01) and loss (deep supervision, the mask count averaged over workers:
`train.maskformer.model.MaskFormerTraining`). `--init-from` starts from a trained MaskFormer
with a fresh optimiser and schedule (model D: finetuning on real seen-class images). Every run
has a zero-shot fold: its label folders', or for VOC folders alone `--fold` (default: that of
the `--init-from` model).

Each worker's share of the stream comes as units (runs of one shard's items, `data.plan_units`);
the worker decodes and crops them in Ray Data's CPU tasks from its own step on, so a worker
restarted by Ray Train skips the batches it has trained on without reading them, and reads each
shard once per pass.

Checkpoints (under --out, every --report-every steps) are folders holding the model as
transformers saves it (`config.json`, weights), `train.pt` (optimizer, step, stream position),
`maskformer.json` (what it was trained for) and `probe.pt` (its logits on a fixed input): a job
that starts from a checkpoint (`--resume`, `--init-from`, or Ray Train's restart) checks that the
reloaded model reproduces them before its first step. `--resume` continues from the latest at
its step and stream position.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict

import click
import numpy as np

from factory.errors import FactoryError
from train import jobs

log = logging.getLogger(__name__)

RUN_NAME = "maskformer"
LOG_FILE = "train.log"
INFO, TRAIN_STATE, PROBE = "maskformer.json", "train.pt", "probe.pt"
PROBE_TOLERANCE = 1e-4  # reloaded vs saved probe logits (absolute, plus 1e-3 relative)
IMAGENET_WEIGHTS = ("torchvision's ResNet-101 ImageNet weights: torch.save(torchvision.models."
                    "resnet101(weights='IMAGENET1K_V1').state_dict(), 'resnet101.pth'), i.e. "
                    "https://download.pytorch.org/models/resnet101-63fe2227.pth")


def probe_input():
    """A fixed input whose logits each checkpoint stores."""
    import torch

    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def save_checkpoint(folder: str, model, opt, step: int, position: int, info: dict) -> None:
    import torch

    model.save_pretrained(folder)
    torch.save({"opt": opt.state_dict(), "step": step, "position": position},
               os.path.join(folder, TRAIN_STATE))
    classes, masks = probe_logits(model)
    torch.save({"class": classes, "mask": masks}, os.path.join(folder, PROBE))
    with open(os.path.join(folder, INFO), "w", encoding="utf-8") as f:
        json.dump({**info, "step": step, "position": position}, f, indent=2)


def probe_logits(model):
    """(class, mask) logits of `model` on `probe_input`, in eval mode, on the CPU."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=probe_input().to(next(model.parameters()).device))
    model.train(was_training)
    return out.class_queries_logits.cpu(), out.masks_queries_logits.cpu()


def probe_difference(model, folder: str) -> float:
    """The largest difference between `model`'s probe logits and those saved in `folder`,
    relative to PROBE_TOLERANCE (1 + 1e-3 x |saved| absolute): above 1, it is not that
    checkpoint's model."""
    import torch

    saved = torch.load(os.path.join(folder, PROBE), map_location="cpu")
    worst = 0.0
    for now, then in zip(probe_logits(model), (saved["class"], saved["mask"]), strict=True):
        if now.shape != then.shape:
            return math.inf
        allowed = PROBE_TOLERANCE * (1 + 1e3 * then.abs())
        worst = max(worst, float(((now - then).abs() / allowed).max()))
    return worst


def read_info(folder: str) -> dict:
    return jobs.read_info(folder, INFO)


def latest_checkpoint(path: str) -> str | None:
    """`path` itself if it is a checkpoint folder, else its latest checkpoint below, or None."""
    return jobs.latest_checkpoint(path, INFO)


def load_maskformer(path: str, device: str = "cpu"):
    """(model in eval mode, info) from a checkpoint folder or a training --out (its latest);
    the backbone's BatchNorm frozen again if it was in training."""
    from transformers import MaskFormerForInstanceSegmentation

    from train.maskformer.model import freeze_backbone_norm

    folder = latest_checkpoint(path)
    if folder is None:
        raise ValueError(f"no MaskFormer checkpoint ({INFO}) in {path!r}")
    try:
        model = MaskFormerForInstanceSegmentation.from_pretrained(folder)
        info = read_info(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the MaskFormer checkpoint in {folder!r}: "
                         f"{str(e).splitlines()[0]}") from None
    if info.get("frozen_backbone_norm"):
        freeze_backbone_norm(model)
    return model.to(device).eval(), {**info, "folder": os.path.abspath(folder)}


def worker_batches(cfg: dict, step: int):
    """This worker's batches from the job's step `step` on: its units (its dataset, see
    `train`) without the items of the steps before, decoded and cropped in Ray Data tasks."""
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions

    from train.maskformer.data import decode_units, encode_units, load_units, skip_units

    rank = ray.train.get_context().get_world_rank()
    units = decode_units(ray.train.get_dataset_shard(jobs.worker_dataset(rank)).iter_rows())
    units = skip_units(units, (step - cfg["start_step"]) * cfg["batch_size"])
    if not units:
        return iter(())
    ds = ray.data.from_items(encode_units(units)).map_batches(
        load_units, fn_kwargs={"sources": cfg["sources"], "seed": cfg["seed"],
                               "size": cfg["crop"]}, batch_size=1, num_cpus=0.25)
    ds.context.execution_options = ExecutionOptions(preserve_order=True)
    return ds.iter_batches(batch_size=cfg["batch_size"], batch_format="numpy", drop_last=True)


def across_workers(values: list[float], device) -> list[list[float]]:
    """Every worker's `values` (the same length on each), in rank order."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine.tolist()]
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [v.tolist() for v in every]


def start(cfg: dict, restart: str | None, device) -> tuple:
    """Where a worker starts: (MaskFormerTraining on `device`, its optimiser and schedule, the
    step, the reload check). From Ray Train's restart checkpoint `restart` or --resume's: the
    weights, optimiser and step; from --init-from: the weights, with a fresh optimiser and
    schedule; else a new model. A reloaded model must reproduce its checkpoint's probe logits
    before any step (the check: `probe_difference`, NaN for a new model)."""
    import torch
    from transformers import MaskFormerForInstanceSegmentation

    from train.maskformer.model import MaskFormerTraining, build_maskformer, freeze_backbone_norm
    from train.maskformer.optim import build_optimizer

    state, folder = None, restart or cfg["resume_from"]
    if folder is not None:
        state = torch.load(os.path.join(folder, TRAIN_STATE), map_location="cpu")
    else:
        folder = cfg["init_from"]  # its weights only
    if folder is not None:
        model = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    else:
        model = build_maskformer(cfg["variant"], cfg["num_labels"], cfg["backbone_weights"],
                                 seed=cfg["seed"])
    if cfg["frozen_backbone_norm"]:
        freeze_backbone_norm(model)
    model.to(device).train()
    reload = math.nan
    if folder is not None:
        reload = probe_difference(model, folder)
        if reload > 1:
            raise RuntimeError(f"the MaskFormer reloaded from {folder} does not reproduce its "
                               f"probe logits ({reload:.3g} x the tolerance)")
    trainer = MaskFormerTraining(model, deep_supervision=cfg["deep_supervision"]).to(device)
    step = state["step"] if state is not None else cfg["start_step"]
    opt, lr_schedule = build_optimizer(trainer, cfg["schedule"], start=step,
                                       state=state["opt"] if state is not None else None)
    return trainer, opt, lr_schedule, step, reload


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from train.maskformer.model import image_processor, targets
    from train.maskformer.optim import clip_and_step

    device = ray.train.torch.get_device()
    ckpt = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    trainer, opt, lr_schedule, step, reload = start(
        cfg, ckpt.to_directory() if ckpt is not None else None, device)
    model = trainer.model
    rank = ray.train.get_context().get_world_rank()
    per_step = cfg["batch_size"] * ray.train.get_context().get_world_size()
    ddp = ray.train.torch.prepare_model(trainer)
    processor = image_processor()
    losses: list[float] = []
    counts: list[tuple[int, float]] = []  # (this worker's masks, the normaliser) per step
    # what this job really trained on, for its reports: where it started, and the first
    # stream item this worker saw
    started_at, first_item = step, None
    for batch in worker_batches(cfg, step):
        terms = ddp(**targets(processor, batch["image"], batch["label"], device))
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        update = clip_and_step(trainer, opt, lr_schedule, cfg["schedule"])
        losses.append(loss.item())
        counts.append(trainer.criterion.last_counts)
        low = int(batch["position"].min())
        first_item = low if first_item is None else min(first_item, low)
        step += 1
        if step % cfg["report_every"] == 0 or step == cfg["steps"]:
            position = cfg["start_position"] + (step - cfg["start_step"]) * per_step
            checksum = sum(float(p.detach().double().sum()) for p in trainer.parameters())
            every = across_workers([checksum, *(c for pair in counts for c in pair)], device)
            metrics = {"step": step, "loss": float(np.mean(losses)), "position": position,
                       "job_started_at_step": started_at, "job_first_item": first_item,
                       "lr": update["lr"]["head"], "backbone_lr": update["lr"]["backbone"],
                       "grad_norm": update["grad_norm"], "loss_terms": len(terms),
                       "reload_probe_difference": reload,
                       # DDP keeps the workers' parameters equal; each worker's mask count of
                       # the steps since the last report, and the normaliser its loss used
                       "param_checksums": [w[0] for w in every],
                       "mask_counts": [w[1::2] for w in every],
                       "mask_normalisers": [w[2::2] for w in every]}
            losses, counts = [], []
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


def check_backbone(variant: str, backbone_weights: str | None, random_backbone: bool,
                   init_from: str | None) -> None:
    """FactoryError unless the backbone's start is one of: ImageNet weights, a trained
    MaskFormer (--init-from), or random weights asked for (--random-backbone, or tiny)."""
    from train.maskformer.model import SEGMENTATION_PRETRAINED

    if backbone_weights and random_backbone:
        raise FactoryError("give --backbone-weights or --random-backbone, not both")
    if init_from and (backbone_weights or random_backbone):
        raise FactoryError("--init-from starts the whole model from a MaskFormer checkpoint: "
                           "drop --backbone-weights and --random-backbone")
    if backbone_weights and SEGMENTATION_PRETRAINED.search(backbone_weights):
        raise FactoryError(f"--backbone-weights {backbone_weights!r} names a MaskFormer/"
                           "Mask2Former checkpoint: trained on COCO or ADE segmentation, it has "
                           "seen the unseen classes; use ImageNet backbone weights")
    if backbone_weights and not os.path.exists(backbone_weights):
        raise FactoryError(f"no backbone weights at {backbone_weights!r}")
    if variant == "paper" and not (backbone_weights or random_backbone or init_from):
        raise FactoryError(f"--variant paper starts ResNet-101 from ImageNet weights: give "
                           f"--backbone-weights FILE ({IMAGENET_WEIGHTS}), or --random-backbone "
                           "to train it from scratch")


def check_init_from(init_from: str, variant: str, info: dict) -> str:
    """The checkpoint folder --init-from names; FactoryError unless it is a MaskFormer of
    this variant trained for this run's split, fold and classes."""
    folder = latest_checkpoint(init_from) if os.path.isdir(init_from) else None
    if folder is None:
        raise FactoryError(f"--init-from {init_from!r} holds no MaskFormer checkpoint")
    old = read_info(folder)
    if (old.get("split"), old.get("fold")) != (info["split"], info["fold"]) or old.get(
            "classes") != info["classes"]:
        raise FactoryError(f"--init-from {init_from!r} was trained for {old.get('split')} fold "
                           f"{old.get('fold')}, not {info['split']} fold {info['fold']}")
    if old.get("variant") != variant:
        raise FactoryError(f"--init-from {init_from!r} is a {old.get('variant')} MaskFormer: "
                           f"pass --variant {old.get('variant')}")
    return os.path.abspath(folder)


def plan(data: list[str], out: str, *, variant: str = "paper", steps: int = 40_000,
         batch_size: int = 8, crop: int = 224, lr: float = 1e-4, weight_decay: float = 1e-4,
         backbone_weights: str | None = None, random_backbone: bool = False,
         init_from: str | None = None, fold: str | None = None,
         voc_train_list: str | None = None, deep_supervision: bool = True,
         backbone_lr_multiplier: float = 0.1, poly_power: float = 0.9, warmup_steps: int = 0,
         warmup_factor: float = 0.001, clip_grad_norm: float = 0.01, num_workers: int = 1,
         report_every: int = 500, resume: bool = False, allow_partial: bool = False,
         seed: int = 0) -> dict:
    """The job's config (what every worker gets) from `train`'s arguments, checked: a
    FactoryError for every bad input. Reads the data folders' lists; starts and writes
    nothing."""
    from train.maskformer.data import is_voc, open_sources
    from train.maskformer.model import SPECS
    from train.maskformer.optim import Schedule

    for name, value in (("steps", steps), ("batch size", batch_size), ("crop", crop),
                        ("workers", num_workers), ("report every", report_every)):
        if value <= 0:
            raise FactoryError(f"{name} must be > 0, got {value}")
    if batch_size % num_workers:
        raise FactoryError(f"--batch-size {batch_size} is the global batch: it must be a "
                           f"multiple of --num-workers {num_workers}")
    schedule = Schedule(steps=steps, lr=lr, weight_decay=weight_decay,
                        backbone_multiplier=backbone_lr_multiplier, poly_power=poly_power,
                        warmup_steps=warmup_steps, warmup_factor=warmup_factor,
                        clip=clip_grad_norm)
    try:
        schedule.check()
    except ValueError as e:
        raise FactoryError(str(e)) from None
    if variant not in SPECS:
        raise FactoryError(f"unknown variant {variant!r}: one of {', '.join(SPECS)}")
    if not data:
        raise FactoryError("give at least one --data folder")
    check_backbone(variant, backbone_weights, random_backbone, init_from)
    if init_from and fold is None and all(map(is_voc, data)):  # model D: the model's fold
        folder = latest_checkpoint(init_from) if os.path.isdir(init_from) else None
        fold = read_info(folder).get("fold") if folder else None
    try:
        sources, classes, fold = open_sources(data, allow_partial, fold, voc_train_list)
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
            "seed": seed, "data": [os.path.abspath(p) for p in data],
            "voc_train_list": voc_train_list and os.path.abspath(voc_train_list),
            "batch_size": batch_size, "deep_supervision": deep_supervision,
            "schedule": asdict(schedule)}
    if init_from:
        init_from = check_init_from(init_from, variant, info)
        frozen = bool(read_info(init_from).get("frozen_backbone_norm"))
        backbone = "init-from"
    else:
        frozen = bool(backbone_weights)
        backbone = "imagenet" if backbone_weights else "random"
    info.update(backbone=backbone, frozen_backbone_norm=frozen, init_from=init_from,
                backbone_weights=backbone_weights and os.path.abspath(backbone_weights))
    start_step, start_position = 0, 0
    if previous is not None:
        old = read_info(previous)
        if any(old.get(k) != info[k] for k in ("split", "fold", "variant", "seed")):
            raise FactoryError(f"{out!r} trains a {old.get('variant')} MaskFormer for "
                               f"{old.get('split')} fold {old.get('fold')}, not this run")
        if init_from and old.get("init_from") != init_from:
            raise FactoryError(f"{out!r} was started from {old.get('init_from')}, not "
                               f"--init-from {init_from}")
        if old["step"] >= steps:
            raise FactoryError(f"{out!r} is trained to step {old['step']} already: raise --steps")
        start_step, start_position = old["step"], old["position"]
        info.update({k: old.get(k) for k in ("backbone", "frozen_backbone_norm", "init_from",
                                              "backbone_weights")})
    return {"variant": variant, "num_labels": len(classes.names), "out": out,
            "backbone_weights": backbone_weights,
            "frozen_backbone_norm": info["frozen_backbone_norm"],
            "init_from": init_from if previous is None else None,
            "deep_supervision": deep_supervision, "schedule": schedule, "steps": steps,
            "global_batch": batch_size, "batch_size": batch_size // num_workers,
            "num_workers": num_workers, "crop": crop, "sources": sources,
            "report_every": report_every, "seed": seed, "resume_from": previous,
            "start_step": start_step, "start_position": start_position, "info": info}


def train(data: list[str], out: str, *, use_gpu: bool = False, cpus_per_worker: float = 1.0,
          address: str | None = None, **options):
    """Check the arguments (`plan`'s options), then run the Ray Train job; returns Ray Train's
    result. `batch_size` is the global batch, split evenly across the `num_workers` workers."""
    cfg = plan(data, out, **options)
    out, num_workers = cfg["out"], cfg["num_workers"]

    import ray

    from factory.console import ray_logs_to
    from factory.pools import connect_ray
    from train.maskformer.data import encode_units, plan_units, stream
    from train.stream import worker_items

    fresh = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        with ray_logs_to(os.path.join(out, LOG_FILE)):
            connect_ray(address)
            jobs.check_placement(num_workers, use_gpu, cpus_per_worker)
            items = stream(cfg["sources"], cfg["seed"], cfg["start_position"],
                           (cfg["steps"] - cfg["start_step"]) * cfg["global_batch"])
            # each worker's units: what it reads, in order (see `worker_batches`)
            plans = [ray.data.from_items(encode_units(plan_units(mine)))
                     for mine in worker_items(items, cfg["batch_size"], num_workers)]
            return jobs.fit(train_loop_per_worker, cfg, plans, out=out, name=RUN_NAME,
                            use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, info_file=INFO)
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
@click.option("--batch-size", type=int, default=8,
              help="Global batch (the paper's 8), split evenly across the workers.")
@click.option("--crop", type=int, default=224, help="Training crop size (pixels).")
@click.option("--lr", type=float, default=1e-4)
@click.option("--weight-decay", type=float, default=1e-4)
@click.option("--backbone-weights", default=None,
              help="ImageNet weights: torchvision resnet101 state dict, or a transformers ResNet "
                   "folder; required for --variant paper.")
@click.option("--random-backbone", is_flag=True,
              help="Start --variant paper's backbone from random weights instead.")
@click.option("--init-from", default=None,
              help="MaskFormer checkpoint (or training --out) to start from, with a fresh "
                   "optimiser and schedule: model D's finetuning.")
@click.option("--fold", default=None,
              help="Zero-shot fold (zs3 | 1 | 2 | 3) of VOC folders trained on alone "
                   "[default: the label folders', or --init-from's].")
@click.option("--voc-train-list", default=None,
              help="Image list of the VOC folders, e.g. the SBD-augmented train_aug.txt "
                   "[default: their ImageSets/Segmentation/train.txt].")
@click.option("--deep-supervision/--no-deep-supervision", default=True,
              help="The loss on every decoder layer (MaskFormer's DEEP_SUPERVISION).")
@click.option("--backbone-lr-multiplier", type=float, default=0.1,
              help="Backbone lr over --lr (SOLVER.BACKBONE_MULTIPLIER).")
@click.option("--poly-power", type=float, default=0.9, help="WarmupPolyLR's power.")
@click.option("--warmup-steps", type=int, default=0,
              help="Linear warm-up steps (MaskFormer's semantic configs: WARMUP_ITERS 0).")
@click.option("--warmup-factor", type=float, default=0.001,
              help="lr x this at step 0 of the warm-up (detectron2's WARMUP_FACTOR).")
@click.option("--clip-grad-norm", type=float, default=0.01,
              help="Full-model gradient-norm clip (CLIP_GRADIENTS full_model); 0: none.")
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
