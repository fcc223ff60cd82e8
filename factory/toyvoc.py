"""A small VOC-layout folder of drawn shapes, made offline: the demo's stand-in for VOC val
(Protocol II needs a VOC folder and none can be downloaded). It holds VOC val's files only, not
the train lists or `Annotations/` that `factory pairs --voc` and MaskFormer training read.
Each image is a dark background with one to three filled rectangles of random VOC classes; the
label map says which."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from factory.export import voc_colormap
from factory.vocab import VOC_CLASSES


def write_shapes_voc(root: str, n: int, *, size: int = 64, seed: int = 0) -> str:
    """n val images under `root` (JPEGImages, SegmentationClass palette PNGs with VOC's 255
    borders, ImageSets/Segmentation/val.txt); returns `root`."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    palette = voc_colormap().tobytes()
    ids = [f"shapes_{i:06d}" for i in range(n)]
    for name in ids:
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        label = np.zeros((size, size), dtype=np.uint8)
        for cls in rng.choice(len(VOC_CLASSES), size=int(rng.integers(1, 4)), replace=False):
            s = int(rng.integers(size // 4, size // 2))
            y, x = rng.integers(0, size - s, 2)
            image[y:y + s, x:x + s] = rng.integers(80, 256, 3, dtype=np.uint8)
            label[y:y + s, x:x + s] = cls + 1
            label[y, x:x + s] = label[y + s - 1, x:x + s] = 255  # VOC's unlabelled borders
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"))
        png = Image.frombytes("P", label.shape[::-1], label.tobytes())  # ids as indices
        png.putpalette(palette)
        png.save(os.path.join(root, "SegmentationClass", name + ".png"))
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w",
              encoding="utf-8") as f:
        f.write("\n".join(ids) + "\n")
    return root

