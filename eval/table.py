"""Protocol I's table (the paper's Table 1, and appendix C.1's Table 6): mIoU in percent of each
method on synthetic test triplets, in five columns by the prompt's classes:

    One / Seen, One / Unseen: one class, seen or unseen;
    Two / Seen, Two / Seen+Unseen, Two / Unseen: two classes, both seen, one of each, both unseen.

Each (method, column) has its own `IoUAccumulator`, fed the per-class binary masks (prediction
and the detector's oracle) of the prompt's classes, so a column's mIoU averages over the classes
that occur in that column's samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from eval.metrics import IoUAccumulator

COLUMNS: tuple[str, ...] = ("One/Seen", "One/Unseen", "Two/Seen", "Two/Seen+Unseen", "Two/Unseen")

# The paper's Table 1, rows "Average" (over its three splits), in the order of COLUMNS. These are
# the paper's figures, for comparison only; nothing here recomputes them.
PAPER_TABLE1_AVERAGES: dict[str, dict[str, dict[str, float]]] = {
    "pascal": {
        "ours (paper)": dict(zip(COLUMNS, (90.30, 83.08, 79.10, 67.86, 55.74), strict=True)),
        "DAAM (paper)": dict(zip(COLUMNS, (64.84, 62.90, 48.21, 49.19, 50.95), strict=True)),
    },
    "coco": {
        "ours (paper)": dict(zip(COLUMNS, (83.68, 73.21, 64.16, 56.31, 44.40), strict=True)),
        "DAAM (paper)": dict(zip(COLUMNS, (61.71, 57.76, 49.78, 52.19, 40.79), strict=True)),
    },
}

EMPTY = "–"  # Markdown cell of a column without samples


def column_of(seen_flags: Sequence[bool]) -> str:
    """The column of a prompt whose classes are seen (True) or unseen (False), one or two."""
    if len(seen_flags) == 1:
        return "One/Seen" if seen_flags[0] else "One/Unseen"
    if len(seen_flags) == 2:
        return {2: "Two/Seen", 1: "Two/Seen+Unseen", 0: "Two/Unseen"}[sum(map(bool, seen_flags))]
    raise ValueError(f"Protocol I prompts have one or two classes, got {len(seen_flags)}")


class ProtocolTable:
    """Streams Protocol I's per-class masks into one `IoUAccumulator` per (method, column).

    methods: the table's rows, e.g. ("grounding head", "DAAM").
    seen, unseen: the split's class names (or ids: the same kind `update` gets); every class of
    a prompt must be in one of them.
    """

    def __init__(self, methods: Sequence[str], seen: Iterable[Hashable],
                 unseen: Iterable[Hashable]) -> None:
        seen, unseen = list(dict.fromkeys(seen)), list(dict.fromkeys(unseen))
        both = set(seen) & set(unseen)
        if both:
            raise ValueError(f"classes both seen and unseen: {sorted(map(str, both))}")
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be distinct names, at least one: {list(methods)}")
        self.methods = tuple(methods)
        self.seen = tuple(seen)
        self.unseen = tuple(unseen)
        self._seen = frozenset(seen)
        # accumulator slot of each class: 1..N (0 is the accumulator's background, never used)
        self._slot = {c: i for i, c in enumerate(self.seen + self.unseen, start=1)}
        n = len(self._slot) + 1
        self._acc = {(m, col): IoUAccumulator(n) for m in self.methods for col in COLUMNS}
        self._count = {(m, col): 0 for m in self.methods for col in COLUMNS}

    def update(self, method: str, classes: Sequence[Hashable], pred: np.ndarray, gt: np.ndarray,
               ignore: np.ndarray | None = None) -> str:
        """Adds one triplet's masks for `method`; returns the column it went to.

        classes: (K,) the prompt's class names or ids, K = 1 or 2, distinct.
        pred:    (K, H, W) bool predicted mask per class.
        gt:      (K, H, W) bool oracle mask per class.
        ignore:  (H, W) bool pixels to skip, or None.
        """
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}: the table has {list(self.methods)}")
        classes = list(classes)
        unknown = [c for c in classes if c not in self._slot]
        if unknown:
            raise ValueError(f"classes {unknown} are neither seen nor unseen in this table")
        if len(set(classes)) != len(classes):
            raise ValueError(f"a prompt's classes must be distinct, got {classes}")
        col = column_of([c in self._seen for c in classes])
        self._acc[method, col].update_masks(pred, gt, [self._slot[c] for c in classes], ignore)
        self._count[method, col] += 1
        return col

    def merge(self, other: ProtocolTable) -> ProtocolTable:
        """Adds `other`'s counts (e.g. another worker's, same methods and split); returns self."""
        if (other.methods, other.seen, other.unseen) != (self.methods, self.seen, self.unseen):
            raise ValueError("cannot merge tables with different methods or seen/unseen classes")
        for key, acc in self._acc.items():
            acc.merge(other._acc[key])
            self._count[key] += other._count[key]
        return self

    def rows(self) -> dict[str, dict[str, float]]:
        """mIoU in percent per method and column; nan for a column without samples."""
        return {m: {col: 100 * self._acc[m, col].miou() for col in COLUMNS} for m in self.methods}

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples per method and column."""
        return {m: {col: self._count[m, col] for col in COLUMNS} for m in self.methods}

    def to_json(self) -> str:
        """{"columns": [...], "rows": {method: {column: mIoU % or null}}, "counts": {method:
        {column: samples}}}; null marks a column without samples (JSON has no nan)."""
        rows = {m: {col: None if math.isnan(v) else v for col, v in r.items()}
                for m, r in self.rows().items()}
        return json.dumps({"columns": list(COLUMNS), "rows": rows, "counts": self.counts()},
                          allow_nan=False)

    def to_markdown(self, reference: dict[str, dict[str, float]] | None = None) -> str:
        """The table in the paper's layout, two decimals, "–" for a column without samples, then
        a "# samples" row (one per method if their counts differ) and the `reference` rows, e.g.
        `PAPER_TABLE1_AVERAGES["pascal"]`."""
        def line(cells: Iterable[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        def fmt(v: float) -> str:
            return EMPTY if math.isnan(v) else f"{v:.2f}"

        out = [line(["# Objects", "One", "", "Two", "", ""]),
               line(["---"] + ["---:"] * len(COLUMNS)),
               line(["Categories"] + [col.split("/")[1] for col in COLUMNS])]
        out += [line([m] + [fmt(r[col]) for col in COLUMNS]) for m, r in self.rows().items()]
        counts = self.counts()
        distinct = {tuple(c.values()) for c in counts.values()}
        labels = (["# samples"] if len(distinct) == 1
                  else [f"# samples ({m})" for m in self.methods])
        # equal counts: one row, from the first method's (zip stops at the shorter list)
        for label, c in zip(labels, counts.values(), strict=False):
            out.append(line([label] + [str(c[col]) for col in COLUMNS]))
        for m, r in (reference or {}).items():
            out.append(line([m] + [fmt(r[col]) for col in COLUMNS]))
        return "\n".join(out) + "\n"
