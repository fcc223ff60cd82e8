"""`factory stats`: what an output folder holds, per class."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from factory.store import ShardStore


@dataclass
class ClassStats:
    samples: int = 0  # samples whose prompt names the class
    empty: int = 0  # of those, how many have an empty oracle mask for it


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

    @property
    def empty_masks(self) -> int:
        return sum(c.empty for c in self.per_class.values())

    @property
    def masks(self) -> int:
        return sum(c.samples for c in self.per_class.values())


def dataset_stats(root: str) -> Stats:
    store = ShardStore.open(root)
    table = store.read(columns=["classes", "areas"])
    per_class: dict[str, ClassStats] = collections.defaultdict(ClassStats)
    columns = table.column("classes").to_pylist(), table.column("areas").to_pylist()
    for classes, areas in zip(*columns, strict=True):
        for c, a in zip(classes, areas, strict=True):
            per_class[c].samples += 1
            per_class[c].empty += a == 0
    m = store.manifest
    return Stats(run=m["run"], shards_done=len(store.done()), num_shards=store.num_shards,
                 samples=table.num_rows, pairs_source=m["pairs"]["source"], seen=m["seen"],
                 unseen=m["unseen"], per_class=dict(per_class))


def format_stats(s: Stats) -> str:
    r = s.run
    lines = [
        f"{r['split']} fold {r['fold']}, subset {r['subset']}, model {r['model']}, "
        f"detector {r['detector']} ({r['oracle']} oracle)",
        f"shards {s.shards_done}/{s.num_shards} done, samples {s.samples}/{r['n']}; "
        f"class pairs: {'co-appearing (pairs file)' if s.pairs_source == 'file' else 'uniform'}",
        f"{'class':<16}{'split':<8}{'samples':>8}{'empty masks':>13}",
    ]
    for name in s.seen + s.unseen:
        c = s.per_class.get(name, ClassStats())
        if c.samples or r["subset"] == "test" or name in s.seen:
            lines.append(f"{name:<16}{'seen' if name in s.seen else 'unseen':<8}"
                         f"{c.samples:>8}{c.empty:>13}")
    share = 100 * s.empty_masks / s.masks if s.masks else 0.0
    lines.append(f"{'all':<24}{s.masks:>8}{s.empty_masks:>13} ({share:.1f}% of class masks)")
    return "\n".join(lines)
