"""The shard writer. The driver plans the shards and watches them complete; sample bytes never
pass through it. It consumes the pipeline as block references (`iter_internal_ref_bundles`),
learns from a tiny task next to each block which samples it holds, and when all of a shard's
samples are in, starts a write task on the node that holds its blocks, which assembles the
shard, writes it and its record atomically to the output location and returns the record. The
bookkeeping is `ShardAssembly`, plain Python; `ShardWriter` is the thin Ray loop around it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.errors import RunFailure
from factory.pools import STAGE_CPUS
from factory.store import ShardLayout, ShardStore

log = logging.getLogger(__name__)

TAG = "_"  # stage columns that start with this are tags for the writer (pools.PoolStage)
STAGES = ("generator", "labeller")
# Summary and write tasks the driver keeps in flight: past this it stops pulling blocks, and Ray
# Data's backpressure holds the pipeline, so the driver's objects stay bounded at any n.
IN_FLIGHT = 64


def spans_text(indices: Iterable[int]) -> str:
    """Sample indices as short text: "3, 7-9, 12"."""
    out, run = [], []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


@dataclass(frozen=True)
class ReadyShard:
    """A shard whose samples are all in: the blocks that hold its rows and the samples the
    stages skipped ({"index", "stage", "error", ...})."""

    shard: int
    blocks: list
    skipped: list[dict]


class ShardAssembly:
    """Which planned shards are complete, from the sample indices of each block as it arrives
    and the samples the stages skipped. Rows past n and rows of shards not planned (finished by
    an earlier run, which a work unit may straddle) are dropped before they are counted. A
    shard whose every sample is in, as a row or skipped, is ready, once. A sample whose row
    arrives twice holds its unwritten shard back, and `problems` names it at the end, with the
    shards left incomplete. A row outranks a report that its sample was skipped (an actor that
    reported a skip and then died: its unit's retry made the row). Memory: the indices of
    incomplete shards only."""

    def __init__(self, n: int, shard_size: int, planned: Iterable[int]) -> None:
        self.n, self.shard_size = n, shard_size
        self.planned = set(planned)
        self.rows: dict[int, set[int]] = {}  # incomplete shard -> samples whose row is in
        self.skips: dict[int, dict[int, dict]] = {}  # incomplete shard -> index -> skip report
        self.blocks: dict[int, list] = {}  # incomplete shard -> blocks with its rows
        self.started: set[int] = set()  # shards handed out to be written
        self.twice: dict[int, set[int]] = {}  # shard -> samples whose row arrived again
        self.late: dict[int, set[int]] = {}  # written shard -> samples that arrived again

    def size(self, k: int) -> int:
        return min((k + 1) * self.shard_size, self.n) - k * self.shard_size

    def _by_shard(self, indices) -> dict[int, list[int]]:
        indices = np.asarray(indices, dtype=np.int64)
        indices = indices[(indices >= 0) & (indices < self.n)]
        shards = indices // self.shard_size
        return {k: indices[shards == k].tolist() for k in np.unique(shards).tolist()
                if k in self.planned}

    def _ready(self, shards) -> list[ReadyShard]:
        ready = []
        for k in shards:
            rows, skips = self.rows.get(k, set()), self.skips.get(k, {})
            if (k in self.started or k in self.twice
                    or len(rows) + sum(i not in rows for i in skips) != self.size(k)):
                continue
            self.started.add(k)
            self.rows.pop(k, None)
            self.skips.pop(k, None)
            ready.append(ReadyShard(k, self.blocks.pop(k, []),
                                    [f for i, f in sorted(skips.items()) if i not in rows]))
        return ready

    def add_block(self, block: Hashable, indices) -> list[ReadyShard]:
        """A block with rows of these sample indices arrived: the shards it completes."""
        parts = self._by_shard(indices)
        for k, part in parts.items():
            if k in self.started:
                self.late.setdefault(k, set()).update(part)
                continue
            rows = self.rows.setdefault(k, set())
            again = rows.intersection(part)
            if len(set(part)) < len(part):  # twice within the block itself
                again |= {i for i, c in collections.Counter(part).items() if c > 1}
            if again:
                self.twice.setdefault(k, set()).update(again)
            rows.update(part)
            self.blocks.setdefault(k, []).append(block)
        return self._ready(parts)

    def add_skipped(self, samples: list[dict]) -> tuple[list[dict], list[ReadyShard]]:
        """Samples the stages left out ({"index", ...}): those newly known of planned,
        unwritten shards, and the shards they complete."""
        taken = []
        for f in samples:
            i = f["index"]
            for k in self._by_shard([i]):
                if (k in self.started or i in self.rows.get(k, ())
                        or i in self.skips.get(k, {})):
                    continue  # a row outranks it, or a retried unit reported it again
                self.skips.setdefault(k, {})[i] = f
                taken.append(f)
        return taken, self._ready({f["index"] // self.shard_size for f in taken})

    def problems(self) -> dict[int, str]:
        """At the end: {shard: what is wrong} for every planned shard not handed out."""
        out = {}
        for k in sorted(self.planned - self.started):
            first = k * self.shard_size
            missing = (set(range(first, first + self.size(k))) - self.rows.get(k, set())
                       - set(self.skips.get(k, {})))
            why = []
            if k in self.twice:
                why.append(f"samples {spans_text(self.twice[k])} arrived twice")
            if missing:
                why.append(f"samples {spans_text(missing)} never arrived")
            out[k] = "; ".join(why)
        return out


def tagged_rows(batch: dict[str, np.ndarray], *, to_rows: Callable, **kwargs) -> pa.Table:
    """The last stage's outputs -> rows of the store's schema (`to_rows`), with the pool
    stages' tag columns carried along for the writer."""
    table = to_rows({k: v for k, v in batch.items() if not k.startswith(TAG)}, **kwargs)
    for k, v in batch.items():
        if k.startswith(TAG):
            table = table.append_column(k, pa.array(v.tolist()))
    return table


def block_indices(block: pa.Table) -> list[int]:
    """The sample indices of a block's rows (run as a task next to the block)."""
    if not block.num_rows:  # a unit whose every sample was skipped: Ray Data passes an empty
        return []  # block on, without columns
    return block.column("index").to_pylist()


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


def take_shard(layout: ShardLayout, k: int, blocks) -> pa.Table:
    """Shard k's rows out of the blocks that hold them (which may hold rows of other shards,
    and past n)."""
    if not blocks:  # every sample of the shard failed
        return layout.schema.empty_table()
    rows = layout.shard_rows(k)
    table = pa.concat_tables(blocks, promote_options="none")
    index = table.column("index")
    return table.filter(pc.and_(pc.greater_equal(index, rows.start), pc.less(index, rows.stop)))


def write_shard(layout: ShardLayout, k: int, keep: Callable | None, failed: list[dict],
                *blocks: pa.Table) -> dict:
    """In a worker: shard k's rows from `blocks` -> one atomic shard file and its record file.
    Rows `keep` rejects are left out and listed, and so are the `failed` samples, which no
    block holds. Returns {"record": the shard's record, "busy": ...}."""
    import ray

    table = take_shard(layout, k, blocks)
    nodes, busy = stage_tags(table)
    rows = table.select(layout.schema.names).cast(layout.schema)
    dropped: list[int] = []
    if keep is not None:
        mask = keep(rows)
        dropped = rows.filter(pc.invert(mask)).column("index").to_pylist()
        rows = rows.filter(mask)
    record = layout.write(k, rows, dropped, failed,
                          node=ray.get_runtime_context().get_node_id(),
                          written_at=time.time(),  # unix seconds: the run's timeline
                          **{f"{stage}s": ids for stage, ids in nodes.items()})
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


def near(blocks: list):
    """A scheduling strategy for a task on `blocks`: on the node that holds most of their
    bytes (soft: elsewhere if it is gone), so that no block crosses the network, nor lands on
    the head for lack of a better rule; the default where Ray knows no location."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    held: dict[str, int] = collections.Counter()
    for where in ray.experimental.get_object_locations(blocks).values():
        for node in where.get("node_ids") or ():
            held[node] += where.get("object_size") or 0
    if not held:
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(max(held, key=held.get), soft=True)


class ShardWriter:
    """Runs a pipeline (rows of the `shards` planned, with stage tags) and writes each shard
    from the workers as soon as its samples are in. `skipped()` returns the samples the stages
    left out since its last call (`PoolStage` with `skip_failed`), which are reported before
    any rows of their unit come out; those of planned shards go to `on_skipped` (which may stop
    the run) and into their shard's record. Records enter the manifest as they arrive, which is
    compacted when due and at the end, whatever happens."""

    def __init__(self, store: ShardStore, shards: list[int], keep: Callable | None = None,
                 on_progress: Callable[[WriteResult], None] | None = None,
                 skipped: Callable[[], list[dict]] | None = None,
                 on_skipped: Callable[[list[dict]], None] | None = None) -> None:
        import ray

        self.store, self.keep = store, keep
        self.on_progress, self.skipped, self.on_skipped = on_progress, skipped, on_skipped
        self.assembly = ShardAssembly(store.n, store.shard_size, shards)
        self.summarize = ray.remote(num_cpus=0)(block_indices)
        self.writer = ray.remote(num_cpus=STAGE_CPUS)(write_shard)
        self.summaries: dict = {}  # summary ref -> block ref
        self.writes: dict = {}  # write ref -> shard
        self.out = WriteResult()

    def run(self, ds) -> WriteResult:
        try:
            for bundle in ds.iter_internal_ref_bundles():
                if any(s is not None for s in bundle.slices):
                    raise RuntimeError("the pipeline handed out a sliced block; shards need "
                                       "whole ones")
                for ref in bundle.block_refs:
                    task = self.summarize.options(scheduling_strategy=near([ref]))
                    self.summaries[task.remote(ref)] = ref
                self._settle(0)
                while len(self.summaries) + len(self.writes) > IN_FLIGHT:
                    self._settle(1.0)
            while self.summaries or self.writes:
                self._settle(1.0)
            if self.skipped is not None:  # a last unit whose every sample was skipped adds
                self._take_skipped()  # no block
                while self.writes:
                    self._settle(1.0)
        finally:
            self.store.compact()
        self._check_complete()
        return self.out

    def _start(self, ready: list[ReadyShard]) -> None:
        for r in ready:
            why = [{key: f[key] for key in ("index", "stage", "error")} for f in r.skipped]
            task = self.writer.options(scheduling_strategy=near(r.blocks))
            self.writes[task.remote(self.store.layout, r.shard, self.keep, why,
                                    *r.blocks)] = r.shard

    def _take_skipped(self) -> None:
        taken, ready = self.assembly.add_skipped(self.skipped())
        if taken:
            self.out.failed += len(taken)
            if self.on_skipped is not None:
                self.on_skipped(taken)
        self._start(ready)

    def _settle(self, timeout: float) -> None:
        import ray

        pending = list(self.summaries) + list(self.writes)
        if not pending:
            return
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        if self.skipped is not None:  # after the wait: a ready block's skipped samples are known
            self._take_skipped()
        for ref in ready:
            if ref in self.summaries:
                block = self.summaries.pop(ref)
                self._start(self.assembly.add_block(block, ray.get(ref)))
            else:
                self._written(self.writes.pop(ref), ray.get(ref))
        if self.on_progress is not None:
            self.on_progress(self.out)

    def _written(self, k: int, done: dict) -> None:
        record = done["record"]
        self.store.add_records({k: record})
        self.store.compact(force=False)
        self.out.written += record["rows"]
        self.out.dropped += len(record["dropped"])
        self.out.shards += 1
        self.out.add_busy(done["busy"])
        log.debug("shard %d written by node %s: %d rows, %d bytes", k, record["node"],
                  record["rows"], record["bytes"])

    def _check_complete(self) -> None:
        """Every planned sample must have come back exactly once: the shards that did are
        written; the others are named in one line, with the details in the run's log."""
        from factory.console import RUN_LOG

        for k, again in sorted(self.assembly.late.items()):
            log.warning("samples %s of shard %d arrived again after it was written; the shard "
                        "was kept as first written", spans_text(again), k)
        problems = self.assembly.problems()
        if not problems:
            return
        for k, why in problems.items():
            RUN_LOG.error("shard %d (samples %d-%d) was not written: %s", k,
                          k * self.store.shard_size,
                          k * self.store.shard_size + self.assembly.size(k) - 1, why)
        first = next(iter(problems))
        more = f" and {len(problems) - 1} more shards" if len(problems) > 1 else ""
        raise RunFailure(f"the pipeline left shard {first} incomplete ({problems[first]}){more};"
                         f" the {self.out.shards} shards completed are written; rerun the same "
                         f"command to make the rest; details in {self.store.log_path}")
