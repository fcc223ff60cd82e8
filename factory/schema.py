"""The record store's schemas, one row per generated sample:

- `TRIPLET_SCHEMA` (`factory generate`): a triplet of the paper (image, oracle masks, prompt),
  plus what it takes to recompute its features and to reproduce it;
- `SEGMENTATION_SCHEMA` (`factory label`): the same image and latent with the grounding head's
  masks and a semantic label map.

Images are PNG bytes, masks COCO RLE (pycocotools), the latent raw bytes with its shape and
dtype: plain Parquet types, so pandas, Ray Data, DuckDB and HF datasets read shards unchanged.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

SCHEMA_VERSION = 1

RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.binary())])  # COCO RLE, [h, w]

TRIPLET_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),            # sample index in its run: with the run, defines it
        ("split", pa.string()),           # pascal | coco
        ("fold", pa.string()),            # 1 | 2 | 3 | zs3
        ("subset", pa.string()),          # train | test
        ("run_seed", pa.int64()),
        ("noise_seed", pa.int64()),       # seeds the initial latent noise
        ("prompt", pa.string()),
        ("classes", pa.list_(pa.string())),     # prompt class names, K = 1 or 2
        ("class_ids", pa.list_(pa.int32())),    # their ids in the split's vocabulary
        ("image", pa.binary()),           # PNG, RGB
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("masks", pa.list_(RLE)),         # oracle mask per class, aligned with classes
        ("scores", pa.list_(pa.float32())),     # best detector score per class, 0 if none
        ("areas", pa.list_(pa.int64())),  # mask pixels per class, 0 = empty mask
        ("x_t", pa.binary()),             # latent entering the feature step, C order
        ("x_t_shape", pa.list_(pa.int32())),    # (4, H/8, W/8)
        ("x_t_dtype", pa.string()),       # float16 (from a float16 UNet) or float32: exact
        ("t", pa.int32()),                # the feature step's timestep
        ("sd_model", pa.string()),
        ("detector", pa.string()),
    ],
    metadata={"schema_version": str(SCHEMA_VERSION), "kind": "triplet"},
)


IGNORE = 255  # label-map value of pixels left unlabelled on purpose (the uncertainty band)

SEGMENTATION_SCHEMA = pa.schema(
    [f for f in TRIPLET_SCHEMA if f.name != "detector"]
    + [
        pa.field("label", pa.binary()),     # PNG, (H, W) uint8: 0 background, class ids, 255 ignore
        pa.field("quality", pa.float32()),  # mean of `scores` over the prompt's classes
        pa.field("checkpoint", pa.string()),  # the grounding head's checkpoint folder
    ],
    metadata={"schema_version": str(SCHEMA_VERSION), "kind": "segmentation"},
)
# In segmentation rows, `masks` are the head's own mask of each class (its probability >= the
# threshold, so two classes' masks may overlap where the exclusive `label` map chose one),
# `scores` each class's mean predicted probability inside its mask (0 for an empty mask), and
# `subset` is "label".

SCHEMAS = {"triplets": TRIPLET_SCHEMA, "segmentation": SEGMENTATION_SCHEMA}  # by manifest kind


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB, or (H, W) uint8 grey (label maps) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_label(data: bytes) -> np.ndarray:
    """A label-map PNG -> (H, W) uint8 class ids."""
    return np.asarray(Image.open(io.BytesIO(data)))


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool -> K COCO RLE dicts {size: [H, W], counts: bytes}."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in rles]


def decode_masks(rles: list[dict], height: int, width: int) -> np.ndarray:
    """K COCO RLE dicts -> (K, H, W) bool (K may be 0)."""
    if not len(rles):
        return np.zeros((0, height, width), dtype=bool)
    rles = [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in rles]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)


def decode_latent(data: bytes, shape, dtype: str) -> np.ndarray:
    """Stored x_t -> (4, h, w) array of its stored dtype."""
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(tuple(int(s) for s in shape))


def decode_latents(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A batch's stored x_t, x_t_shape, x_t_dtype columns -> (B, 4, h, w) float32, what the
    feature extractor takes."""
    return np.stack([decode_latent(x, s, d).astype(np.float32) for x, s, d in
                     zip(batch["x_t"], batch["x_t_shape"], batch["x_t_dtype"], strict=True)])


def _sample_columns(batch: dict[str, np.ndarray], *, split: str, fold: str, subset: str,
                    run_seed: int, sd_model: str) -> dict[str, list]:
    """The columns both schemas share, from the SD generator's and a labeller's outputs."""
    images = batch["image"]                                                  # (B, H, W, 3)
    x_t = np.ascontiguousarray(batch["x_t"])                                 # (B, 4, h, w)
    if x_t.dtype not in (np.float16, np.float32):
        raise ValueError(f"x_t must be float16 or float32, got {x_t.dtype}")
    n, h, w = len(images), images.shape[1], images.shape[2]
    return {
        "index": batch["index"],
        "split": [split] * n,
        "fold": [fold] * n,
        "subset": [subset] * n,
        "run_seed": [run_seed] * n,
        "noise_seed": batch["noise_seed"],
        "prompt": [str(p) for p in batch["prompt"]],
        "classes": [[str(c) for c in v] for v in batch["classes"]],
        "class_ids": [[int(c) for c in v] for v in batch["class_ids"]],
        "image": [encode_png(im) for im in images],
        "height": [h] * n,
        "width": [w] * n,
        "masks": [[{"size": [int(s) for s in r["size"]], "counts": bytes(r["counts"])} for r in v]
                  for v in batch["masks"]],
        "scores": [[float(s) for s in v] for v in batch["scores"]],
        "areas": [[int(a) for a in v] for v in batch["areas"]],
        "x_t": [x.tobytes() for x in x_t],
        "x_t_shape": [list(x_t.shape[1:])] * n,
        "x_t_dtype": [x_t.dtype.name] * n,
        "t": batch["t"],
        "sd_model": [sd_model] * n,
    }


def _table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    return pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in columns.items()},
                    schema=schema)


def to_triplets(batch: dict[str, np.ndarray], *, detector: str, **run) -> pa.Table:
    """Stage outputs (the columns of SDGenerator and MaskRCNNLabeller) -> rows of the triplet
    schema. `run`: split, fold, subset, run_seed, sd_model."""
    columns = _sample_columns(batch, **run)
    return _table({**columns, "detector": [detector] * len(columns["index"])}, TRIPLET_SCHEMA)


def to_segmentation(batch: dict[str, np.ndarray], *, checkpoint: str, **run) -> pa.Table:
    """Stage outputs (the columns of SDGenerator and GroundingLabeller) -> rows of the
    segmentation schema. `run`: split, fold, subset, run_seed, sd_model."""
    columns = _sample_columns(batch, **run)
    n = len(columns["index"])
    return _table({**columns, "label": [encode_png(m) for m in batch["label"]],
                   "quality": batch["quality"], "checkpoint": [checkpoint] * n},
                  SEGMENTATION_SCHEMA)
