"""`python -m eval.protocol2` (also `factory eval segmentation`): Protocol II of the paper (sec.
5.2, Table 2), zero-shot semantic segmentation of real images by a segmenter trained on the
factory's synthetic sets.

    --voc VOCdevkit/VOC2012 --checkpoint RUN [--fold zs3|1|2|3]   the 1,449 VOC val images
    --coco COCO_ROOT --checkpoint RUN [--fold zs65]               the 5,000 COCO val2017 images
    ... --predictions DIR                                         any segmenter's PNGs instead

VOC is scored with 20 object classes, background pixels ignored (ZegFormer's convention; the
paper's table copies its ZegFormer row), and with 21 classes (background counted as seen). A
checkpoint with a background class is scored on the 20 classes two ways: `voc20`, ZegFormer's,
the argmax over the 20 object channels only (ZegFormer has no background class, so it never
predicts background on an object; comparable with its row), and `voc20_argmax21`, the argmax
over all 21 (a background prediction on an object pixel is a miss). COCO's instances are
rasterised into a semantic map of the 80 thing classes (larger instances first, so smaller ones
stay on top); crowd regions and pixels of no thing are ignored. COCO's unseen mIoU is given over
the 15 classes of fold zs65 (`coco80`) and over the 14 that COCO-sim has (`coco80_sim14`: mouse
left out of both seen and unseen). Predictions are label maps in the dataset's values
(VOC: 0 background, 1-20; COCO: category ids 1-90; 255 or an unknown value: no prediction).
Images run through Ray Data; each worker returns per-class pixel counts, summed here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import click
import numpy as np
from PIL import Image

from eval.metrics import IoUAccumulator, seen_unseen
from factory.errors import FactoryError
from factory.options import check_cuda_here
from factory.schema import IGNORE
from factory.vocab import COCO_CATEGORIES, COCO_SIM_DROPPED, VOCABULARIES, get_split
from train.maskformer.data import CLASS_LISTS

VOC_FOLDS = ("zs3", "1", "2", "3")
COCO_FOLDS = ("zs65",)
COCO_ANNOTATIONS = os.path.join("annotations", "instances_val2017.json")
MISSING_SHOWN = 10

log = logging.getLogger(__name__)


def protocol2_split(dataset: str, fold: str) -> tuple[list[str], list[str]]:
    """(seen, unseen) class names in the dataset's class list (`CLASS_LISTS`)."""
    if dataset == "voc":
        if fold not in VOC_FOLDS:
            raise ValueError(f"unknown fold {fold!r} for VOC: one of {', '.join(VOC_FOLDS)}")
        split = get_split("pascal", fold)
        return list(split.seen), list(split.unseen)
    if fold not in COCO_FOLDS:
        raise ValueError(f"unknown fold {fold!r} for COCO: one of {', '.join(COCO_FOLDS)}")
    # coco fold 1's 14 unseen classes plus mouse, which COCO-sim dropped for Protocol I only
    sim = VOCABULARIES["coco"]
    unseen_ids = {sim.detector_ids[n] for n in get_split("coco", "1").unseen} | {74}
    names = CLASS_LISTS["coco"].names
    ids = CLASS_LISTS["coco"].label_values
    return ([n for n, i in zip(names, ids, strict=True) if i not in unseen_ids],
            [n for n, i in zip(names, ids, strict=True) if i in unseen_ids])


def voc_items(root: str) -> list[str]:
    """The val image ids of a VOC folder (ValueError names what is missing)."""
    lists = os.path.join(root, "ImageSets", "Segmentation", "val.txt")
    for need in (lists, os.path.join(root, "JPEGImages"), os.path.join(root, "SegmentationClass")):
        if not os.path.exists(need):
            raise ValueError(f"{root!r} is not a VOC folder: no {os.path.relpath(need, root)}")
    with open(lists, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError(f"{lists!r} lists no image")
    return ids


def coco_items(root: str) -> list[str]:
    path = os.path.join(root, COCO_ANNOTATIONS)
    if not os.path.isfile(path):
        raise ValueError(f"{root!r} is not a COCO root: no {COCO_ANNOTATIONS}")
    with open(path, encoding="utf-8") as f:
        images = json.load(f)["images"]
    return [str(im["id"]) for im in images]


def coco_semantic(anns: list[dict], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 semantic map of COCO category ids: larger instances painted first so that
    smaller ones stay visible; crowd regions and pixels of no thing are IGNORE."""
    from pycocotools import mask as mask_utils

    label = np.full((height, width), IGNORE, dtype=np.uint8)
    for ann in sorted(anns, key=lambda a: -a["area"]):
        if ann.get("iscrowd") or ann["category_id"] not in COCO_CATEGORIES:
            continue
        seg = ann["segmentation"]
        rles = (mask_utils.frPyObjects(seg, height, width) if isinstance(seg, list)
                else [mask_utils.frPyObjects(seg, height, width)]
                if isinstance(seg["counts"], list) else [seg])
        label[mask_utils.decode(mask_utils.merge(rles)).astype(bool)] = ann["category_id"]
    return label


class Scorer:
    """Per-image pixel counts for each convention: ground truth and prediction label maps (in
    the dataset's values) -> {convention: (intersection, union)}."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        classes = CLASS_LISTS["pascal" if dataset == "voc" else "coco"]
        self.lut = classes.lut()  # dataset label value -> class index; others IGNORE
        self.n = len(classes.names)

    def counts(self, pred: np.ndarray, gt: np.ndarray, objects: np.ndarray | None = None
               ) -> dict[str, tuple[list, list]]:
        """pred: (H, W) the prediction over all classes; objects: (H, W) the prediction over
        the object classes alone (VOC, a model with a background class), or None."""
        p, g = self.lut[pred], self.lut[gt]
        out = {}
        if self.dataset == "voc":
            with_bg = IoUAccumulator(self.n, include_background=True)
            with_bg.update(p, g)
            objects_gt = np.where(g == 0, IGNORE, g).astype(np.uint8)
            no_bg = IoUAccumulator(self.n)
            no_bg.update(p if objects is None else self.lut[objects], objects_gt)
            accs = {"voc20": no_bg}
            if objects is not None:
                accs["voc20_argmax21"] = IoUAccumulator(self.n)
                accs["voc20_argmax21"].update(p, objects_gt)
            accs["voc21"] = with_bg
        else:
            acc = IoUAccumulator(self.n, include_background=True)
            acc.update(p, g)
            accs = {"coco80": acc}
        for name, acc in accs.items():
            out[name] = (acc.intersection.tolist(), acc.union.tolist())
        return out


def summarise(totals: dict[str, IoUAccumulator], dataset: str, seen: list[str],
              unseen: list[str]) -> dict:
    """The Table-2 columns (percent) and per-class IoU of each convention."""
    names = CLASS_LISTS["pascal" if dataset == "voc" else "coco"].names
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for conv, acc in totals.items():
        seen_ids = [index[n] for n in seen] + ([0] if conv == "voc21" else [])
        s, u, h = seen_unseen(acc, seen_ids, [index[n] for n in unseen])
        out[conv] = {"seen": 100 * s, "unseen": 100 * u, "harmonic": 100 * h,
                     "per_class": {names[c]: 100 * v for c, v in acc.iou(
                         range(0 if conv == "voc21" else 1 if dataset == "voc" else 0,
                               acc.num_classes)).items()}}
        if conv == "coco80":  # COCO-sim's 14 unseen classes: mouse neither seen nor unseen
            sim = [index[n] for n in unseen if n not in COCO_SIM_DROPPED]
            s, u, h = seen_unseen(acc, [index[n] for n in seen], sim)
            out["coco80_sim14"] = {"seen": 100 * s, "unseen": 100 * u, "harmonic": 100 * h,
                                   "unseen_classes": [names[c] for c in sim]}
    return out


def read_prediction(path: str) -> np.ndarray:
    """An index or palette PNG -> (H, W) uint8 label values."""
    return np.asarray(Image.open(path))


def ground_truth(dataset: str, root: str, item: str, coco=None) -> tuple[np.ndarray, str]:
    """(label map, image path) of one val image."""
    if dataset == "voc":
        return (np.asarray(Image.open(os.path.join(root, "SegmentationClass", item + ".png"))),
                os.path.join(root, "JPEGImages", item + ".jpg"))
    info = coco.imgs[int(item)]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=int(item)))
    return (coco_semantic(anns, info["height"], info["width"]),
            os.path.join(root, "val2017", info["file_name"]))


class ScoreImages:
    """A Ray Data stage: image ids -> per-image counts, predicting with a checkpoint's
    MaskFormer or reading `predictions`."""

    def __init__(self, dataset: str, root: str, checkpoint: str | None,
                 predictions: str | None, device: str = "cpu") -> None:
        self.dataset, self.root, self.predictions = dataset, root, predictions
        self.scorer = Scorer(dataset)
        self.coco = None
        if dataset == "coco":
            from pycocotools.coco import COCO

            self.coco = COCO(os.path.join(root, COCO_ANNOTATIONS))
        self.model = None
        if checkpoint is not None:
            import torch

            from train.maskformer.job import load_maskformer
            from train.maskformer.model import image_processor

            if device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("the scoring actor was given a GPU but sees no CUDA device; "
                                   "pass --device cpu to score on the CPU on purpose")
            self.device = device
            self.model, info = load_maskformer(checkpoint, self.device)
            self.crop = info["crop"]
            self.processor = image_processor()
            classes = CLASS_LISTS[info["split"]]
            self.to_values = np.asarray(classes.label_values, dtype=np.uint8)
            self.background = classes.background  # class 0 is background

    def predict(self, image_path: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The MaskFormer's label maps (dataset values) at the image's size: the argmax over
        all classes, and (a model with background) the argmax over the object classes."""
        from train.maskformer.model import semantic_scores

        image = np.asarray(Image.open(image_path).convert("RGB"))
        scores = semantic_scores(self.model, self.processor, image, self.crop)  # (K, H, W)
        pred = self.to_values[scores.argmax(dim=0).numpy()]
        if not self.background:
            return pred, None
        return pred, self.to_values[1 + scores[1:].argmax(dim=0).numpy()]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = {"item": [], "counts": []}
        for item in batch["item"]:
            gt, image_path = ground_truth(self.dataset, self.root, str(item), self.coco)
            objects = None
            if self.model is not None:
                pred, objects = self.predict(image_path)
            else:
                pred = read_prediction(os.path.join(self.predictions, f"{item}.png"))
            if pred.shape != gt.shape:
                raise ValueError(f"prediction for {item} is {pred.shape[::-1]} pixels, the "
                                 f"image {gt.shape[::-1]}")
            rows["item"].append(str(item))
            rows["counts"].append(json.dumps(self.scorer.counts(pred, gt, objects)))
        return {k: np.asarray(v, dtype=object) for k, v in rows.items()}


def check_inputs(voc: str | None, coco: str | None, checkpoint: str | None,
                 predictions: str | None, fold: str | None) -> tuple[str, str, str, list[str]]:
    """(dataset, root, fold, image ids); FactoryError for every bad input."""
    if (voc is None) == (coco is None):
        raise FactoryError("give one of --voc or --coco")
    if (checkpoint is None) == (predictions is None):
        raise FactoryError("give one of --checkpoint or --predictions")
    dataset, root = ("voc", voc) if voc else ("coco", coco)
    fold = fold or ("zs3" if dataset == "voc" else "zs65")
    try:
        protocol2_split(dataset, fold)
        items = voc_items(root) if dataset == "voc" else coco_items(root)
    except (ValueError, OSError) as e:
        raise FactoryError(str(e)) from None
    if checkpoint is not None:
        from train.maskformer.job import latest_checkpoint, read_info

        folder = latest_checkpoint(checkpoint) if os.path.isdir(checkpoint) else None
        if folder is None:
            raise FactoryError(f"no MaskFormer checkpoint in {checkpoint!r}")
        info = read_info(folder)
        want = "pascal" if dataset == "voc" else "coco"
        trained = info.get("fold")
        if trained is None:
            raise FactoryError(f"{checkpoint!r} was trained without a zero-shot fold (every "
                               "class seen): it cannot be scored zero-shot")
        fits = info.get("split") == want and (trained == fold
                                              or (dataset == "coco" and trained == "1"))
        if not fits:
            raise FactoryError(f"{checkpoint!r} was trained for {info.get('split')} fold "
                               f"{trained}, not {dataset.upper()} fold {fold}")
    else:
        if not os.path.isdir(predictions):
            raise FactoryError(f"--predictions {predictions!r} is not a folder")
        missing = [i for i in items if not os.path.isfile(os.path.join(predictions, i + ".png"))]
        if missing:
            shown = ", ".join(missing[:MISSING_SHOWN])
            extra = len(missing) - MISSING_SHOWN
            more = f" and {extra} more" if extra > 0 else ""
            raise FactoryError(f"{len(missing)} of {len(items)} predictions missing from "
                               f"{predictions!r}: {shown}{more}")
    return dataset, root, fold, items


def evaluate(voc: str | None = None, coco: str | None = None, *, checkpoint: str | None = None,
             predictions: str | None = None, fold: str | None = None, batch_size: int = 16,
             device: str | None = None, address: str | None = None,
             ray_log: str | None = None) -> dict:
    """Score the segmenter on the val images; returns the report. A checkpoint's model runs on
    `device` (default: CUDA where the cluster has, or its autoscaler may add, a GPU). Ray's own
    output goes to the file `ray_log` (default: a new temporary file, named in the log)."""
    import ray

    from factory.console import ray_logs_to
    from factory.pools import ClusterView, connect_ray

    if batch_size <= 0:
        raise FactoryError(f"batch size must be > 0, got {batch_size}")
    dataset, root, fold, items = check_inputs(voc, coco, checkpoint, predictions, fold)
    if checkpoint:
        try:
            check_cuda_here(device, address)
        except ValueError as e:
            raise FactoryError(str(e)) from None
    seen, unseen = protocol2_split(dataset, fold)
    if ray_log is None:
        ray_log = tempfile.mkstemp(prefix="protocol2-", suffix=".log")[1]
    log.info("Ray's log: %s", ray_log)
    n = len(CLASS_LISTS["pascal" if dataset == "voc" else "coco"].names)
    totals: dict[str, IoUAccumulator] = {}
    with ray_logs_to(ray_log):
        connect_ray(address)
        if device is None:  # a cold cluster has no GPU yet: go by what it may launch
            device = "cuda" if checkpoint and ClusterView.current().max_gpus >= 1 else "cpu"
        gpu = 1 if checkpoint and device == "cuda" else 0
        ds = ray.data.from_items([{"item": i} for i in items]).map_batches(
            ScoreImages, batch_size=batch_size, num_cpus=0.25, num_gpus=gpu, concurrency=1,
            fn_constructor_kwargs=dict(dataset=dataset, root=root, checkpoint=checkpoint,
                                       predictions=predictions, device=device))
        for row in ds.iter_rows():
            for conv, (inter, union) in json.loads(row["counts"]).items():
                acc = totals.setdefault(conv, IoUAccumulator(n, include_background=True))
                acc.intersection += np.asarray(inter)
                acc.union += np.asarray(union)
    report = {"dataset": dataset, "root": os.path.abspath(root), "fold": fold,
              "images": len(items), "seen": seen, "unseen": unseen,
              "checkpoint": checkpoint, "predictions": predictions,
              "conventions": summarise(totals, dataset, seen, unseen)}
    report["markdown"] = markdown(report)
    return report


PAPER_TABLE2 = {"voc": [("A (paper, one object a prompt)", 62.8, 50.0, 55.7),
                        ("B (paper, two objects a prompt)", 65.8, 60.1, 62.8),
                        ("C (paper, the mixture)", 69.5, 63.2, 66.2),
                        ("D (paper, real seen-class images + C)", 83.0, 71.3, 76.7),
                        ("ZegFormer (paper's table)", 86.4, 63.6, 73.3)],
                "coco": [("C (paper, the mixture)", 38.3, 38.1, 38.2),
                         ("ZegFormer (paper's table)", 53.3, 34.5, 41.9)]}
CONVENTIONS = {"voc20": "VOC, 20 classes, background ignored, argmax over the 20 object classes "
                        "(ZegFormer's way: comparable with its row)",
               "voc20_argmax21": "VOC, 20 classes, background ignored, argmax over all 21 (a "
                                 "background prediction on an object is a miss)",
               "voc21": "VOC, 21 classes with background (counted as seen)",
               "coco80": "COCO, 80 thing classes, no-thing pixels ignored, 15 unseen (zs65)",
               "coco80_sim14": "COCO, as above, 14 unseen: COCO-sim's (mouse left out)"}
PREDICTIONS_VOC20 = "VOC, 20 classes, background ignored (the label maps as given)"


def markdown(report: dict) -> str:
    lines = ["| convention | seen | unseen | harmonic |", "| --- | --- | --- | --- |"]
    for conv, r in report["conventions"].items():
        name = (PREDICTIONS_VOC20 if conv == "voc20" and report.get("predictions")
                else CONVENTIONS[conv])
        lines.append(f"| {name} | {r['seen']:.1f} | {r['unseen']:.1f} | {r['harmonic']:.1f} |")
    for name, s, u, h in PAPER_TABLE2[report["dataset"]]:
        lines.append(f"| {name} | {s} | {u} | {h} |")
    per_class = {conv: r["per_class"] for conv, r in report["conventions"].items()
                 if "per_class" in r}
    lines += ["", "| class | " + " | ".join(per_class) + " |",
              "| --- |" + " --- |" * len(per_class)]
    for c in sorted(set().union(*per_class.values())):
        mark = " (unseen)" if c in report["unseen"] else ""
        cells = [f"{r[c]:.1f}" if c in r else "-" for r in per_class.values()]
        lines.append(f"| {c}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict, out: str) -> tuple[str, str]:
    """The report as JSON at `out` and Markdown beside it (same name, .md)."""
    md = os.path.splitext(out)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=2,
                  default=lambda v: None)
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# Protocol II: {report['dataset'].upper()} fold {report['fold']}, "
                f"{report['images']} val images, mIoU (%)\n\n{report['markdown']}\n\nRows "
                "marked (paper) are the paper's Table 2, not measured here.\n")
    return out, md


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--voc", default=None, help="VOC folder (VOCdevkit/VOC2012): its 1,449 val images.")
@click.option("--coco", default=None, help="COCO root (annotations/, val2017/): 5,000 images.")
@click.option("--checkpoint", default=None, help="MaskFormer checkpoint or training --out.")
@click.option("--predictions", default=None,
              help="Folder of PNG label maps named after the image ids, instead of a checkpoint.")
@click.option("--fold", default=None, help="VOC: zs3 | 1 | 2 | 3 [zs3]; COCO: zs65 [zs65].")
@click.option("--out", default=None, help="Report JSON (and .md beside it) [default: print].")
@click.option("--batch-size", type=int, default=16)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the checkpoint's model runs [default: cuda where the cluster has, or "
                   "may add, a GPU; else cpu].")
@click.option("--address", default=None, help="Ray cluster [default: start a local Ray].")
def cli(out: str | None, **kwargs) -> None:
    """Protocol II: zero-shot semantic segmentation of real VOC or COCO images."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = evaluate(**kwargs, ray_log=os.path.splitext(out)[0] + ".log" if out else None)
    click.echo(f"Protocol II, {report['dataset'].upper()} fold {report['fold']}: "
               f"{report['images']} val images, mIoU (%)")
    click.echo(report["markdown"])
    if out:
        click.echo("report: " + ", ".join(write_report(report, out)))


def main(argv: list[str] | None = None) -> None:
    from factory.command import run_command

    run_command(cli, argv, prog_name="python -m eval.protocol2")


if __name__ == "__main__":
    main()
