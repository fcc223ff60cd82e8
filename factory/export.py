"""`factory export`: an output folder in the layouts that training code reads unchanged.

- coco: `annotations.json` (one annotation per image and class with a non-empty mask, its mask
  a compressed RLE) and `images/<index>.png`, for pycocotools, detectron2 (set
  INPUT.MASK_FORMAT=bitmask: the masks are RLE, not polygons) and HF datasets;
- voc: a VOC2012-style folder (JPEGImages, SegmentationClass palette PNGs with 255 = ignore,
  ImageSets/Segmentation/train.txt) for torchvision's VOCSegmentation and mmseg, plus
  `categories.json`, since an open vocabulary's ids are not VOC's;
- parquet: a copy of the folder itself (manifest and finished shards).

An export is written into a hidden temporary folder beside `out` and renamed into place at the
end, so `out` exists only when complete. Shards are read in small batches: images never all sit
in memory (the COCO annotation list does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from factory.schema import IGNORE, decode_label, decode_masks, decode_png
from factory.store import DATA, MANIFEST, ShardStore
from factory.vocab import check_class_names

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("coco", "voc", "parquet")
JPEG_QUALITY = 95
READ_BATCH = 64  # rows decoded at a time: bounds memory whatever the shard size


class ExportError(ValueError):
    """An export that cannot be made as asked (format, destination, class ids)."""


@dataclass
class ExportResult:
    out: str
    fmt: str
    images: int
    annotations: int | None = None  # coco only: one per image and class with a non-empty mask


def export(root: str, fmt: str, out: str) -> ExportResult:
    """Write the factory folder `root` as `fmt` (one of EXPORT_FORMATS) to the new folder `out`
    (absent, or an empty folder). Raises StoreError if `root` is no factory folder, ExportError
    for a bad format, class names that `check_class_names` refuses (a hand-edited manifest), an
    occupied `out` or (voc) class ids outside 1..254."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of "
                          f"{', '.join(EXPORT_FORMATS)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out!r} exists and is not an empty folder")
    store = ShardStore.open(root)
    from actors.tokenizer import clip_tokenizer  # transformers: after the cheap checks

    try:
        check_class_names((c["name"] for c in store.categories), tokenizer=clip_tokenizer())
    except ValueError as e:
        raise ExportError(f"the manifest of {root!r} names classes badly: {e}") from None
    if fmt == "voc":
        _check_voc_ids(store.categories)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        images, annotations = _WRITERS[fmt](store, tmp)
        os.replace(tmp, out)  # replaces an empty folder at `out`
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return ExportResult(out, fmt, images, annotations)


def _rows(store: ShardStore, columns: list[str]) -> Iterator[dict]:
    """Rows of every finished shard in index order, a few at a time; logs each shard."""
    paths = store.shard_paths()
    for k, path in enumerate(paths):
        log.info("exporting shard %d/%d (%s)", k + 1, len(paths), os.path.basename(path))
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH, columns=columns):
            yield from batch.to_pylist()


def _name(index: int) -> str:
    return f"{index:08d}"


def _write_coco(store: ShardStore, tmp: str) -> tuple[int, int | None]:
    from pycocotools import mask as mask_utils

    os.makedirs(os.path.join(tmp, "images"))
    images, annotations = [], []
    columns = ["index", "image", "height", "width", "class_ids", "masks"]
    for row in _rows(store, columns):
        file_name = f"{_name(row['index'])}.png"
        with open(os.path.join(tmp, "images", file_name), "wb") as f:
            f.write(row["image"])  # the stored PNG, as is
        images.append({"id": row["index"], "file_name": file_name, "height": row["height"],
                       "width": row["width"]})
        for class_id, m in zip(row["class_ids"], row["masks"], strict=True):
            rle = {"size": [int(s) for s in m["size"]], "counts": m["counts"]}
            area = int(mask_utils.area(rle))
            if area == 0:
                continue
            annotations.append({
                "id": len(annotations) + 1,  # COCOeval reads annotation id 0 as "no match"
                "image_id": row["index"], "category_id": class_id,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"factory {store.kind} export", "source": os.path.abspath(
            store.root), "kind": store.kind, "image_root": "images"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c["id"], "name": c["name"]} for c in store.categories],
    }
    with open(os.path.join(tmp, "annotations.json"), "w", encoding="utf-8") as f:
        json.dump(coco, f)
    return len(images), len(annotations)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (its devkit's `labelcolormap`): (n, 3) uint8, id -> RGB, the
    bits of the id spread over the high bits of the three channels."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


def _check_voc_ids(categories: list[dict]) -> None:
    bad = [f"{c['name']}={c['id']}" for c in categories if not 0 < c["id"] < IGNORE]
    if bad:
        raise ExportError(f"VOC label maps hold class ids 1..{IGNORE - 1} (0 is background, "
                          f"{IGNORE} ignore); these classes do not fit: {', '.join(bad)}")


def triplet_label_map(masks: np.ndarray, class_ids: list[int], scores: list[float]
                      ) -> np.ndarray:
    """masks: (K, H, W) bool. Returns the (H, W) uint8 label map: a pixel of one class mask takes
    its id, one of several masks the id of the highest-scored class (the first listed on a
    tie), any other pixel 0 (background)."""
    label = np.zeros(masks.shape[1:], dtype=np.uint8)                       # (H, W)
    for k in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        label[masks[k] & (label == 0)] = class_ids[k]
    return label


def _write_voc(store: ShardStore, tmp: str) -> tuple[int, int | None]:
    for d in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(tmp, d))
    palette = voc_colormap().tobytes()
    columns = ["index", "image", "height", "width", "class_ids", "masks", "scores"]
    if store.kind == "segmentation":
        columns.append("label")
    names = []
    for row in _rows(store, columns):
        name = _name(row["index"])
        Image.fromarray(decode_png(row["image"])).save(
            os.path.join(tmp, "JPEGImages", f"{name}.jpg"), quality=JPEG_QUALITY)
        if store.kind == "segmentation":
            label = decode_label(row["label"])
        else:
            masks = decode_masks(row["masks"], row["height"], row["width"])  # (K, H, W)
            label = triplet_label_map(masks, row["class_ids"], row["scores"])
        png = Image.frombytes("P", label.shape[::-1], label.tobytes())    # ids as indices
        png.putpalette(palette)
        png.save(os.path.join(tmp, "SegmentationClass", f"{name}.png"))
        names.append(name)
    with open(os.path.join(tmp, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.writelines(f"{n}\n" for n in names)
    with open(os.path.join(tmp, "categories.json"), "w", encoding="utf-8") as f:
        json.dump([{"id": c["id"], "name": c["name"]} for c in store.categories], f, indent=1)
    return len(names), None


def _write_parquet(store: ShardStore, tmp: str) -> tuple[int, int | None]:
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(store.manifest, f, indent=2)  # with the records written since compaction
    os.makedirs(os.path.join(tmp, DATA))
    paths = store.shard_paths()
    rows = 0
    for k, path in enumerate(paths):
        log.info("copying shard %d/%d (%s)", k + 1, len(paths), os.path.basename(path))
        shutil.copy2(path, os.path.join(tmp, DATA, os.path.basename(path)))
        rows += pq.ParquetFile(path).metadata.num_rows
    return rows, None


_WRITERS = {"coco": _write_coco, "voc": _write_voc, "parquet": _write_parquet}
