"""A run's Ray Data graph: work units (sample specs) -> generator pool -> labeller pool -> rows
of the store's schema, tagged for the shard writer. It wires stages; the models live in
`actors/`, the pools' sizing and placement in factory/pools.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from factory.options import RunOptions
from factory.pools import STAGE_CPUS
from factory.prompts import SamplePlan
from factory.store import ShardStore

# Read tasks that make the sample specs: each covers a run of units and yields a block per
# unit, so the plan is a few objects at any n; a few suffice (specs cost microseconds) and
# each holds a CPU share while the pools drain it.
READ_TASKS = 4


@dataclass(frozen=True)
class Labeller:
    """A run's second actor pool, and how its outputs become rows of the store."""

    cls: type
    kwargs: dict
    to_rows: Callable
    rows_kwargs: dict
    images_per_s: float  # measured speed, for sizing `auto` pools against the generators
    keep: Callable | None = None  # table -> bool mask of rows to write


def unit_specs_dataset(plan: SamplePlan, spans: np.ndarray, unit: int):
    """The specs of the work units `spans` as a dataset of one block per unit, from a few read
    tasks."""
    import ray

    from factory.units import work_unit_source

    units = int((spans[:, 1] - spans[:, 0]).sum())
    return (ray.data.read_datasource(work_unit_source(plan, spans, unit), num_cpus=STAGE_CPUS,
                                     override_num_blocks=min(units, READ_TASKS))
            # a read task's small blocks are merged on their way out: cut them back into
            # units, so that each unit is one call of one actor of the pool
            .repartition(target_num_rows_per_block=unit, strict=True))


def build_dataset(o: RunOptions, plan: SamplePlan, store: ShardStore, spans: np.ndarray,
                  unit: int, labeller: Labeller, pools: dict, counter=None,
                  skip_failed: bool = False):
    """The run's Ray Data graph: work units (sample specs) -> generator pool -> labeller pool
    -> rows (with the stages' tags for the writer). With `skip_failed` the stages leave out
    the samples they keep failing on (see PoolStage)."""
    from actors.sd_generator import SDGenerator
    from factory.pools import GeneratorStage, LabellerStage
    from factory.writer import tagged_rows

    run = store.manifest["run"]
    gen, lab = pools["generator"], pools["labeller"]
    rows = (tagged_rows, dict(
        to_rows=labeller.to_rows, split=run["split"], fold=run["fold"], subset=run["subset"],
        run_seed=o.seed, sd_model=run["model"], **labeller.rows_kwargs))
    return (
        unit_specs_dataset(plan, spans, unit)
        .map_batches(
            GeneratorStage, batch_size=unit, **gen.ray_args(), fn_constructor_kwargs=dict(
                stage=SDGenerator, batch_size=o.batch_size, name="generator", progress=counter,
                skip_failed=skip_failed, device=gen.device(o.device),
                kwargs=dict(model=run["model"], steps=o.steps, guidance=run["guidance"],
                            feature_step=run["feature_step"], precision=o.precision,
                            compile=o.compile, compile_cache=o.compile_cache,
                            batch_size=o.batch_size, fp8=o.fp8)))
        .map_batches(  # rows made in the labeller actors: no task of its own (on the head)
            LabellerStage, batch_size=unit, **lab.ray_args(), fn_constructor_kwargs=dict(
                stage=labeller.cls, kwargs=labeller.kwargs, batch_size=o.label_batch_size,
                name="labeller", progress=counter, skip_failed=skip_failed,
                device=lab.device(o.device), rows=rows))
    )
