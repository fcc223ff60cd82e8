"""The plan and the shard writer's bookkeeping as plain Python, without Ray, over random sizes:
any n, shard size, batch sizes, shards already done, read-task count, block splits, skipped
samples and order of arrival. Every planned sample must land in exactly one written shard, and
no shard may be handed out twice."""

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.manifest import COMPACT_GROWTH, Manifest
from factory.store import ShardLayout
from factory.units import split_units, work_units
from factory.writer import ShardAssembly, spans_text, take_shard


@st.composite
def runs(draw):
    """A run's sizes, the shards an earlier run finished, and how its units travel."""
    n = draw(st.integers(1, 3000))
    shard_size = draw(st.one_of(st.integers(1, 64), st.integers(65, 4000)))
    unit = max(draw(st.integers(1, 40)), draw(st.integers(1, 40)))  # batch, label batch
    layout = ShardLayout("/unused", n, shard_size, "triplets")
    done = draw(st.sets(st.integers(0, layout.num_shards - 1)))
    todo = [k for k in range(layout.num_shards) if k not in done]
    read_tasks = draw(st.integers(1, 9))
    return layout, todo, unit, read_tasks, draw(st.randoms(use_true_random=False))


def plan(layout, todo, unit, read_tasks):
    """The units of each read task, in order."""
    parts = split_units(work_units(layout, todo, unit), read_tasks)
    return [[u for first, end in part.tolist() for u in range(first, end)] for part in parts]


def unit_events(u, unit, skip, rng):
    """What the writer sees of unit u: the samples its stages skipped (told first), then its
    rows in one block or split into several."""
    samples = list(range(u * unit, (u + 1) * unit))
    rows = [i for i in samples if i not in skip]
    events = [("skipped", [{"index": i, "stage": "labeller", "error": "E"}
                           for i in samples if i in skip])]
    cuts = sorted(rng.sample(range(1, len(rows)), min(max(len(rows) - 1, 0), rng.randint(0, 2))))
    for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        events.append(("block", rows[a:b]))
    return events


def arrive(tasks, unit, skip, rng, lose=None, again=None):
    """The events of all units, read tasks interleaved at random, each task in its order."""
    queues = [[e for u in t for e in unit_events(u, unit, skip, rng)] for t in tasks]
    out = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    blocks = [i for i, e in enumerate(out) if e[0] == "block" and e[1]]
    if lose is not None and blocks:
        out.pop(blocks[lose % len(blocks)])
    if again is not None and blocks:
        out.insert(rng.randint(0, len(out)), out[blocks[again % len(blocks)]])
    return out


def feed(assembly, events):
    """Feed the events; returns {shard: (its rows' indices as take_shard picks them, skipped)}
    of the shards handed out, failing if one is handed out twice."""
    written, tables = {}, {}
    for e, (kind, payload) in enumerate(events):
        if kind == "skipped":
            _, ready = assembly.add_skipped(payload)
        else:
            tables[e] = pa.table({"index": pa.array(payload, pa.int64())})
            ready = assembly.add_block(e, payload)
        for r in ready:
            assert r.shard not in written, f"shard {r.shard} handed out twice"
            layout = ShardLayout("/unused", assembly.n, assembly.shard_size, "triplets")
            rows = take_shard(layout, r.shard, [tables[b] for b in r.blocks])
            written[r.shard] = (rows.column("index").to_pylist(),
                                [f["index"] for f in r.skipped])
    return written


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.floats(0, 0.3))
def test_every_planned_sample_lands_exactly_once(run, skip_share):
    layout, todo, unit, read_tasks, rng = run
    tasks = plan(layout, todo, unit, read_tasks)
    units = [u for t in tasks for u in t]
    assert len(units) == len(set(units)) and len(tasks) <= read_tasks
    planned = {i for k in todo for i in layout.shard_rows(k)}
    assert planned <= {i for u in units for i in range(u * unit, (u + 1) * unit)}
    skip = {i for i in planned if rng.random() < skip_share}
    assembly = ShardAssembly(layout.n, layout.shard_size, todo)
    written = feed(assembly, arrive(tasks, unit, skip, rng))
    assert sorted(written) == todo and assembly.problems() == {}
    for k, (rows, skipped) in written.items():
        assert sorted(rows + skipped) == list(layout.shard_rows(k))  # none twice, none past n
        assert set(skipped) == skip & set(layout.shard_rows(k))
    assert not (assembly.rows or assembly.skips or assembly.blocks)  # nothing kept once done


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.integers(0, 10**6), st.booleans())
def test_a_lost_or_repeated_block_holds_back_only_its_shards(run, which, lose):
    layout, todo, unit, read_tasks, rng = run
    tasks = plan(layout, todo, unit, read_tasks)
    assembly = ShardAssembly(layout.n, layout.shard_size, todo)
    events = arrive(tasks, unit, set(), rng, **({"lose": which} if lose else {"again": which}))
    written = feed(assembly, events)
    problems = assembly.problems()
    assert sorted([*written, *problems]) == todo  # every shard written or named, not both
    for k, (rows, _) in written.items():
        assert sorted(rows) == list(layout.shard_rows(k))
    for why in problems.values():
        assert ("never arrived" if lose else "arrived twice") in why
    planned = {i for k in todo for i in layout.shard_rows(k)}
    rows = [i for kind, payload in events if kind == "block" for i in payload if i in planned]
    if len(rows) > len(set(rows)):  # a planned row repeated: its shard held back, or the
        assert problems or assembly.late  # repeat, after the shard was written, set apart


def test_rows_past_n_and_of_finished_shards_are_dropped_before_they_count():
    assembly = ShardAssembly(n=8, shard_size=256, planned=[0])
    assert assembly.add_block("a", range(0, 16)) and assembly.problems() == {}  # n=8, unit 16
    assembly = ShardAssembly(n=10, shard_size=4, planned=[0, 2])  # shard 1 done earlier
    assert [r.shard for r in assembly.add_block("a", range(0, 6))] == [0]
    assert [r.shard for r in assembly.add_block("b", range(6, 12))] == [2]


def test_problems_name_the_shard_and_the_samples():
    assembly = ShardAssembly(n=10, shard_size=4, planned=[0, 1, 2])
    assembly.add_block("a", [0, 1, 2, 3, 3])
    assembly.add_block("b", [4, 5, 9])
    assert assembly.problems() == {0: "samples 3 arrived twice",
                                   1: "samples 6-7 never arrived",
                                   2: "samples 8 never arrived"}
    assert spans_text([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_split_units_covers_each_unit_once_in_order(parts):
    spans = np.array([[0, 3], [5, 6], [9, 14]])
    got = split_units(spans, parts)
    units = [u for p in got for first, end in p.tolist() for u in range(first, end)]
    assert units == [0, 1, 2, 5, 9, 10, 11, 12, 13] and len(got) == min(parts, 9)
    assert max(map(len, map(list, got))) - min(map(len, map(list, got))) <= 2


def test_the_manifest_is_compacted_when_a_share_of_new_records_is_in(tmp_path, monkeypatch):
    """Bytes written per shard stay constant: a compaction is due only after COMPACT_EVERY_S
    and once the new records are 1/COMPACT_GROWTH of those compacted."""
    import factory.manifest

    now = [0.0]
    monkeypatch.setattr(factory.manifest.time, "monotonic", lambda: now[0])
    layout = ShardLayout(str(tmp_path), n=10**6, shard_size=1, kind="triplets")
    m = Manifest(layout, {"run": {}})
    written, shards = [], 0
    for step in range(4000):
        now[0] += 1.0  # a shard a second
        m.add({step: {"rows": 1, "bytes": 100, "sha256": "0" * 64}})
        shards += 1
        if m.compact(force=False):
            written.append((shards, m.bytes_written / shards))
    assert len(written) > 5 and m.compacted >= 3000
    late = [b for shards, b in written if shards >= 1000]  # 4x the shards: flat, not 4x
    assert max(late) < 1.2 * min(late)
    final = len(json.dumps(m.data, indent=2))
    assert m.bytes_written < (COMPACT_GROWTH + 2) * final
