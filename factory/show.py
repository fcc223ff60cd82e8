"""`factory show`: a contact sheet of an output folder, to see at a glance whether the masks sit on
the objects the prompts name."""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from factory.schema import IGNORE, decode_label, decode_masks, decode_png
from factory.store import ShardStore

ALPHA = 0.5  # weight of a mask's colour over the image
IGNORE_GREY = (128, 128, 128)
READ_BATCH = 64


class ShowError(ValueError):
    """A contact sheet that cannot be drawn (no data, unknown class names)."""


def class_colour(i: int) -> tuple[int, int, int]:
    """The i-th class colour of a sheet: hues a golden-ratio turn apart, so any number of
    classes stay apart from their neighbours."""
    r, g, b = colorsys.hsv_to_rgb((0.1 + i * 0.618034) % 1.0, 0.9, 1.0)
    return round(255 * r), round(255 * g), round(255 * b)


def blend(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(N, 3) uint8 pixels tinted with `colour` at ALPHA."""
    return np.round((1 - ALPHA) * pixels + ALPHA * np.array(colour)).astype(np.uint8)


def _samples(store: ShardStore, classes: set[str] | None, n: int) -> Iterator[dict]:
    """The first n rows by index (only rows naming one of `classes`, if given)."""
    columns = ["index", "prompt", "classes", "image", "height", "width", "masks"]
    if store.kind == "segmentation":
        columns.append("label")
    for path in store.shard_paths():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH, columns=columns):
            for row in batch.to_pylist():
                if classes is None or classes.intersection(row["classes"]):
                    yield row
                    n -= 1
                    if n == 0:
                        return


def fit(image: Image.Image, tile: int, resample: Image.Resampling) -> Image.Image:
    """Scaled so its longer side is `tile` px."""
    w, h = image.size
    s = tile / max(w, h)
    return image.resize((max(1, round(w * s)), max(1, round(h * s))), resample)


def overlay_layers(row: dict, colours: dict[str, tuple[int, int, int]]
                   ) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """What is tinted over a sample's image, in drawing order: each class mask (H, W) bool in
    its class colour, then (segmentation rows) the ignore pixels in grey."""
    masks = decode_masks(row["masks"], row["height"], row["width"])         # (K, H, W)
    layers = [(m, colours[c]) for m, c in zip(masks, row["classes"], strict=True)]
    if "label" in row:
        layers.append((decode_label(row["label"]) == IGNORE, IGNORE_GREY))
    return layers


def _draw_tile(row: dict, colours: dict[str, tuple[int, int, int]], tile: int,
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """One sample at `tile` px: masks tinted in their class colours, ignore pixels grey, the
    class names at the top and the prompt at the bottom."""
    image = np.array(fit(Image.fromarray(decode_png(row["image"])), tile,
                         Image.Resampling.BILINEAR))                        # (h, w, 3)
    size = image.shape[1], image.shape[0]
    for mask, colour in overlay_layers(row, colours):
        small = np.array(fit(Image.fromarray(mask), tile, Image.Resampling.NEAREST))
        image[small] = blend(image[small], colour)
    canvas = Image.new("RGB", (tile, tile))
    canvas.paste(Image.fromarray(image), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    line = font.getbbox("Ag")[3] + 2
    draw.rectangle((0, 0, tile, line), fill=(0, 0, 0))
    x = 2
    for name in row["classes"]:
        draw.text((x, 1), name, fill=colours[name], font=font)
        x += draw.textlength(name + "  ", font=font)
    draw.rectangle((0, tile - line - 1, tile, tile), fill=(0, 0, 0))
    prompt = row["prompt"]
    if draw.textlength(prompt, font=font) > tile - 4:
        while prompt and draw.textlength(prompt + "...", font=font) > tile - 4:
            prompt = prompt[:-1]
        prompt += "..."
    draw.text((2, tile - line), prompt, fill=(255, 255, 255), font=font)
    return canvas


@dataclass(frozen=True)
class Sheet:
    tiles: int  # samples drawn
    missing: list[str]  # classes asked for that no sample names


def contact_sheet(root: str, out: str, n: int = 16, classes: list[str] | None = None,
                  tile: int = 256) -> Sheet:
    """Draw the first `n` samples of the folder `root` (by index; with `classes`, only samples
    naming one of them: those the data has, the others listed as missing) as a grid of
    `tile`-px tiles, ceil(sqrt(count)) tiles wide, to the PNG `out`. Raises StoreError if
    `root` is no factory folder, ShowError for bad n or tile, class names none of which the
    data has, or a folder with no samples."""
    if n < 1 or tile < 32:
        raise ShowError(f"need n >= 1 and tile >= 32 px, got n={n}, tile={tile}")
    store = ShardStore.open(root)
    wanted, missing = None, []
    if classes:
        have = {c for cs in store.read(columns=["classes"]).column("classes").to_pylist()
                for c in cs}
        missing = [c for c in classes if c not in have]
        if len(missing) == len(classes):
            raise ShowError(f"no sample names {', '.join(map(repr, missing))}; the data has: "
                            f"{', '.join(sorted(have)) or 'no samples'}")
        wanted = set(classes) - set(missing)
    rows = list(_samples(store, wanted, n))
    if not rows:
        raise ShowError(f"{root!r} holds no samples yet")
    colours: dict[str, tuple[int, int, int]] = {}
    for row in rows:
        for c in row["classes"]:
            colours.setdefault(c, class_colour(len(colours)))
    font = ImageFont.load_default()
    cols = math.ceil(math.sqrt(len(rows)))
    sheet = Image.new("RGB", (cols * tile, math.ceil(len(rows) / cols) * tile))
    for i, row in enumerate(rows):
        sheet.paste(_draw_tile(row, colours, tile, font), ((i % cols) * tile, (i // cols) * tile))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out, format="PNG")
    return Sheet(len(rows), missing)
