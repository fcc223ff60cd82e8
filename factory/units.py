"""Work units: the grid of sample indices a run's generation is cut into, and the Ray Data
source that makes each unit's sample specs.

Units are `unit` samples each (a few batches, much smaller than a shard), so that the last wave
of a run leaves no GPU idle for long. Unit j holds samples [j * unit, (j + 1) * unit) whatever
is left to do, so a resumed run redoes whole units (rows of finished shards, and past n, are
dropped by the writer: the last unit of a run whose n is no multiple of `unit` makes up to
unit - 1 samples for nothing). Every unit is exactly `unit` rows, so Ray Data hands each stage
one whole unit per call (a shorter block would be joined to the next one into a batch), and a
unit's batches, hence its outputs, are the same in every run, resumed or disturbed by a lost
node.
"""

from __future__ import annotations

import numpy as np

from factory.prompts import SamplePlan
from factory.store import ShardLayout


def work_units(layout: ShardLayout, shards: list[int], unit: int) -> np.ndarray:
    """The units of the grid [j * unit, (j + 1) * unit) that hold samples of `shards`, as
    (K, 2) [first, end) ranges of unit ids: a handful of numbers however large n is."""
    spans = []
    for k in shards:
        rows = layout.shard_rows(k)
        first, end = rows.start // unit, -(-rows.stop // unit)
        if spans and first <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([first, end])
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def unit_specs(plan: SamplePlan, u: int, unit: int) -> dict[str, np.ndarray]:
    """Work unit u -> one row per sample of it: index, prompt, classes, class ids, noise seed."""
    from actors.batch import object_column

    vocab = plan.split.vocab
    specs = [plan.sample(i) for i in range(u * unit, (u + 1) * unit)]
    return {
        "index": np.array([s.index for s in specs], dtype=np.int64),
        "prompt": np.array([s.prompt for s in specs], dtype=object),
        "classes": object_column([list(s.classes) for s in specs]),
        "class_ids": object_column([[vocab.id_of(c) for c in s.classes] for s in specs]),
        "noise_seed": np.array([s.noise_seed for s in specs], dtype=np.int64),
    }


def split_units(spans: np.ndarray, parts: int) -> list[np.ndarray]:
    """The units of `spans` ((K, 2) [first, end) ranges) cut into at most `parts` runs of
    nearly equal length, in order, each again as ranges; every unit lands in exactly one."""
    total = int((spans[:, 1] - spans[:, 0]).sum())
    parts = max(1, min(parts, total))
    bounds = [total * p // parts for p in range(parts + 1)]  # cut points, counted in units
    starts = np.concatenate([[0], np.cumsum(spans[:, 1] - spans[:, 0])])  # units before span
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        pieces = []
        for (first, end), before in zip(spans.tolist(), starts[:-1].tolist(), strict=True):
            a, b = max(lo, before), min(hi, before + end - first)
            if a < b:
                pieces.append([first + a - before, first + b - before])
        out.append(np.array(pieces, dtype=np.int64).reshape(-1, 2))
    return out


def work_unit_source(plan: SamplePlan, spans: np.ndarray, unit: int):
    """The run's work units as a Ray Data source: `parallelism` read tasks (override_num_blocks),
    each covering a run of units and yielding one block of specs per unit as it goes, so that
    the plan is a handful of objects however large n is. (Read tasks of `ray.data.range` take a
    whole CPU each, which a node that runs fractional-CPU actors may never have free.)"""
    import functools

    from ray.data.block import BlockAccessor, BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read(part: np.ndarray):
        for first, end in part.tolist():
            for u in range(first, end):
                yield BlockAccessor.batch_to_block(unit_specs(plan, u, unit))

    class WorkUnits(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                           data_context=None) -> list:
            tasks = []
            for part in split_units(spans, parallelism):
                rows = int((part[:, 1] - part[:, 0]).sum()) * unit
                meta = BlockMetadata(num_rows=rows, size_bytes=None, input_files=None,
                                     exec_stats=None)
                tasks.append(ReadTask(functools.partial(read, part), meta,
                                      per_task_row_limit=per_task_row_limit))
            return tasks

    return WorkUnits()
