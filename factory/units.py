"""Work units: the grid of sample indices a run's generation is cut into, and the Ray Data
source that makes each unit's sample specs.

Units are `unit` samples each (a few batches, much smaller than a shard), so that the last wave
of a run leaves no GPU idle for long. Unit j holds samples [j * unit, (j + 1) * unit) whatever
is left to do, so a resumed run redoes whole units (rows of finished shards, and past n, are
dropped by the writer). Every unit is exactly `unit` rows, so Ray Data hands each stage one whole
unit per call, and a unit's batches, hence its outputs, are the same in every run, resumed or
disturbed by a lost node.
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


def work_unit_source(plan: SamplePlan, spans: np.ndarray, unit: int):
    """The run's work units as a Ray Data source: one read task, making one block of specs, per
    unit. (Read tasks of `ray.data.range` take a whole CPU each, which a node that runs
    fractional-CPU actors may never have free.)"""
    import functools

    from ray.data.block import BlockAccessor, BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read(u: int):
        return [BlockAccessor.batch_to_block(unit_specs(plan, u, unit))]

    class WorkUnits(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                           data_context=None) -> list:
            meta = BlockMetadata(num_rows=unit, size_bytes=None, input_files=None,
                                 exec_stats=None)
            return [ReadTask(functools.partial(read, u), meta,
                             per_task_row_limit=per_task_row_limit)
                    for first, end in spans for u in range(int(first), int(end))]

    return WorkUnits()
