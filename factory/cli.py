"""The `factory` command. Heavy libraries are imported inside commands, so that `--help` and bad
arguments answer at once; every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import click

from actors.names import DEFAULT_MODEL
from eval.protocol1 import cli as protocol1
from eval.protocol2 import cli as protocol2
from factory.command import run_command
from factory.errors import FactoryError
from factory.options import GenerateOptions, LabelOptions
from train.grounding.job import cli as grounding_job
from train.maskformer.job import cli as maskformer_job


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def cli() -> None:
    """A Ray-distributed dataset factory for open-vocabulary segmentation with diffusion."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def options(*opts):
    """Apply click options in the order --help shows them."""
    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return decorate


STORE_OPTIONS = [
    click.option("--out", required=True,
                 help="Output folder (new, empty, or this run's): a path, or a URI such as "
                      "s3://BUCKET/DIR that every node can write."),
    click.option("--seed", type=int, default=0, help="Run seed."),
    click.option("--shard-size", type=int, default=256, help="Samples per Parquet shard."),
]
SD_OPTIONS = [
    click.option("--steps", type=int, default=50, help="DDIM steps."),
    click.option("--guidance", type=float, default=None,
                 help="Classifier-free guidance [default: 5.0 for --subset train, as the "
                      "official train.py; 7.5 for test and label, as its test.py]."),
    click.option("--feature-step", type=int, default=None,
                 help="Denoising step whose input latent x_t is stored [default: last]."),
    click.option("--precision", default=None,
                 help="float32 | float16 | bfloat16 [default: bfloat16 on a GPU, else float32]."),
    click.option("--compile/--no-compile", default=None,
                 help="torch.compile the UNet, static shapes [default: on a GPU only]. The "
                      "first actor on a node pays about a minute; the others load the cache."),
    click.option("--compile-cache", default=None,
                 help="Folder for torch.compile's cache; a shared mount serves every node "
                      "[default: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/factory/torch-compile]."),
    click.option("--fp8", is_flag=True,
                 help="float8 Linear layers in the UNet (torchao, Ada/Hopper GPUs; lossy, see "
                      "README's Performance)."),
    click.option("--batch-size", type=int, default=16,
                 help="Images per generator call; shorter batches are padded to it."),
]
POOL_OPTIONS = [
    click.option("--label-batch-size", type=int, default=8, help="Images per labeller call."),
    click.option("--generators", default="auto",
                 help="SD generator actors: a number, or auto (one per GPU that carries `gen`, "
                      "growing as gen nodes join)."),
    click.option("--labellers", default="auto",
                 help="Labeller actors: a number, or auto (from the measured speed ratio of "
                      "labeller and generator, at least 1)."),
    click.option("--gen-gpus", type=float, default=None,
                 help="GPUs per generator [default: 1, or 0.8 where labellers share the node]."),
    click.option("--label-gpus", type=float, default=None,
                 help="GPUs per labeller [default: 1, or 0.2 on a node with generators]."),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                 help="Where the stages compute; cpu runs them on the CPU even where Ray gave "
                      "them GPUs (tests, GPU-less clusters) [default: cuda for a pool with "
                      "GPUs, else cpu; an actor given GPUs that sees no CUDA stops the run]."),
    click.option("--address", default=None,
                 help="Ray cluster address, e.g. auto [default: start a local Ray]."),
    click.option("--placement-timeout", type=float, default=None,
                 help="Seconds the pools may wait for nodes before the run is refused "
                      "[default: 1800 on a cluster, time for the autoscaler to boot GPU "
                      "nodes; 10 on a local Ray]."),
    click.option("--allow-drift", is_flag=True,
                 help="Resume although the precision, SD weights or library versions now "
                      "resolve differently from the folder's first run (recorded)."),
    click.option("--max-failed-samples", type=int, default=0,
                 help="Samples the folder may lack because a stage kept failing on them (each "
                      "is tried alone first); they are named, and listed in the manifest "
                      "under `failed`. 0: the first such failure stops the run."),
]


def output_file(path: str, option: str) -> str:
    """An output file argument, refused in one line if it names a folder."""
    if os.path.isdir(path):
        raise FactoryError(f"{option} {path!r} is a folder: give the name of a file to write")
    return path


@cli.command()
@options(
    click.option("--split", default="pascal", help="Vocabulary and split: pascal | coco."),
    click.option("--fold", default="1", help="Seen/unseen fold: 1, 2, 3 (pascal also zs3)."),
    click.option("--subset", default="train",
                 help="train: one or two seen classes; test: every class, paper's counts."),
    click.option("--n", "n", type=int, default=None,
                 help="Samples to make [default for test: 30 per class + 5 (PASCAL) or 2 "
                      "(COCO) per pair]."),
    *STORE_OPTIONS,
    click.option("--model", default=DEFAULT_MODEL,
                 help="SD: hub id, local diffusers folder, or 'tiny' (random weights)."),
    click.option("--detector", default=None,
                 help="torchvision | detectron2 | tiny | test-bright-pixels (a test fixture) "
                      "[default: tiny with --model tiny, else torchvision]."),
    click.option("--detector-weights", default=None,
                 help="Mask R-CNN weights file [default: torchvision's cache]."),
    click.option("--pairs", default=None,
                 help="Co-appearing pairs file from `factory pairs` [default: uniform]."),
    click.option("--two-class-ratio", type=float, default=0.5,
                 help="Share of two-class prompts in subset train."),
    click.option("--oracle", default="union",
                 help="Of the detections of a class scoring >= --score-threshold, union: all "
                      "(the semantic mask); top1: only the top-scoring one, as the paper's "
                      "public code does at mmdet's default test threshold 0.05."),
    click.option("--score-threshold", type=float, default=None,
                 help="Detector score an instance needs to enter a mask; recorded in the "
                      "manifest [default: the oracle's: 0.5 for union, 0.05 for top1]."),
    *SD_OPTIONS, *POOL_OPTIONS,
)
def generate(**kwargs) -> None:
    """Generate training or test triplets: prompts -> SD -> Mask R-CNN -> Parquet shards."""
    from factory.pipeline import generate as run

    click.echo(run(GenerateOptions(**kwargs)).summary())


@cli.command()
@options(
    click.option("--checkpoint", required=True,
                 help="Grounding-head checkpoint folder, or a training --out (its latest)."),
    click.option("--split", default=None,
                 help="pascal | coco; must be the checkpoint's [default: the checkpoint's]."),
    click.option("--fold", default=None, help="Must be the checkpoint's [default: its]."),
    click.option("--classes", default=None,
                 help="Open vocabulary: comma-separated class names, instead of the split's."),
    click.option("--vocab", default=None,
                 help="Open vocabulary file: a class name a line; 'a, b' lines are pairs."),
    click.option("--pairs", default=None,
                 help="Co-appearing pairs file of the split [default: uniform pairs]."),
    click.option("--n", "n", type=int, default=None,
                 help="Samples to make [default: --per-class x classes + --per-pair x pairs]."),
    click.option("--per-class", type=int, default=None,
                 help="Samples per class [default: paper's 500 (PASCAL, open vocabularies) or "
                      "1500 (COCO)]."),
    click.option("--per-pair", type=int, default=None,
                 help="Samples per pair [default: paper's 71 (PASCAL) or 70 (COCO)]."),
    *STORE_OPTIONS,
    click.option("--model", default=None,
                 help="SD; must be the checkpoint's [default: the checkpoint's]."),
    click.option("--threshold", type=float, default=0.5,
                 help="A pixel takes a class whose mask probability is above this (the "
                      "official test.py's rule)."),
    click.option("--ignore-band", type=float, nargs=2, default=None,
                 help="LOW HIGH: top probability in (LOW, HIGH] is labelled 255 (ignore), "
                      "LOW or below background; replaces --threshold."),
    click.option("--min-quality", type=float, default=0.0,
                 help="Drop images whose quality (mean mask confidence) is lower; counted and "
                      "listed in the manifest."),
    *SD_OPTIONS, *POOL_OPTIONS,
)
def label(**kwargs) -> None:
    """Label generated images with a trained grounding head: prompts over every class of the
    split (or an open vocabulary) -> SD -> grounding head -> segmentation set."""
    from factory.pipeline import label as run

    click.echo(run(LabelOptions(**kwargs)).summary())


@cli.command()
@click.argument("folder")
@click.option("--plot", default=None, help="Also draw the histograms into this PNG file.")
def stats(folder: str, plot: str | None) -> None:
    """Counts per class (seen/unseen), empty masks, mask-area and score histograms, and shards
    done in an output FOLDER."""
    from factory.stats import dataset_stats, format_stats, plot_stats

    if plot:
        output_file(plot, "--plot")
    try:
        s = dataset_stats(folder)
        click.echo(format_stats(s))
        if plot:
            plot_stats(s, plot)
            click.echo(f"histograms: {plot}")
    except ValueError as e:  # StoreError, StatsError
        raise FactoryError(str(e)) from None


@cli.command()
@click.argument("folder")
def verify(folder: str) -> None:
    """Check every shard of an output FOLDER against its manifest (rows, bytes, SHA-256); exit
    1 listing the bad shards, which a rerun of the folder's command makes again."""
    from factory.integrity import verify as verify_folder
    from factory.store import ShardStore

    try:
        store = ShardStore.open(folder)
        bad = verify_folder(store)
    except (OSError, ValueError) as e:  # StoreError is a ValueError
        raise FactoryError(str(e)) from None
    if bad:
        for k, why in bad.items():
            click.echo(f"shard {k} ({store.layout.shard_name(k)}): {why}", err=True)
        click.echo(f"{len(bad)} bad shard(s) in {folder}: rerun the command that made it "
                   "to make them again", err=True)
        sys.exit(1)
    click.echo(f"{len(store.finished())} of {store.num_shards} shards verified in {folder}")


@cli.command()
@click.argument("folder")
@click.option("--format", "fmt", required=True, help="coco | voc | parquet.")
@click.option("--out", required=True, help="New (or empty) folder to write.")
def export(folder: str, fmt: str, out: str) -> None:
    """Export a `generate` or `label` output FOLDER: COCO JSON with RLE masks and images, a
    VOC-style folder, or the Parquet shards as they are."""
    from factory.export import export as export_folder

    try:
        r = export_folder(folder, fmt, out)
    except ValueError as e:
        raise FactoryError(str(e)) from None
    click.echo(f"exported {r.images} images ({fmt}) to {r.out}")


@cli.command()
@click.argument("folder")
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--n", type=int, default=16, help="Samples to draw.")
@click.option("--classes", default=None, help="Only samples naming one of these (a,b,...).")
@click.option("--tile", type=int, default=256, help="Tile size in pixels.")
def show(folder: str, out: str, n: int, classes: str | None, tile: int) -> None:
    """A contact sheet of an output FOLDER: images with each class mask in its own colour, the
    class names and the prompt."""
    from factory.show import contact_sheet

    output_file(out, "--out")
    try:
        sheet = contact_sheet(folder, out, n=n, tile=tile,
                              classes=[c.strip() for c in classes.split(",")] if classes
                              else None)
    except ValueError as e:
        raise FactoryError(str(e)) from None
    missing = (f" (no sample names {', '.join(map(repr, sheet.missing))})" if sheet.missing
               else "")
    click.echo(f"{sheet.tiles} samples drawn to {out}{missing}")


@cli.command()
@click.argument("folder")
@click.option("--per-class", type=int, default=24,
              help="Samples shown per class, at most (a fixed, spread-out pick).")
@click.option("--out", default=None,
              help="HTML file to write, its pictures in a folder beside it "
                   "[default: FOLDER/report/index.html].")
def report(folder: str, per_class: int, out: str | None) -> None:
    """One offline HTML page of an output FOLDER (generate, label, or Protocol I/II results):
    a gallery with the masks, the `factory stats` figures, the run's manifest, the tables."""
    from factory.report import make_report

    if out:
        output_file(out, "--out")
    try:
        result = make_report(folder, out=out, per_class=per_class)
    except ValueError as e:  # ReportError, StoreError
        raise FactoryError(str(e)) from None
    click.echo(result.summary())


@cli.command()
@click.option("--coco", "coco_json", default=None, help="COCO instances_*.json file.")
@click.option("--voc", "voc_root", default=None, help="VOC folder (VOCdevkit/VOC2012).")
@click.option("--voc-image-set", default="Segmentation/trainval",
              help="VOC image list under ImageSets/.")
@click.option("--split", default=None,
              help="Vocabulary to write names in [default: coco for --coco, pascal for --voc].")
@click.option("--min-count", type=int, default=1, help="Images a pair must appear in.")
@click.option("--out", required=True, help="Pairs file to write (JSON).")
def pairs(coco_json, voc_root, voc_image_set, split, min_count, out) -> None:
    """Co-appearing class pairs from real annotations, for `generate --pairs`."""
    from factory.pairs import make_pairs

    output_file(out, "--out")
    try:
        n, images, split = make_pairs(out, coco_json, voc_root, voc_image_set, split, min_count)
    except ValueError as e:
        raise FactoryError(str(e)) from None
    click.echo(f"{n} co-appearing {split} pairs from {images} images, to {out}")


@cli.command()
@click.option("--out", default=None, help="Output folder [default: a new temporary folder].")
def demo(out: str | None) -> None:
    """The whole job on tiny random-weight models (no downloads), in DIR: generate training
    triplets (triplets/), train the grounding head briefly (grounding/), label new images of every
    class with it (labels/), export them (export/coco, export/voc), draw grid.png, and score the
    head and DAAM on a small test set (test/) by Protocol I (protocol1.json, .md); then train a
    tiny MaskFormer on the labels (maskformer/) and score it by Protocol II on a VOC-layout
    folder of drawn shapes (voc/: VOC val's layout only, no train lists; protocol2.json, .md);
    last, an HTML report of each folder (report/index.html). A rerun finishes what is missing."""
    from factory.demo import demo as run

    run(out or tempfile.mkdtemp(prefix="factory-demo-"), click.echo)


@cli.group("eval")
def eval_group() -> None:
    """The paper's evaluation protocols."""


eval_group.add_command(protocol1, name="grounding")
eval_group.add_command(protocol2, name="segmentation")


@cli.group("train")
def train_group() -> None:
    """Training jobs on Ray Train (also `python -m train.grounding` / `train.maskformer`)."""


train_group.add_command(grounding_job, name="grounding")
train_group.add_command(maskformer_job, name="maskformer")


def main(argv: list[str] | None = None) -> None:
    run_command(cli, argv, prog_name="factory")
