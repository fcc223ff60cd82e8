"""Training data for MaskFormer: `factory label` folders and VOC-layout folders, mapped to one
class list, streamed in a fixed order that a resumed job continues, and augmented on CPU.

Class lists (`SegmentationClasses`): `pascal`, the 20 VOC classes plus background (21 training
ids, background 0, as VOC's own label maps); `coco`, COCO's 80 thing classes (ids 0-79 in COCO's
order, pixels of no thing ignored). A label folder of split `coco` lacks `mouse` (COCO-sim drops
it), which is no problem for training. Real VOC folders join with their unseen-class pixels set
to 255, so their images still count (model D's "real 15"). A VOC folder reads the images its
list names (`--voc-train-list`, default its ImageSets/Segmentation/train.txt: 1,464 images; the
ZS3 convention trains on the 10,582 of the SBD-augmented list), each label from
SegmentationClass, or SegmentationClassAug where SegmentationClass lacks it. Every run has a
fold: that of its label folders, or `--fold` for VOC folders alone.

The stream (`train.stream`): epoch e visits the sources' shards (and VOC images, in groups of
256) in an order shuffled with (seed, e), and each shard's rows in a shuffled order; item p of
the stream is a pure function of (sources, seed, p), and so is its augmentation (random resized
crop, flip). A job resumed at step s continues at item s x global batch.

Loading (`plan_units`, `skip_units`, `load_units`): a worker's items are cut into units, the
runs of consecutive items from one shard (or one block of VOC images); a unit reads its shard
once, so a worker reads each shard once per pass over the data. A worker restarted at step k
drops its first k batches' items from the units before anything is read or decoded.
"""

from __future__ import annotations

import json
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
    """One --data folder: a `factory label` output, or a VOC-layout folder (a list's images)."""

    path: str
    kind: str  # "label" | "voc"
    split: str  # pascal | coco
    fold: str | None
    groups: tuple[tuple, ...]  # label: (shard path, rows); voc: (image ids...)
    lut: tuple[int, ...]
    augmented: frozenset[str] = frozenset()  # voc: ids whose label is in SegmentationClassAug


VOC_LABELS, VOC_LABELS_AUG = "SegmentationClass", "SegmentationClassAug"
VOC_TRAIN_LIST = os.path.join("ImageSets", "Segmentation", "train.txt")
MISSING_SHOWN = 5
TASK_ITEMS = 64  # items a Ray Data task decodes (at least, whole units)


def open_source(path: str, fold_of_voc: str | None = None, allow_partial: bool = False,
                voc_list: str | None = None) -> Source:
    """A --data folder (ValueError says what is wrong). VOC folders need the fold whose
    unseen classes to hide (`fold_of_voc`) and read the images of `voc_list` (a file; default
    their ImageSets/Segmentation/train.txt). A label folder whose run is unfinished is refused
    unless `allow_partial` (then its finished shards)."""
    if os.path.isfile(os.path.join(path, "manifest.json")) or "://" in path:
        store = ShardStore.open(path)
        run = store.manifest["run"]
        if run.get("kind") != "segmentation":
            raise ValueError(f"{path!r} holds {run.get('kind')!r}, not `factory label` output")
        if run["split"] not in CLASS_LISTS:
            raise ValueError(f"{path!r} is an open-vocabulary set ({run['split']!r}): "
                             "MaskFormer trains on the pascal or coco classes")
        done = store.check_finished(allow_partial, "factory label")
        groups = tuple((store.shard_path(k), tuple(range(store.records[k]["rows"])))
                       for k in done)
        lut = CLASS_LISTS[run["split"]].lut()
        return Source(path, "label", run["split"], run["fold"], groups, tuple(lut))
    lists = voc_list or os.path.join(path, VOC_TRAIN_LIST)
    for need in (lists, os.path.join(path, "JPEGImages"), os.path.join(path, VOC_LABELS)):
        if not os.path.exists(need):
            raise ValueError(f"{path!r} is neither `factory label` output nor a VOC folder "
                             f"(no {os.path.relpath(need, path)})")
    with open(lists, encoding="utf-8") as f:
        # plain ids, or DeepLab's "/JPEGImages/ID.jpg /SegmentationClassAug/ID.png" lines
        ids = [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f
               if line.strip()]
    if not ids:
        raise ValueError(f"{lists!r} lists no image")
    augmented, missing = set(), []
    for i in ids:
        if not os.path.isfile(os.path.join(path, "JPEGImages", i + ".jpg")):
            missing.append(f"JPEGImages/{i}.jpg")
        elif not os.path.isfile(os.path.join(path, VOC_LABELS, i + ".png")):
            if os.path.isfile(os.path.join(path, VOC_LABELS_AUG, i + ".png")):
                augmented.add(i)
            else:
                missing.append(f"{VOC_LABELS}[Aug]/{i}.png")
    if missing:
        more = len(missing) - MISSING_SHOWN
        raise ValueError(f"{len(missing)} of the {len(ids)} images {lists!r} lists are missing "
                         f"from {path!r}: {', '.join(missing[:MISSING_SHOWN])}"
                         + (f" and {more} more" if more > 0 else ""))
    unseen = get_split("pascal", fold_of_voc).unseen if fold_of_voc else ()
    groups = tuple(tuple(ids[i:i + VOC_GROUP]) for i in range(0, len(ids), VOC_GROUP))
    return Source(path, "voc", "pascal", fold_of_voc, groups,
                  tuple(CLASS_LISTS["pascal"].lut(unseen)), frozenset(augmented))


def open_sources(paths: list[str], allow_partial: bool = False, fold: str | None = None,
                 voc_list: str | None = None
                 ) -> tuple[list[Source], SegmentationClasses, str]:
    """The --data folders, their one class list and fold (ValueError if they disagree). The
    fold is the label folders'; VOC folders alone take `fold`, which they need: a run without
    a fold would hide no class, and its model could not be scored zero-shot."""
    labels = [open_source(p, allow_partial=allow_partial) for p in paths if not is_voc(p)]
    folds = {(s.split, s.fold) for s in labels}
    if len(folds) > 1:
        raise ValueError("--data folders of different splits or folds: "
                         + ", ".join(f"{s.path} ({s.split} fold {s.fold})" for s in labels))
    if folds:
        split, found = next(iter(folds))
        if found is None:
            raise ValueError(f"{labels[0].path!r} was labelled without a fold: MaskFormer "
                             "trains for a zero-shot fold")
        if fold is not None and fold != found:
            raise ValueError(f"--fold {fold} differs from the --data folders' fold {found}")
        fold = found
    else:
        split = "pascal"
        if fold is None:
            raise ValueError("VOC folders alone need --fold (zs3, 1, 2 or 3): its unseen "
                             "classes are hidden in training, so the model can be scored "
                             "zero-shot")
        get_split("pascal", fold)  # ValueError for an unknown fold
    if any(is_voc(p) for p in paths) and split != "pascal":
        raise ValueError("VOC folders join pascal label folders only")
    if voc_list is not None and not os.path.isfile(voc_list):
        raise ValueError(f"--voc-train-list {voc_list!r} is not a file")
    sources = [open_source(p, fold, voc_list=voc_list) if is_voc(p)
               else open_source(p, allow_partial=allow_partial) for p in paths]
    return sources, CLASS_LISTS[split], fold


def is_voc(path: str) -> bool:
    """Whether a --data folder is VOC-layout (else `factory label` output)."""
    return os.path.isdir(os.path.join(path, "ImageSets", "Segmentation"))


def stream(sources: list[Source], seed: int, start: int, count: int) -> list[dict]:
    """Items start .. start + count - 1 of the sources' stream (`train.stream`), as rows:
    position, source, group, member (a shard's row or a VOC image id, as text)."""
    flat = [(s, g) for s, src in enumerate(sources) for g in range(len(src.groups))]
    members = [sources[s].groups[g][1] if sources[s].kind == "label" else sources[s].groups[g]
               for s, g in flat]
    return [{"position": r["position"], "source": flat[r["group"]][0],
             "group": flat[r["group"]][1], "member": str(r["member"])}
            for r in stream_items(members, seed, start, count)]


def plan_units(items: list[dict]) -> list[dict]:
    """A worker's items (`stream` rows, in order) cut into units: runs of consecutive items of
    one source group, {"source", "group", "members", "positions"}. The stream visits a group's
    members one after the other, so a pass over the data has one unit per group."""
    units: list[dict] = []
    for it in items:
        if not units or (units[-1]["source"], units[-1]["group"]) != (it["source"], it["group"]):
            units.append({"source": int(it["source"]), "group": int(it["group"]),
                          "members": [], "positions": []})
        units[-1]["members"].append(str(it["member"]))
        units[-1]["positions"].append(int(it["position"]))
    return units


def skip_units(units: list[dict], n: int) -> list[dict]:
    """`units` without their first `n` items (a restarted worker's batches done), unread."""
    out = []
    for u in units:
        if n >= len(u["members"]):
            n -= len(u["members"])
            continue
        out.append({**u, "members": u["members"][n:], "positions": u["positions"][n:]})
        n = 0
    return out


def encode_units(units: list[dict], items: int = TASK_ITEMS) -> list[dict]:
    """Units as Ray Data rows, {"units": JSON list}: consecutive units packed until a row holds
    `items` items (a task's worth of decoding), a unit never split."""
    rows, pack, n = [], [], 0
    for u in units:
        pack.append(u)
        n += len(u["members"])
        if n >= items:
            rows.append({"units": json.dumps(pack)})
            pack, n = [], 0
    if pack:
        rows.append({"units": json.dumps(pack)})
    return rows


def decode_units(rows) -> list[dict]:
    """The units of `encode_units` rows (dicts, or Ray Data rows), in order."""
    return [u for row in rows for u in json.loads(row["units"])]


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


def read_unit(src: Source, unit: dict):
    """(image, label value map) of each member of a unit, in order: a shard is read once."""
    group = src.groups[unit["group"]]
    if src.kind == "label":
        rows = pq.read_table(group[0], columns=["image", "label"]).take(
            [int(m) for m in unit["members"]]).to_pydict()
        for image, label in zip(rows["image"], rows["label"], strict=True):
            yield decode_png(image), decode_label(label)
        return
    for member in unit["members"]:
        folder = VOC_LABELS_AUG if member in src.augmented else VOC_LABELS
        image = Image.open(os.path.join(src.path, "JPEGImages", member + ".jpg"))
        yield (np.asarray(image.convert("RGB")),
               np.asarray(Image.open(os.path.join(src.path, folder, member + ".png"))))


def load_units(batch: dict[str, np.ndarray], *, sources: list[Source], seed: int,
               size: int) -> dict[str, np.ndarray]:
    """`encode_units` rows -> one row per item: position, image (N, size, size, 3) uint8 and
    label (N, size, size) uint8 training ids, each item's augmentation seeded by (seed,
    position)."""
    units = decode_units({"units": u} for u in batch["units"])
    n = sum(len(u["members"]) for u in units)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, size, size), dtype=np.uint8)
    positions = np.empty(n, dtype=np.int64)
    i = 0
    for unit in units:
        src = sources[unit["source"]]
        lut = np.asarray(src.lut, dtype=np.uint8)
        for position, (image, label) in zip(unit["positions"], read_unit(src, unit),
                                            strict=True):
            rng = np.random.default_rng([seed, position])
            images[i], labels[i] = random_resized_crop(image, lut[label], size, rng)
            positions[i] = position
            i += 1
    return {"position": positions, "image": images, "label": labels}
