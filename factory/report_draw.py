"""The gallery's pictures for `factory report`: each picked sample's image as a WebP and each of
its masks as a palette PNG tinted in its class colour, scaled down, and its gallery entry."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from factory.schema import decode_png
from factory.show import ALPHA, class_colour, fit, overlay_layers
from factory.stats import Stats
from factory.store import ShardStore

PICTURE = 384  # px: pictures are scaled down to this longer side (tiles show them smaller)
WEBP_QUALITY = 80


def class_colours(store: ShardStore, stats: Stats) -> dict[str, tuple[int, int, int]]:
    """Class colours by the class's place in the folder's categories (the same on every page
    of the folder); a class the data names beyond them comes after."""
    names = [c["name"] for c in store.categories]
    names += sorted(set(stats.per_class) - set(names))
    return {n: class_colour(i) for i, n in enumerate(names)}


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def draw(row: dict, colours: dict, files: str, href: str, shard: str) -> dict:
    """Write a sample's pictures (the image as WebP, each overlay layer as a palette PNG in its
    colour at show's ALPHA, scaled down to PICTURE px at most) and return its gallery entry."""
    image = Image.fromarray(decode_png(row["image"]))
    size = min(PICTURE, max(image.size))
    if size < max(image.size):
        image = fit(image, size, Image.Resampling.BILINEAR)
    stem = f"{row['index']:09d}"
    image.save(os.path.join(files, stem + ".webp"), format="WEBP", quality=WEBP_QUALITY)
    layers = []
    n = len(row["classes"])
    for j, (mask, colour) in enumerate(overlay_layers(row, colours)):  # classes, then ignore
        name = f"{stem}-{j}" if j < n else f"{stem}-ignore"
        small = fit(Image.fromarray(mask), size, Image.Resampling.NEAREST)
        layer = Image.frombytes("P", small.size, np.asarray(small, dtype=np.uint8).tobytes())
        layer.putpalette([0, 0, 0, *colour])
        layer.save(os.path.join(files, name + ".png"), format="PNG", optimize=True,
                   transparency=bytes([0, round(255 * ALPHA)]))
        layers.append(f"{href}/{name}.png")
    h, w = row["height"], row["width"]
    value = row["quality"] if "quality" in row else (sum(row["scores"]) / n if n else 0.0)
    return {"index": row["index"], "file": shard, "prompt": row["prompt"],
            "classes": row["classes"], "scores": [round(s, 4) for s in row["scores"]],
            "areas": [round(a / (h * w), 4) for a in row["areas"]], "value": round(value, 4),
            "img": f"{href}/{stem}.webp", "masks": layers[:n],
            "ignore": layers[n] if len(layers) > n else None}
