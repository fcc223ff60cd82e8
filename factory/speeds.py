"""The measured speed of each stage (images/s on one GPU), read from the benchmark results
committed under benchmarks/results/: one source of truth for the figures that size the `auto`
labeller pools (factory/pools.py IMAGES_PER_S) and that the README and cluster.yaml quote.
`bash benchmarks/gpu.sh` writes those files; nothing here types a speed in.

    python -m factory.speeds        # each stage's figure, with its card, file and key
    python -m factory.speeds /tmp/factory-smoke-XXXX cpu    # what a gpu.sh --smoke run wrote

Which file: each stage has its sources in order (SOURCES). A source named by card
(`generate-{card}.json`) is tried for each card of CARDS in turn, the H100 first (DESIGN.md's
speed anchors are H100 figures; an H200 has the same compute, and generation is compute-bound,
so the two agree within a few percent: a stage may come from either). The first file that
holds the figure gives it; a file without it (a run cut short, or a file whose other parts ran)
is passed over. A file that is not JSON, or holds something other than a positive number where
the figure belongs, is an error naming it (a broken result file is fixed, not skipped); a stage
that no file gives a figure is an error naming the files tried. The files travel with the code
(`ray job submit --working-dir .` ships the repository), and are read on each use: a few small
files, and no cache to go stale.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from factory.errors import FactoryError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CARDS = ("h100", "h200")  # preference: DESIGN.md's anchor card first
LABEL_BATCH = 8  # `--label-batch-size`'s default (factory/options.py): labellers run at it


@dataclass(frozen=True)
class Source:
    """Where a stage's figure lies: a file under RESULTS (`{card}` filled from CARDS, or the
    fixed `card` of a file named otherwise) and the keys down to the figure; `batch` the keys
    to the batch size it was measured at (None: the batch is the last key); `note` what a
    reader of the figure must know."""

    file: str
    keys: tuple[str, ...]
    batch: tuple[str, ...] | None = None
    card: str | None = None
    note: str = ""

    def candidates(self, cards: tuple[str, ...]) -> list[tuple[str, str]]:
        """(card, file) pairs to try, in order."""
        if "{card}" in self.file:
            return [(c, self.file.format(card=c)) for c in cards]
        return [(self.card or "?", self.file)]


SOURCES: dict[str, tuple[Source, ...]] = {
    # SDGenerator at the stage's defaults (batch 16, bf16, compiled): `gpu.sh generate`
    "sd generator": (Source("generate-{card}.json", ("stage", "images_per_s"),
                            batch=("stage", "batch_size")),),
    # GroundingLabeller (25-map features, paper-sized head) at the factory's label batch:
    # `gpu.sh label`; until that has run, the 2026-11-27 figure of the earlier features
    "grounding head": (
        Source("label-{card}.json", ("labeller_images_per_s", str(LABEL_BATCH))),
        Source("h200-b9f3fe7/label.json", ("labeller_images_per_s", str(LABEL_BATCH)),
               card="h200",
               note="stale: measured at commit b9f3fe7 with the 9 diffusers block outputs as "
                    "features, not the 25 maps the head reads now (2.7x the values per image); "
                    "re-measure with `bash benchmarks/gpu.sh label`"),
    ),
    # the Mask R-CNN labeller alone (torchvision v2, random weights), timed by `gpu.sh pipeline`
    "mask r-cnn": (Source("pipeline-{card}.json", ("labeller_alone_images_per_s",),
                          batch=("label_batch_size",),
                          note="random weights (none can be downloaded there)"),),
}


@dataclass(frozen=True)
class Speed:
    """One stage's measured speed and where it comes from."""

    stage: str
    images_per_s: float
    card: str  # "h100", "h200", ...
    source: str  # the file, relative to the repository: benchmarks/results/...
    key: str  # where in the file: "stage.images_per_s"
    batch_size: int | None = None  # the batch it was measured at, where the file says
    note: str = ""

    def __str__(self) -> str:  # "4.44 images/s at batch 16 (h200; benchmarks/...: stage....)"
        batch = f" at batch {self.batch_size}" if self.batch_size else ""
        note = f"; {self.note}" if self.note else ""
        return (f"{self.images_per_s:.3g} images/s{batch} ({self.card}; {self.source}: "
                f"{self.key}{note})")


def measured_speed(stage: str, results: str = RESULTS,
                   cards: tuple[str, ...] = CARDS) -> Speed:
    """`stage`'s speed from the first result file of its SOURCES that exists under `results`
    (see the module's docstring for the order and the errors)."""
    if stage not in SOURCES:
        raise KeyError(stage)
    tried = []
    for source in SOURCES[stage]:
        for card, name in source.candidates(cards):
            path = os.path.join(results, name)
            if not os.path.exists(path):
                tried.append(name)
                continue
            speed = _read(stage, source, card, path)
            if speed is not None:
                return speed
            tried.append(f"{name} (no {'.'.join(source.keys)})")
    raise FactoryError(f"no measured speed for the {stage} stage in {results}: tried "
                       f"{', '.join(tried)}; run `bash benchmarks/gpu.sh` on a GPU "
                       "(benchmarks/gpu.sh names the part that writes each file)")


def _read(stage: str, source: Source, card: str, path: str) -> Speed | None:
    """The Speed in the file at `path`; None where the file lacks the figure (a run cut short,
    or one of the parts that share the file); an error where it is not JSON or the figure is
    not a positive number."""
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise FactoryError(f"cannot read the {stage} stage's speed from {shown}: {e}") from None
    value = _at(data, source.keys)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
            or not math.isfinite(value)):
        raise FactoryError(f"{shown} holds no {stage} speed at {'.'.join(source.keys)} (found "
                           f"{value!r}): fix the file or measure again with benchmarks/gpu.sh")
    batch = _at(data, source.batch) if source.batch else source.keys[-1]
    batch = int(batch) if isinstance(batch, int | str) and str(batch).isdigit() else None
    return Speed(stage, float(value), card, shown, ".".join(source.keys), batch, source.note)


def _at(data, keys: tuple[str, ...]):
    """data[k0][k1]...; None where a key is missing."""
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


class MeasuredSpeeds(Mapping[str, float]):
    """stage -> images/s, read from the result files when looked up: a mapping shaped like the
    dict it replaces, so that a missing or broken file fails the run that needs the figure, in
    one line, and not every import of the package."""

    def __init__(self, results: str = RESULTS, cards: tuple[str, ...] = CARDS) -> None:
        self.results, self.cards = results, cards

    def speed(self, stage: str) -> Speed:
        return measured_speed(stage, self.results, self.cards)

    def __getitem__(self, stage: str) -> float:
        return self.speed(stage).images_per_s

    def __iter__(self) -> Iterator[str]:
        return iter(SOURCES)

    def __len__(self) -> int:
        return len(SOURCES)

    def __repr__(self) -> str:
        return f"MeasuredSpeeds({os.path.relpath(self.results, ROOT)!r}, cards={self.cards})"


def main(argv: list[str] | None = None) -> None:
    """Print each stage's speed and its source (the figures the `auto` pools are sized by):
    `python -m factory.speeds [FOLDER [CARD ...]]` (default: benchmarks/results, CARDS)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    results, cards = (args[0] if args else RESULTS), (tuple(args[1:]) or CARDS)
    for stage in SOURCES:
        try:
            print(f"{stage:<15}{measured_speed(stage, results, cards)}")
        except FactoryError as e:
            print(f"{stage:<15}{e}")


if __name__ == "__main__":
    main()
