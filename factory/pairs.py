"""Co-appearing class pairs from real annotations (paper appendix B.2: 142 VOC, 1559 COCO pairs).

No annotation set can be downloaded here, so pairs are computed from the user's own copy
(`factory pairs --coco instances.json` or `--voc VOCdevkit/VOC2012`) into a small JSON file that
`factory generate --pairs FILE` reads. Names are stored in the target vocabulary's spelling.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from factory.vocab import Vocabulary, check_class_names, to_vocab_name

PAIRS_FORMAT = 1


def count_pairs(images: Iterable[Iterable[str]], vocab: Vocabulary) -> collections.Counter:
    """Pairs of `vocab` classes that appear in one image, ordered as `vocab`, with image counts.
    Annotation names (COCO or VOC spelling) outside `vocab` are ignored."""
    counts: collections.Counter = collections.Counter()
    for names in images:
        present = {n for n in (to_vocab_name(x, vocab) for x in names) if n is not None}
        ordered = sorted(present, key=vocab.names.index)
        counts.update(itertools.combinations(ordered, 2))
    return counts


def coco_images(instances_json: str) -> list[list[str]]:
    """Per image of a COCO instances file, the category names annotated in it."""
    with open(instances_json, encoding="utf-8") as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_image: dict[int, set[str]] = collections.defaultdict(set)
    for a in data["annotations"]:
        per_image[a["image_id"]].add(names[a["category_id"]])
    return [sorted(v) for v in per_image.values()]


def voc_images(voc_root: str, image_set: str = "Segmentation/trainval") -> list[list[str]]:
    """Per image of a VOC image set (ImageSets/<image_set>.txt), the object names annotated in
    Annotations/<id>.xml."""
    list_file = os.path.join(voc_root, "ImageSets", image_set + ".txt")
    with open(list_file, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip()]
    images = []
    for image_id in ids:
        root = ET.parse(os.path.join(voc_root, "Annotations", image_id + ".xml")).getroot()
        images.append(sorted({o.findtext("name").strip() for o in root.iter("object")}))
    return images


def write_pairs(path: str, counts: collections.Counter, vocab: Vocabulary, source: str,
                min_count: int = 1) -> int:
    kept = [(p, n) for p, n in counts.most_common() if n >= min_count]
    kept.sort(key=lambda pn: (vocab.names.index(pn[0][0]), vocab.names.index(pn[0][1])))
    doc = {
        "format": PAIRS_FORMAT,
        "vocabulary": vocab.name,
        "source": source,
        "min_count": min_count,
        "pairs": [list(p) for p, _ in kept],
        "images": [n for _, n in kept],
    }
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(kept)


def make_pairs(out: str, coco_json: str | None = None, voc_root: str | None = None,
               voc_image_set: str = "Segmentation/trainval", split: str | None = None,
               min_count: int = 1) -> tuple[int, int, str]:
    """`factory pairs`: count the co-appearing pairs of a COCO instances file or a VOC folder
    and write them to `out`; returns (pairs, images, vocabulary). ValueError names bad input."""
    from factory.vocab import VOCABULARIES

    if (coco_json is None) == (voc_root is None):
        raise ValueError("give exactly one of --coco FILE and --voc DIR")
    if min_count < 1:
        raise ValueError(f"min count must be >= 1, got {min_count}")
    split = split or ("coco" if coco_json else "pascal")
    if split not in VOCABULARIES:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(VOCABULARIES)}")
    try:
        images = coco_images(coco_json) if coco_json else voc_images(voc_root, voc_image_set)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read annotations: {e}") from None
    n = write_pairs(out, count_pairs(images, VOCABULARIES[split]), VOCABULARIES[split],
                    source=coco_json or voc_root, min_count=min_count)
    return n, len(images), split


def read_pairs(path: str, vocab: Vocabulary, tokenizer=None) -> tuple[tuple[str, str], ...]:
    """The pairs of a pairs file (UTF-8, a byte-order mark allowed), checked against `vocab` and
    by `check_class_names` (with `tokenizer`, their prompts' lengths too; ValueError names what
    is wrong)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
        pairs = tuple((str(a), str(b)) for a, b in doc["pairs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read pairs file {path!r}: {e}") from None
    if doc.get("vocabulary") != vocab.name:
        raise ValueError(f"pairs file {path!r} is for vocabulary {doc.get('vocabulary')!r}, "
                         f"not {vocab.name!r}: make it with `factory pairs --split {vocab.name}`")
    unknown = sorted({c for p in pairs for c in p if c not in vocab})
    if unknown:
        raise ValueError(f"pairs file {path!r} names classes that {vocab.name!r} lacks: "
                         f"{', '.join(unknown)}")
    if any(a == b for a, b in pairs):
        raise ValueError(f"pairs file {path!r} pairs a class with itself")
    try:
        check_class_names(dict.fromkeys(c for p in pairs for c in p), pairs, tokenizer)
    except ValueError as e:
        raise ValueError(f"pairs file {path!r}: {e}") from None
    return pairs
