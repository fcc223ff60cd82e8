"""`factory stats`: what an output folder holds, per class: samples, empty masks, and histograms of
mask area and score; for segmentation sets also image quality and the samples dropped for it."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory.store import ShardStore

BINS = 10  # histogram bins over [0, 1], each 0.1 wide; 1.0 falls in the last
SCORE_MEANING = {"triplets": "detector score",
                 "segmentation": "mean mask confidence inside the class mask"}
PAIRS = {"file": "co-appearing (pairs file)", "uniform": "uniform",
         "none": "none (one class per prompt)"}


class StatsError(ValueError):
    """Stats that cannot be shown as asked."""


def histogram(values: list[float]) -> list[int]:
    """Counts of `values` in BINS equal bins over [0, 1]."""
    return np.histogram(np.clip(values, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))[0].tolist()


@dataclass
class ClassStats:
    samples: int = 0  # samples whose prompt names the class
    empty: int = 0  # of those, how many have an empty mask for it
    area_hist: list[int] = field(default_factory=lambda: [0] * BINS)  # mask area / image area
    score_hist: list[int] = field(default_factory=lambda: [0] * BINS)  # see SCORE_MEANING


@dataclass
class Stats:
    run: dict
    shards_done: int
    num_shards: int
    samples: int
    pairs_source: str
    seen: list[str]
    unseen: list[str]
    per_class: dict[str, ClassStats] = field(default_factory=dict)
    kind: str = "triplets"  # the store's kind: triplets or segmentation
    dropped: int = 0  # samples left out of finished shards (segmentation: below min quality)
    failed: int = 0  # samples left out because a stage kept failing on them
    quality_hist: list[int] | None = None  # segmentation: per-image quality

    @property
    def empty_masks(self) -> int:
        return sum(c.empty for c in self.per_class.values())

    @property
    def masks(self) -> int:
        return sum(c.samples for c in self.per_class.values())

    def listed(self) -> list[str]:
        """The classes shown: all seen ones, and unseen ones with samples or in a test or label
        set (which draw every class)."""
        return [n for n in self.seen + self.unseen
                if n in self.seen or self.run["subset"] != "train"
                or self.per_class.get(n, ClassStats()).samples]


PER_CLASS_COLUMNS = ["classes", "areas", "scores", "height", "width"]


def stats_columns(kind: str) -> list[str]:
    """The columns `StatsCounter.add` reads from a store of `kind`."""
    return PER_CLASS_COLUMNS + (["quality"] if kind == "segmentation" else [])


class StatsCounter:
    """The counts and histograms of `dataset_stats`, added up one table of rows (a shard) at a
    time, so that memory stays that of one shard however large the folder (histograms over
    fixed bins add up)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.samples = 0
        self.per_class: dict[str, ClassStats] = {}
        self.quality_hist = [0] * BINS if kind == "segmentation" else None

    def add(self, table: pa.Table) -> None:
        """Count the rows of `table`, which holds at least `stats_columns(kind)`."""
        fractions, scores = collections.defaultdict(list), collections.defaultdict(list)
        for classes, areas, row_scores, h, w in zip(
                *(table.column(c).to_pylist() for c in PER_CLASS_COLUMNS), strict=True):
            for c, a, sc in zip(classes, areas, row_scores, strict=True):
                fractions[c].append(a / (h * w))
                scores[c].append(sc)
        for c, f in fractions.items():
            s = self.per_class.setdefault(c, ClassStats())
            s.samples += len(f)
            s.empty += sum(x == 0 for x in f)
            s.area_hist = [a + b for a, b in zip(s.area_hist, histogram(f), strict=True)]
            s.score_hist = [a + b for a, b in zip(s.score_hist, histogram(scores[c]),
                                                  strict=True)]
        if self.quality_hist is not None:
            self.quality_hist = [a + b for a, b in zip(
                self.quality_hist, histogram(table.column("quality").to_pylist()), strict=True)]
        self.samples += table.num_rows

    def stats(self, store: ShardStore, shards_done: int) -> Stats:
        """The Stats of `store`, whose `shards_done` finished shards were added."""
        m = store.manifest
        return Stats(run=m["run"], shards_done=shards_done, num_shards=store.num_shards,
                     samples=self.samples, pairs_source=m["pairs"]["source"], seen=m["seen"],
                     unseen=m["unseen"], kind=store.kind, per_class=dict(self.per_class),
                     dropped=len(store.dropped), failed=len(store.failed),
                     quality_hist=self.quality_hist)


def dataset_stats(root: str) -> Stats:
    """Counts and histograms of every finished shard of `root`, read one at a time. Raises
    StoreError if `root` is no factory folder."""
    store = ShardStore.open(root)
    counter = StatsCounter(store.kind)
    done = store.finished()
    for k in done:
        counter.add(pq.read_table(store.layout.shard_file(k), columns=stats_columns(store.kind),
                                  filesystem=store.layout.fs))
    return counter.stats(store, len(done))


def _made_by(s: Stats) -> str:
    r = s.run
    head = f"{r['split']} fold {r['fold']}, subset {r['subset']}, model {r['model']}, "
    if s.kind == "segmentation":
        step = r.get("checkpoint_step")
        return (head + f"grounding head {r['checkpoint'][:12]}"
                + (f" (step {step})" if step is not None else "")
                + f", threshold {r['threshold']}"
                + (f", ignore band {r['ignore_band']}" if r.get("ignore_band") else ""))
    return head + f"detector {r['detector']} ({r['oracle']} oracle)"


def _bins_header(first: str) -> str:
    return f"{first:<16}" + "".join(f"{b / BINS:>7.1f}" for b in range(BINS))


def format_stats(s: Stats) -> str:
    """The text `factory stats` prints: how the data was made, counts, histograms as rows."""
    r = s.run
    dropped = (f" ({s.dropped} dropped: quality below {r.get('min_quality')})" if s.dropped
               else "")
    if s.failed:
        dropped += f" ({s.failed} skipped after failing: manifest.json's `failed`)"
    lines = [
        _made_by(s),
        f"shards {s.shards_done}/{s.num_shards} done, samples {s.samples}/{r['n']}{dropped}; "
        f"class pairs: {PAIRS.get(s.pairs_source, s.pairs_source)}",
        f"{'class':<16}{'split':<8}{'samples':>8}{'empty masks':>13}",
    ]
    for name in s.listed():
        c = s.per_class.get(name, ClassStats())
        lines.append(f"{name:<16}{'seen' if name in s.seen else 'unseen':<8}"
                     f"{c.samples:>8}{c.empty:>13}")
    share = 100 * s.empty_masks / s.masks if s.masks else 0.0
    lines.append(f"{'all':<24}{s.masks:>8}{s.empty_masks:>13} ({share:.1f}% of class masks)")
    with_samples = [n for n in s.listed() if s.per_class.get(n, ClassStats()).samples]
    for title, attr in (("mask area per class, as a share of the image (empty masks in the "
                         "first bin); masks per bin", "area_hist"),
                        (f"score per class ({SCORE_MEANING[s.kind]}); masks per bin",
                         "score_hist")):
        lines += ["", title, _bins_header("class")]
        lines += [f"{n:<16}" + "".join(f"{v:>7}" for v in getattr(s.per_class[n], attr))
                  for n in with_samples]
    if s.quality_hist is not None:
        lines += ["", "image quality (mean score over the prompt's classes); images per bin",
                  _bins_header(""), f"{'images':<16}" + "".join(f"{v:>7}" for v in s.quality_hist)]
    return "\n".join(lines)


def plot_stats(s: Stats, path: str) -> None:
    """Write the histograms of `s` to the PNG `path`: one heat map row per class for mask area
    and for score, and (segmentation) a bar chart of image quality. Raises StatsError when
    there are no samples to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot
    from matplotlib.figure import Figure

    names = [n for n in s.listed() if s.per_class.get(n, ClassStats()).samples]
    if not names:
        raise StatsError("nothing to plot: the folder holds no samples yet")
    panels = [("mask area (share of the image)", "area_hist"),
              (f"score ({SCORE_MEANING[s.kind]})", "score_hist")]
    fig = Figure(figsize=(5 * (len(panels) + (s.quality_hist is not None)),
                          max(3.0, 1.5 + 0.22 * len(names))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + (s.quality_hist is not None), squeeze=False)[0]
    for ax, (title, attr) in zip(axes, panels, strict=False):
        counts = np.array([getattr(s.per_class[n], attr) for n in names])   # (classes, BINS)
        image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(0.0, 1.0, len(names), 0))
        ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=7)
        ax.set_xticks(np.linspace(0.0, 1.0, BINS // 2 + 1))
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label="masks")
    if s.quality_hist is not None:
        ax = axes[-1]
        ax.bar(np.arange(BINS) / BINS, s.quality_hist, width=1 / BINS, align="edge")
        ax.set_xlim(0.0, 1.0)
        ax.set_title("image quality (mean score over its classes)", fontsize=9)
        ax.set_ylabel("images")
    fig.savefig(path, format="png", dpi=100)
