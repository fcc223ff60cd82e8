"""The shard writer. The driver plans the shards and watches them complete; sample bytes never
pass through it. It consumes the pipeline as block references (`iter_internal_ref_bundles`),
learns from a tiny task next to each block which shards its rows belong to, and when all of a
shard's rows are in, starts a write task (which Ray places next to the data) that assembles the
shard, writes it atomically to the output location and returns its record: rows, bytes,
checksum, the node that wrote it and the nodes whose actors made its rows. The driver enters
each record in the manifest as it arrives, so memory stays flat as n grows.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.pools import STAGE_CPUS
from factory.store import ShardLayout, ShardStore

log = logging.getLogger(__name__)

TAG = "_"  # stage columns that start with this are tags for the writer (pools.PoolStage)
STAGES = ("generator", "labeller")


def tagged_rows(batch: dict[str, np.ndarray], *, to_rows: Callable, **kwargs) -> pa.Table:
    """The last stage's outputs -> rows of the store's schema (`to_rows`), with the pool
    stages' tag columns carried along for the writer."""
    table = to_rows({k: v for k, v in batch.items() if not k.startswith(TAG)}, **kwargs)
    for k, v in batch.items():
        if k.startswith(TAG):
            table = table.append_column(k, pa.array(v.tolist()))
    return table


def block_shards(block: pa.Table, shard_size: int) -> dict[int, int]:
    """{shard: rows} of one block (run as a task next to the block)."""
    if not block.num_rows:  # a unit whose every sample was skipped: Ray Data passes an empty
        return {}  # block on without calling the later stages, and without columns
    shards, counts = np.unique(np.asarray(block.column("index")) // shard_size,
                               return_counts=True)
    return dict(zip(shards.tolist(), counts.tolist(), strict=True))


def add_busy(per: dict[str, list[float]], actor: str, busy: float, start: float,
             end: float) -> None:
    """Add a call (or a shard's calls) to an actor's [busy seconds, first start, last end]."""
    acc = per.setdefault(actor, [0.0, start, end])
    acc[0] += busy
    acc[1], acc[2] = min(acc[1], start), max(acc[2], end)


def stage_tags(table: pa.Table) -> tuple[dict, dict]:
    """A shard's tag columns -> ({stage: [node ids]}, {stage: {actor: [busy s, first start,
    last end]}})."""
    nodes, busy = {}, {}
    for stage in STAGES:
        if f"_{stage}_node" not in table.column_names:
            continue
        nodes[stage] = sorted(set(table.column(f"_{stage}_node").to_pylist()))
        per: dict[str, list[float]] = {}
        cols = [table.column(f"_{stage}_{c}").to_pylist()
                for c in ("actor", "busy", "start", "end")]
        for actor, b, start, end in zip(*cols, strict=True):
            add_busy(per, actor, b, start, end)
        busy[stage] = per
    return nodes, busy


def write_shard(layout: ShardLayout, k: int, keep: Callable | None, failed: list[dict],
                *blocks: pa.Table) -> dict:
    """In a worker: shard k's rows from `blocks` -> one atomic shard file. Rows `keep` rejects
    are left out and listed, and so are the `failed` samples, which no block holds. Returns
    {"record": the shard's manifest record, "busy": ...}."""
    import ray

    if blocks:
        table = pa.concat_tables(blocks, promote_options="none")
        table = table.filter(pc.equal(pc.divide(table.column("index"), layout.shard_size), k))
    else:  # every sample of the shard failed
        table = layout.schema.empty_table()
    nodes, busy = stage_tags(table)
    rows = table.select(layout.schema.names).cast(layout.schema)
    dropped: list[int] = []
    if keep is not None:
        mask = keep(rows)
        dropped = rows.filter(pc.invert(mask)).column("index").to_pylist()
        rows = rows.filter(mask)
    record = layout.write(k, rows, dropped, failed)
    record["node"] = ray.get_runtime_context().get_node_id()
    record["written_at"] = time.time()  # unix seconds: the run's timeline, for monitoring
    for stage, ids in nodes.items():
        record[f"{stage}s"] = ids
    return {"record": record, "busy": busy}


@dataclass
class WriteResult:
    written: int = 0  # samples written
    dropped: int = 0  # samples left out by `keep`
    failed: int = 0  # samples left out because a stage kept failing on them
    shards: int = 0
    busy: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # see stage_tags

    def add_busy(self, busy: dict) -> None:
        for stage, per in busy.items():
            mine = self.busy.setdefault(stage, {})
            for actor, (b, start, end) in per.items():
                add_busy(mine, actor, b, start, end)

    def busy_fraction(self, stage: str) -> float | None:
        """The share of the stage's actor time spent inside calls: busy seconds over, for each
        actor, the span from its first call to the stage's last call end. Idle gaps between
        work units and actors idling in the last wave both count against it."""
        per = self.busy.get(stage)
        if not per:
            return None
        end = max(e for _, _, e in per.values())
        span = sum(end - s for _, s, _ in per.values())
        return sum(b for b, _, _ in per.values()) / span if span > 0 else None


def write_shards(ds, store: ShardStore, shards: list[int], keep: Callable | None = None,
                 on_progress: Callable[[WriteResult], None] | None = None,
                 skipped: Callable[[], list[dict]] | None = None,
                 on_skipped: Callable[[list[dict]], None] | None = None) -> WriteResult:
    """Run the pipeline `ds` (rows of `shards`, with stage tags) and write each shard from the
    workers as soon as its rows are in; returns what was written. `skipped()` returns the
    samples the stages left out since its last call (`PoolStage` with `skip_failed`), which
    are reported before any rows of their unit come out: a shard is complete when its rows
    and its skipped samples add up. Those of the planned shards go to `on_skipped` (which may
    stop the run) and into their shard's record."""
    import ray

    layout = store.layout
    summarize = ray.remote(num_cpus=0)(block_shards)
    writer = ray.remote(num_cpus=STAGE_CPUS)(write_shard)
    expect = {k: len(layout.shard_rows(k)) for k in shards}
    have: collections.Counter = collections.Counter()
    blocks: dict[int, list] = collections.defaultdict(list)
    failed: dict[int, dict[int, dict]] = collections.defaultdict(dict)  # shard -> index -> why
    started: set[int] = set()  # shards whose write task is out
    summaries: dict = {}  # summary ref -> block ref
    writes: dict = {}  # write ref -> shard
    out = WriteResult()

    def start_complete(candidates) -> None:
        for k in candidates:
            if k in started:
                continue
            if have[k] + len(failed[k]) == expect[k]:
                started.add(k)
                why = [{key: f[key] for key in ("index", "stage", "error")}
                       for f in failed[k].values()]
                writes[writer.remote(layout, k, keep, why, *blocks.pop(k, []))] = k
            elif have[k] + len(failed[k]) > expect[k]:
                raise RuntimeError(f"the pipeline made shard {k}'s rows twice")

    def take_skipped() -> None:
        new = []
        for f in skipped():
            k = f["index"] // layout.shard_size
            if k in expect and k not in started and f["index"] not in failed[k]:
                failed[k][f["index"]] = f
                new.append(f)
        if new:
            out.failed += len(new)
            if on_skipped is not None:
                on_skipped(new)
            start_complete({f["index"] // layout.shard_size for f in new})

    def settle(timeout: float) -> None:
        pending = list(summaries) + list(writes)
        if not pending:
            return
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        if skipped is not None:  # after the wait: a ready block's skipped samples are known
            take_skipped()
        for ref in ready:
            if ref in summaries:
                block = summaries.pop(ref)
                counts = {k: n for k, n in ray.get(ref).items() if k in expect}
                for k, n in counts.items():  # others: a unit's rows of a done shard, or past n
                    blocks[k].append(block)
                    have[k] += n
                start_complete(counts)
            else:
                k = writes.pop(ref)
                done = ray.get(ref)
                record = done["record"]
                store.record_shards({k: record})
                out.written += record["rows"]
                out.dropped += len(record["dropped"])
                out.shards += 1
                out.add_busy(done["busy"])
                log.debug("shard %d written by node %s: %d rows, %d bytes", k,
                          record["node"], record["rows"], record["bytes"])
        if on_progress is not None:
            on_progress(out)

    for bundle in ds.iter_internal_ref_bundles():
        if any(s is not None for s in bundle.slices):
            raise RuntimeError("the pipeline handed out a sliced block; shards need whole ones")
        for ref in bundle.block_refs:
            summaries[summarize.remote(ref, layout.shard_size)] = ref
        settle(0)
    while summaries or writes:
        settle(1.0)
    if skipped is not None:  # a last unit whose every sample was skipped adds no block
        take_skipped()
        while writes:
            settle(1.0)
    missing = sorted(set(shards) - set(store.shards))
    if missing:  # every planned row must come back exactly once
        raise RuntimeError(f"the pipeline ended with shards {missing} incomplete")
    return out
