"""Sample specs: what each sample of a run is, as a pure function of its index.

A run is (split, fold, subset, run seed, pairs); sample i's classes, prompt and noise seed depend
on those and on i alone, never on shard size, batch size or processing order. That makes shards
independent and resume exact.

- subset `train` (paper sec. 5.1, appendix C.1 "mixture"): one seen class, or with probability
  `two_class_ratio` a co-appearing pair of seen classes.
- subset `test` (appendix B.2): every class of the split, 30 samples each, plus a few per
  co-appearing pair (5 for PASCAL, 2 for COCO). These "slots" are shuffled once by the run seed,
  so any prefix of the run is a fair sample of them; indices past the last slot wrap around
  with fresh noise.
- subset `label` (appendix B.3, what `factory label` makes): slots like `test`, at the sizes of
  the paper's synthetic segmentation sets: 500 per class and 71 per pair for PASCAL, 1,500 and 70
  for COCO (`per_class`, `per_pair` to change them; an open vocabulary defaults to PASCAL's).
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # factory.vocab imports prompt_for (to check names fit): no import back
    from factory.vocab import Split

SUBSETS = ("train", "test", "label")
TEMPLATE_ONE = "a photograph of a {}"
TEMPLATE_TWO = "a photograph of a {} and a {}"
TEST_PER_CLASS = 30
TEST_PER_PAIR = {"pascal": 5, "coco": 2}
LABEL_PER_CLASS = {"pascal": 500, "coco": 1500}  # appendix B.3; other vocabularies: PASCAL's
LABEL_PER_PAIR = {"pascal": 71, "coco": 70}
PAPER_PAIR_COUNTS = {"pascal": 142, "coco": 1559}  # co-appearing pairs in VOC / COCO (app. B.2)
UNIFORM = "uniform"  # pairs source when no pairs file is given


def prompt_for(classes: tuple[str, ...]) -> str:
    if len(classes) == 1:
        return TEMPLATE_ONE.format(*classes)
    if len(classes) == 2:
        return TEMPLATE_TWO.format(*classes)
    raise ValueError(f"a prompt names one or two classes, got {classes}")


@dataclass(frozen=True)
class SampleSpec:
    index: int
    classes: tuple[str, ...]
    prompt: str
    noise_seed: int  # seeds the initial latent noise (torch.Generator on the CPU)


@dataclass(frozen=True)
class SamplePlan:
    """Everything that decides a run's samples. `pairs` are co-appearing class pairs in the
    split's spelling; None means the uniform fallback (any two distinct classes; an open
    vocabulary has none, so it gets one-class prompts only). `per_class` and `per_pair` set the
    slot counts of subsets test and label [default: the paper's]."""

    split: Split
    subset: str
    seed: int
    pairs: tuple[tuple[str, str], ...] | None = None
    two_class_ratio: float = 0.5
    per_class: int | None = None
    per_pair: int | None = None

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise ValueError(f"unknown subset {self.subset!r}: choose one of {', '.join(SUBSETS)}")
        if not 0.0 <= self.two_class_ratio <= 1.0:
            raise ValueError(f"two-class ratio must lie in [0, 1], got {self.two_class_ratio}")
        if self.pairs is not None:
            unknown = sorted({c for p in self.pairs for c in p} - set(self.split.vocab.names))
            if unknown:
                raise ValueError(f"pairs name classes that split {self.split.name!r} lacks: "
                                 f"{', '.join(unknown)}")
            if self.subset == "train" and self.two_class_ratio > 0 and not self.train_pairs:
                raise ValueError("no pair in the pairs file has two seen classes of "
                                 f"{self.split.name} fold {self.split.fold}")
        for name, value in (("per class", self.per_class), ("per pair", self.per_pair)):
            if value is not None and value < 0:
                raise ValueError(f"samples {name} must be >= 0, got {value}")
        if self.subset != "train" and not self.slots:
            raise ValueError(f"no sample to make: {self.slot_counts[0]} per class and "
                             f"{self.slot_counts[1]} per pair over {len(self.test_pairs)} pairs")

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes this subset draws from: seen ones for train, all for test."""
        return self.split.seen if self.subset == "train" else self.split.vocab.names

    @property
    def pairs_source(self) -> str:
        return UNIFORM if self.pairs is None else "file"

    @cached_property
    def train_pairs(self) -> tuple[tuple[str, str], ...]:
        seen = set(self.split.seen)
        return tuple(p for p in self.pairs or () if p[0] in seen and p[1] in seen)

    @cached_property
    def test_pairs(self) -> tuple[tuple[str, str], ...]:
        """The pairs of subsets test and label: the file's, or as many uniformly drawn pairs as
        the paper's annotations have (none for an open vocabulary)."""
        if self.pairs is not None:
            return self.pairs
        if self.split.name not in PAPER_PAIR_COUNTS:
            return ()
        every = list(itertools.combinations(self.classes, 2))
        k = min(PAPER_PAIR_COUNTS[self.split.name], len(every))
        pick = self._rng("test-pairs").choice(len(every), size=k, replace=False)
        return tuple(every[i] for i in sorted(pick))

    @property
    def slot_counts(self) -> tuple[int, int]:
        """Samples per class and per pair in subsets test and label."""
        name = self.split.name
        if self.subset == "test":
            counts = TEST_PER_CLASS, TEST_PER_PAIR.get(name, TEST_PER_PAIR["pascal"])
        else:
            counts = (LABEL_PER_CLASS.get(name, LABEL_PER_CLASS["pascal"]),
                      LABEL_PER_PAIR.get(name, LABEL_PER_PAIR["pascal"]))
        return (counts[0] if self.per_class is None else self.per_class,
                counts[1] if self.per_pair is None else self.per_pair)

    @cached_property
    def slots(self) -> tuple[tuple[str, ...], ...]:
        """The class tuples of subsets test and label, in the run's shuffled order."""
        per_class, per_pair = self.slot_counts
        slots = [(c,) for c in self.classes for _ in range(per_class)]
        slots += [p for p in self.test_pairs for _ in range(per_pair)]
        order = self._rng(f"{self.subset}-slots").permutation(len(slots))
        return tuple(slots[i] for i in order)

    def default_n(self) -> int | None:
        """The paper's set size for subsets test (appendix B.2) and label (B.3); train has
        none."""
        return None if self.subset == "train" else len(self.slots)

    def _rng(self, *tags: str | int) -> np.random.Generator:
        run = f"{self.split.name}/{self.split.fold}/{self.subset}"
        words = [self.seed, zlib.crc32(run.encode())]
        words += [zlib.crc32(t.encode()) if isinstance(t, str) else t for t in tags]
        return np.random.default_rng(np.random.SeedSequence(words))

    def sample(self, index: int) -> SampleSpec:
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        rng = self._rng("sample", index)
        if self.subset != "train":
            classes = self.slots[index % len(self.slots)]
        elif rng.random() < self.two_class_ratio:
            if self.pairs is None:
                classes = tuple(self.classes[i] for i in rng.choice(len(self.classes), 2, False))
            else:
                classes = self.train_pairs[rng.integers(len(self.train_pairs))]
        else:
            classes = (self.classes[rng.integers(len(self.classes))],)
        if len(classes) == 2 and rng.random() < 0.5:  # either class may come first
            classes = classes[::-1]
        return SampleSpec(index, tuple(classes), prompt_for(classes), int(rng.integers(2**63)))
