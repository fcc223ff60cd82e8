"""Training data for MaskFormer: `factory label` folders and VOC-layout folders, mapped to one
class list, streamed in a fixed order that a resumed job continues, and augmented on CPU.

Class lists (`SegmentationClasses`): `pascal`, the 20 VOC classes plus background (21 training
ids, background 0, as VOC's own label maps); `coco`, COCO's 80 thing classes (ids 0-79 in COCO's
order, pixels of no thing ignored). A label folder of split `coco` lacks `mouse` (COCO-sim drops
it), which is no problem for training. Real VOC folders join with their unseen-class pixels set
to 255, so their images still count (model D's "real 15").

The stream (`train.stream`): epoch e visits the sources' shards (and VOC images, in groups of
256) in an order shuffled with (seed, e), and each shard's rows in a shuffled order; item p of
the stream is a pure function of (sources, seed, p), and so is its augmentation (random resized
crop, flip). A job resumed at step s continues at item s x global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from factory.schema import IGNORE, decode_label, decode_png
from factory.store import ShardStore
from factory.vocab import COCO_CATEGORIES, VOC_CLASSES, get_split
from train.stream import stream as stream_items

VOC_GROUP = 256  # VOC images shuffled as one block, like a shard


@dataclass(frozen=True)
class SegmentationClasses:
    """A training class list and the map from a source's label values to its ids."""

    name: str
    names: tuple[str, ...]
    label_values: tuple[int, ...]  # the label-map value of each training id
    background: bool  # whether label value 0 (background) is a class (id 0) or ignored

    def lut(self, unseen: tuple[str, ...] = ()) -> np.ndarray:
        """(256,) uint8: label value -> training id; background, unknown values and the
        `unseen` classes' pixels -> IGNORE."""
        lut = np.full(256, IGNORE, dtype=np.uint8)
        for i, (name, value) in enumerate(zip(self.names, self.label_values, strict=True)):
            if name not in unseen:
                lut[value] = i
        return lut


CLASS_LISTS = {
    "pascal": SegmentationClasses("pascal", ("background", *VOC_CLASSES),
                                  tuple(range(len(VOC_CLASSES) + 1)), background=True),
    "coco": SegmentationClasses("coco", tuple(COCO_CATEGORIES.values()),
                                tuple(COCO_CATEGORIES), background=False),
}


@dataclass(frozen=True)
class Source:
    """One --data folder: a `factory label` output, or a VOC-layout folder (train list)."""

    path: str
    kind: str  # "label" | "voc"
    split: str  # pascal | coco
    fold: str | None
    groups: tuple[tuple, ...]  # label: (shard path, rows); voc: (image ids...)
    lut: tuple[int, ...]


def open_source(path: str, fold_of_voc: str | None = None, allow_partial: bool = False
                ) -> Source:
    """A --data folder (ValueError says what is wrong). VOC folders need the fold whose
    unseen classes to hide (`fold_of_voc`, from the label folders beside it). A label folder
    whose run is unfinished is refused unless `allow_partial` (then its finished shards)."""
    if os.path.isfile(os.path.join(path, "manifest.json")) or "://" in path:
        store = ShardStore.open(path)
        run = store.manifest["run"]
        if run.get("kind") != "segmentation":
            raise ValueError(f"{path!r} holds {run.get('kind')!r}, not `factory label` output")
        if run["split"] not in CLASS_LISTS:
            raise ValueError(f"{path!r} is an open-vocabulary set ({run['split']!r}): "
                             "MaskFormer trains on the pascal or coco classes")
        done = store.finished(allow_partial, "factory label")
        groups = tuple((store.shard_path(k), tuple(range(store.shards[k]["rows"])))
                       for k in done)
        lut = CLASS_LISTS[run["split"]].lut()
        return Source(path, "label", run["split"], run["fold"], groups, tuple(lut))
    lists = os.path.join(path, "ImageSets", "Segmentation", "train.txt")
    for need in (lists, os.path.join(path, "JPEGImages"),
                 os.path.join(path, "SegmentationClass")):
        if not os.path.exists(need):
            raise ValueError(f"{path!r} is neither `factory label` output nor a VOC folder "
                             f"(no {os.path.relpath(need, path)})")
    with open(lists, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError(f"{lists!r} lists no image")
    unseen = get_split("pascal", fold_of_voc).unseen if fold_of_voc else ()
    groups = tuple(tuple(ids[i:i + VOC_GROUP]) for i in range(0, len(ids), VOC_GROUP))
    return Source(path, "voc", "pascal", fold_of_voc, groups,
                  tuple(CLASS_LISTS["pascal"].lut(unseen)))


def open_sources(paths: list[str], allow_partial: bool = False
                 ) -> tuple[list[Source], SegmentationClasses, str | None]:
    """The --data folders, their one class list and fold (ValueError if they disagree)."""
    labels = [open_source(p, allow_partial=allow_partial) for p in paths if not _is_voc(p)]
    folds = {(s.split, s.fold) for s in labels}
    if len(folds) > 1:
        raise ValueError("--data folders of different splits or folds: "
                         + ", ".join(f"{s.path} ({s.split} fold {s.fold})" for s in labels))
    split, fold = next(iter(folds)) if folds else ("pascal", None)
    if any(_is_voc(p) for p in paths) and split != "pascal":
        raise ValueError("VOC folders join pascal label folders only")
    sources = [open_source(p, fold) if _is_voc(p) else open_source(p, allow_partial=allow_partial)
               for p in paths]
    return sources, CLASS_LISTS[split], fold


def _is_voc(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "ImageSets", "Segmentation"))


def stream(sources: list[Source], seed: int, start: int, count: int) -> list[dict]:
    """Items start .. start + count - 1 of the sources' stream (`train.stream`), as rows for
    Ray Data: position, source, group, member (a shard's row or a VOC image id, as text)."""
    flat = [(s, g) for s, src in enumerate(sources) for g in range(len(src.groups))]
    members = [sources[s].groups[g][1] if sources[s].kind == "label" else sources[s].groups[g]
               for s, g in flat]
    return [{"position": r["position"], "source": flat[r["group"]][0],
             "group": flat[r["group"]][1], "member": str(r["member"])}
            for r in stream_items(members, seed, start, count)]


def random_resized_crop(image: np.ndarray, label: np.ndarray, size: int,
                        rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A crop of random area and aspect, resized to size x size (bilinear image, nearest
    label), flipped half the time: torchvision's RandomResizedCrop, with a given RNG."""
    h, w = label.shape
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    box = (x, y, x + cw, y + ch)
    img = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
    lab = np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST, box=box))
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def load_batch(batch: dict[str, np.ndarray], *, sources: list[Source], seed: int,
               size: int) -> dict[str, np.ndarray]:
    """Stream rows -> image (B, size, size, 3) uint8 and label (B, size, size) uint8 training
    ids, with each item's augmentation seeded by (seed, position). Each shard is read once
    per batch."""
    n = len(batch["position"])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, size, size), dtype=np.uint8)
    tables: dict[tuple[int, int], dict] = {}
    for i in range(n):
        src = sources[int(batch["source"][i])]
        group, member = int(batch["group"][i]), str(batch["member"][i])
        if src.kind == "label":
            key = (int(batch["source"][i]), group)
            if key not in tables:
                t = pq.read_table(src.groups[group][0], columns=["image", "label"])
                tables[key] = t.to_pydict()
            row = tables[key]
            image, label = decode_png(row["image"][int(member)]), decode_label(
                row["label"][int(member)])
        else:
            image = np.asarray(Image.open(os.path.join(src.path, "JPEGImages",
                                                       member + ".jpg")).convert("RGB"))
            label = np.asarray(Image.open(os.path.join(src.path, "SegmentationClass",
                                                       member + ".png")))
        label = np.asarray(src.lut, dtype=np.uint8)[label]
        rng = np.random.default_rng([seed, int(batch["position"][i])])
        images[i], labels[i] = random_resized_crop(image, label, size, rng)
    return {"position": np.asarray(batch["position"], dtype=np.int64), "image": images,
            "label": labels}
