"""`factory demo`: the whole job on tiny random-weight models, no downloads (see its --help)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

from factory.options import GenerateOptions, LabelOptions

DEMO = dict(split="pascal", fold="1", subset="train", n=16, shard_size=8, model="tiny",
            batch_size=4, label_batch_size=4)
DEMO_TRAIN = dict(steps=10, batch_size=4, report_every=5, cpus_per_worker=0.5)
DEMO_LABEL = dict(n=8, shard_size=8, batch_size=4, label_batch_size=4)
DEMO_TEST = {**DEMO, "subset": "test", "n": 8}
DEMO_MASKFORMER = dict(variant="tiny", steps=4, batch_size=2, crop=64, report_every=4,
                       cpus_per_worker=0.5)
DEMO_VOC = 8  # drawn val images for Protocol II


def demo(out: str, echo: Callable[[str], None]) -> None:
    """Run every step into `out`, skipping those an earlier demo there finished; `echo` shows
    each step's lines."""
    from eval.protocol1 import evaluate, write_report
    from eval.protocol2 import evaluate as evaluate_segmentation
    from eval.protocol2 import write_report as write_segmentation_report
    from factory.export import export as export_folder
    from factory.pipeline import generate, label
    from factory.report import make_report
    from factory.show import contact_sheet
    from factory.stats import dataset_stats, format_stats
    from factory.toyvoc import write_shapes_voc
    from train.grounding.checkpoint import latest_checkpoint, read_info
    from train.grounding.job import iou_text, train
    from train.maskformer import job as maskformer

    path = functools.partial(os.path.join, out)
    echo(f"demo: {DEMO['n']} samples of {DEMO['split']} fold {DEMO['fold']} on tiny "
         "random-weight SD and Mask R-CNN (images and masks are noise, by design)")
    echo(generate(GenerateOptions(out=path("triplets"), **DEMO)).summary())
    echo(format_stats(dataset_stats(path("triplets"))))
    done = latest_checkpoint(path("grounding")) if os.path.isdir(path("grounding")) else None
    if done is None:
        m = train(path("triplets"), path("grounding"), **DEMO_TRAIN).metrics
    else:  # a rerun of the demo: its head is trained already
        m = read_info(done)["metrics"]
    echo(f"grounding head: {m['step']} steps, loss {m['loss']:.4f}, train IoU "
         f"{iou_text(m['iou'])}"
         + (" (the random detector finds nothing)" if math.isnan(m["iou"]) else ""))
    echo(f"labelling {DEMO_LABEL['n']} new images of all {DEMO['split']} classes, seen and "
         "unseen, with that head")
    echo(label(LabelOptions(out=path("labels"), checkpoint=path("grounding"),
                            **DEMO_LABEL)).summary())
    for fmt in ("coco", "voc"):
        if not os.path.isdir(path("export", fmt)):
            r = export_folder(path("labels"), fmt, path("export", fmt))
            echo(f"exported {r.images} images ({fmt}) to {r.out}")
    sheet = contact_sheet(path("labels"), path("grid.png"), n=DEMO_LABEL["n"])
    echo(f"{sheet.tiles} labelled samples drawn to {path('grid.png')}")
    echo(generate(GenerateOptions(out=path("test"), **DEMO_TEST)).summary())
    if not os.path.isfile(path("protocol1.json")):
        report = evaluate(path("test"), path("grounding"), "daam", min_area=0.0,
                          batch_size=DEMO["batch_size"], ray_log=path("protocol1.log"))
        write_report(report, path("protocol1.json"))
    with open(path("protocol1.md"), encoding="utf-8") as f:
        echo(f.read().rstrip())
    echo("(random weights: the measured rows are meaningless, they show the machinery)")
    done = (maskformer.latest_checkpoint(path("maskformer"))
            if os.path.isdir(path("maskformer")) else None)
    if done is None:
        m = maskformer.train([path("labels")], path("maskformer"), **DEMO_MASKFORMER).metrics
    else:
        m = maskformer.read_info(done)
    echo(f"MaskFormer ({DEMO_MASKFORMER['variant']}): {m['step']} steps on the labels, "
         f"loss {m['loss']:.4f}")
    if not os.path.isfile(path("protocol2.json")):
        voc = path("voc", "VOC2012")
        if not os.path.isdir(voc):
            write_shapes_voc(voc, DEMO_VOC)
        report = evaluate_segmentation(voc=voc, checkpoint=path("maskformer"),
                                       fold=DEMO["fold"], ray_log=path("protocol2.log"))
        write_segmentation_report(report, path("protocol2.json"))
    with open(path("protocol2.md"), encoding="utf-8") as f:
        echo(f.read().rstrip())
    echo("(a few steps on noise images, scored on drawn shapes: these Protocol II numbers "
         "are meaningless too)")
    for folder in (path("triplets"), path("labels"), path("test"), out):  # out: the protocols
        echo(make_report(folder).summary())
