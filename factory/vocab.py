"""Vocabularies (class names and ids), detector spellings, and seen/unseen splits.

Two vocabularies exist: `pascal` (the 20 PASCAL VOC classes, ids 1-20) and `coco` (COCO-sim:
the 80 COCO classes less 'mouse', keeping COCO's category ids). Prompt names follow the paper's
appendix Table 5: VOC spellings (aeroplane, motorbike, pottedplant, diningtable, tvmonitor) and,
for PASCAL, 'sofa' for COCO's 'couch'. The detector (COCO-trained Mask R-CNN) reports COCO
category ids; `Vocabulary.detector_ids` maps each prompt name to the COCO id that finds it.

Class names from users (`factory label --classes/--vocab`, pairs files, a manifest to export) pass
`check_class_names`: SD must read each whole and tell each from the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from factory.prompts import prompt_for

# COCO category id -> COCO name, as in instances_*.json (ids 1-90 with gaps; torchvision's
# COCO-trained detectors use the same ids as their label indices).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # VOC ids are 1-20 in this order; 0 is background, 255 is ignore

# COCO name -> prompt name where the paper's Table 5 spells a class the VOC way.
COCO_TO_VOC_SPELLING: dict[str, str] = {
    "airplane": "aeroplane",
    "motorcycle": "motorbike",
    "potted plant": "pottedplant",
    "dining table": "diningtable",
    "tv": "tvmonitor",
}
# PASCAL only: VOC calls COCO's couch a sofa. COCO-sim keeps 'couch' (Table 5 prints 'bench' in
# its place by mistake; COCO's order there is chair, couch, potted plant, bed).
COCO_TO_PASCAL: dict[str, str] = {**COCO_TO_VOC_SPELLING, "couch": "sofa"}
COCO_SIM_DROPPED = ("mouse",)  # SD draws a rat, the detector looks for a computer mouse


@dataclass(frozen=True)
class Vocabulary:
    """An ordered class list. ids[i] is the label id of names[i] (0 = background)."""

    name: str
    names: tuple[str, ...]
    ids: tuple[int, ...]
    detector_ids: dict[str, int]  # prompt name -> COCO category id the detector reports

    def id_of(self, name: str) -> int:
        return self.ids[self.names.index(name)]

    def __contains__(self, name: str) -> bool:
        return name in self.names


def _pascal() -> Vocabulary:
    to_coco = {COCO_TO_PASCAL.get(n, n): cid for cid, n in COCO_CATEGORIES.items()}
    return Vocabulary(
        name="pascal",
        names=VOC_CLASSES,
        ids=tuple(range(1, len(VOC_CLASSES) + 1)),
        detector_ids={n: to_coco[n] for n in VOC_CLASSES},
    )


def _coco() -> Vocabulary:
    kept = [(cid, COCO_TO_VOC_SPELLING.get(n, n)) for cid, n in COCO_CATEGORIES.items()
            if n not in COCO_SIM_DROPPED]
    return Vocabulary(
        name="coco",
        names=tuple(n for _, n in kept),
        ids=tuple(cid for cid, _ in kept),
        detector_ids={n: cid for cid, n in kept},
    )


VOCABULARIES: dict[str, Vocabulary] = {"pascal": _pascal(), "coco": _coco()}


@dataclass(frozen=True)
class Split:
    """One fold of a vocabulary: seen classes train the grounding head, unseen ones test it."""

    vocab: Vocabulary
    fold: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.vocab.name


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


# Appendix Table 5 of the paper, verbatim but for the second COCO 'bench', which is 'couch'.
_FOLDS: dict[tuple[str, str], tuple[str, str]] = {
    ("pascal", "1"): (
        "aeroplane, bicycle, bird, boat, bottle, bus, cat, chair, cow, diningtable, horse, "
        "motorbike, person, pottedplant, sheep",
        "tvmonitor, car, dog, sofa, train",
    ),
    ("pascal", "2"): (
        "tvmonitor, car, dog, sofa, train, aeroplane, bicycle, bird, boat, bottle, bus, cat, "
        "chair, cow, diningtable",
        "horse, motorbike, person, pottedplant, sheep",
    ),
    ("pascal", "3"): (
        "horse, motorbike, person, pottedplant, sheep, tvmonitor, car, dog, sofa, train, "
        "aeroplane, bicycle, bird, boat, bottle",
        "bus, cat, chair, cow, diningtable",
    ),
    # The zero-shot segmentation benchmark split of SPNet / ZegFormer.
    ("pascal", "zs3"): (
        "aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, "
        "horse, motorbike, person",
        "pottedplant, sheep, sofa, train, tvmonitor",
    ),
    ("coco", "1"): (
        "person, bicycle, car, motorbike, bus, truck, boat, traffic light, fire hydrant, "
        "stop sign, bench, bird, dog, horse, sheep, cow, elephant, zebra, giraffe, backpack, "
        "umbrella, handbag, tie, skis, sports ball, kite, baseball bat, baseball glove, "
        "skateboard, surfboard, tennis racket, bottle, wine glass, cup, knife, spoon, bowl, "
        "banana, apple, orange, broccoli, carrot, pizza, donut, cake, chair, couch, pottedplant, "
        "bed, diningtable, tvmonitor, laptop, remote, keyboard, cell phone, microwave, oven, "
        "sink, refrigerator, book, clock, vase, scissors, teddy bear, toothbrush",
        "aeroplane, train, parking meter, cat, bear, suitcase, frisbee, snowboard, fork, "
        "sandwich, hot dog, toilet, toaster, hair drier",
    ),
    ("coco", "2"): (
        "aeroplane, train, parking meter, cat, bear, suitcase, frisbee, snowboard, fork, "
        "sandwich, hot dog, toilet, toaster, hair drier, person, bicycle, car, motorbike, bus, "
        "truck, boat, traffic light, fire hydrant, stop sign, bench, bird, dog, horse, sheep, "
        "cow, elephant, zebra, giraffe, backpack, umbrella, handbag, tie, skis, sports ball, "
        "kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, "
        "wine glass, cup, knife, spoon, bowl, banana, apple, orange, broccoli, carrot, pizza, "
        "donut, cake, chair, couch, pottedplant, bed, diningtable, tvmonitor",
        "laptop, remote, keyboard, cell phone, microwave, oven, sink, refrigerator, book, clock, "
        "vase, scissors, teddy bear, toothbrush",
    ),
    ("coco", "3"): (
        "laptop, remote, keyboard, cell phone, microwave, oven, sink, refrigerator, book, clock, "
        "vase, scissors, teddy bear, toothbrush, aeroplane, train, parking meter, cat, bear, "
        "suitcase, frisbee, snowboard, fork, sandwich, hot dog, toilet, toaster, hair drier, "
        "person, bicycle, car, motorbike, bus, truck, boat, traffic light, fire hydrant, "
        "stop sign, bench, bird, dog, horse, sheep, cow, elephant, zebra, giraffe, backpack, "
        "umbrella, handbag, tie, skis, sports ball, kite, baseball bat, baseball glove, "
        "skateboard, surfboard, tennis racket, bottle, wine glass, cup, knife, spoon, bowl",
        "banana, apple, orange, broccoli, carrot, pizza, donut, cake, chair, couch, pottedplant, "
        "bed, diningtable, tvmonitor",
    ),
}

SPLIT_NAMES = tuple(VOCABULARIES)
FOLDS: dict[str, tuple[str, ...]] = {
    s: tuple(f for (v, f) in _FOLDS if v == s) for s in SPLIT_NAMES
}


def get_split(split: str, fold: str = "1") -> Split:
    """The seen/unseen split `split` (pascal | coco), fold 1-3 (pascal also: zs3)."""
    if split not in VOCABULARIES:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")
    if (split, str(fold)) not in _FOLDS:
        raise ValueError(
            f"unknown fold {fold!r} for split {split!r}: choose one of {', '.join(FOLDS[split])}"
        )
    seen, unseen = _FOLDS[(split, str(fold))]
    return Split(VOCABULARIES[split], str(fold), _names(seen), _names(unseen))


def to_vocab_name(name: str, vocab: Vocabulary) -> str | None:
    """A COCO or VOC annotation name in `vocab`'s spelling, or None if `vocab` lacks the class."""
    if vocab.name == "pascal":
        name = COCO_TO_PASCAL.get(name, name)
    else:
        name = {**COCO_TO_VOC_SPELLING, "sofa": "couch"}.get(name, name)
    return name if name in vocab else None


OPEN = "custom"  # the split name of an open vocabulary (`factory label --classes/--vocab`)
MAX_CLASSES = 254  # label maps are uint8: 0 is background, 255 is ignore
SHOWN_CHARS = 40  # of a long class name in an error message


def normal_name(name: str) -> str:
    """`name` without leading or trailing whitespace, each inner run of it one space."""
    return " ".join(name.split())


def _shown(name: str) -> str:
    return repr(name if len(name) <= SHOWN_CHARS else name[:SHOWN_CHARS].rstrip() + "…")


def check_class_names(names: Iterable[str], pairs: Iterable[tuple[str, str]] = (),
                      tokenizer=None) -> list[str]:
    """`names` as `normal_name`s, in order, if SD can read each whole and tell each from the
    others. ValueError, in one line, for an empty name; for two names that differ only in case
    or spacing (CLIP's tokenizer lowercases and splits on spaces: one embedding under two class
    ids, and the second id never wins); and, given SD's `tokenizer` (the pipeline passes
    `actors.tokenizer.clip_tokenizer()`; this layer loads no model library), for a name whose
    one-class prompt, or a pair whose two-class prompt, is longer than CLIP's text context
    (start and end tokens included; the encoder would cut it)."""
    names = list(names)
    normal = [normal_name(n) for n in names]
    if "" in normal:
        raise ValueError(f"class name {normal.index('') + 1} of {len(names)} is empty")
    first: dict[str, str] = {}
    for name, key in zip(names, (n.lower() for n in normal), strict=True):
        if key in first and first[key] == name:
            raise ValueError(f"class name {_shown(name)} is given twice: give it once")
        if key in first:
            raise ValueError(f"{_shown(first[key])} and {_shown(name)} differ only in case or "
                             "spacing: give one of them")
        first[key] = name
    pairs = [(normal_name(a), normal_name(b)) for a, b in pairs]
    # One order per pair: CLIP's BPE reads word by word, so both orders count the same tokens.
    prompts = [prompt_for((n,)) for n in normal] + [prompt_for(p) for p in pairs]
    if tokenizer is None or not prompts:
        return normal
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]
    what = ([f"class name {_shown(n)}" for n in normal]
            + [f"pair {_shown(a)} and {_shown(b)}" for a, b in pairs])
    long = [f"{w} is {k} tokens in its prompt" for w, k in zip(what, lengths, strict=True)
            if k > tokenizer.model_max_length]
    if long:
        raise ValueError(f"{'; '.join(long)}; CLIP reads at most {tokenizer.model_max_length}")
    return normal


def open_vocabulary(names: list[str], seen: tuple[str, ...] = (), tokenizer=None) -> Split:
    """Any class names as a split: ids 1..N in the order given (`check_class_names` refuses
    empty, duplicate and too long names); `seen` are the names a grounding head was trained on
    (for the record), the rest unseen."""
    names = check_class_names(names, tokenizer=tokenizer)
    if not names:
        raise ValueError("an open vocabulary needs at least one class name")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"an open vocabulary holds at most {MAX_CLASSES} classes (uint8 label "
                         f"maps), got {len(names)}")
    bad = [n for n in names if "," in n]
    if bad:
        raise ValueError(f"class names cannot hold commas: {', '.join(map(repr, bad))}")
    vocab = Vocabulary(name=OPEN, names=tuple(names), ids=tuple(range(1, len(names) + 1)),
                       detector_ids={})
    return Split(vocab, OPEN, tuple(n for n in names if n in seen),
                 tuple(n for n in names if n not in seen))


def read_vocabulary_file(path: str, tokenizer=None) -> tuple[list[str], list[tuple[str, str]]]:
    """A vocabulary file (UTF-8, a byte-order mark allowed): one class name a line; a line
    "a, b" names a co-appearing pair (both become classes, and a name may recur in several
    lines); blank lines and lines starting with # are skipped. Names and pairs pass
    `check_class_names`."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read vocabulary file {path!r}: {e}") from None
    names: list[str] = []
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) > 2 or "" in parts or len(set(parts)) != len(parts):
            raise ValueError(f"{path}:{number}: expected a class name or two distinct names "
                             f"'a, b', got {line!r}")
        names += parts
        if len(parts) == 2:
            pairs.append((parts[0], parts[1]))
    try:
        names = check_class_names(dict.fromkeys(names), pairs, tokenizer)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return names, [(normal_name(a), normal_name(b)) for a, b in pairs]
