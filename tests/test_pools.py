"""Pool sizing from the cluster, work units, the output probe and the writer's bookkeeping."""

import dataclasses
import re

import numpy as np
import pyarrow as pa
import pytest

import factory.pools
from factory.errors import FactoryError
from factory.pools import LABEL_SHARE, ClusterView, probe_output, size_pools
from factory.writer import WriteResult, block_indices, stage_tags

# The sizing rule is tested at fixed speeds (2026-11-27's figures), so that a new measurement in
# benchmarks/results/ (where IMAGES_PER_S reads them; tests/test_speeds.py) moves no test here.
GENERATOR, GROUNDING, MASKRCNN = 4.41, 126.0, 17.0


@pytest.fixture(autouse=True)
def fixed_speeds(monkeypatch):
    monkeypatch.setattr(factory.pools, "IMAGES_PER_S", {
        "sd generator": GENERATOR, "grounding head": GROUNDING, "mask r-cnn": MASKRCNN})


def view(gen=16, label=1, gpus=17.0, shared=False, max_gen=None, max_label=None):
    """A cluster of `gen` generator slots and `label` labeller slots, one GPU a slot if `gpus`
    (on shared nodes if `shared`); an autoscaler that may grow them to max_gen/max_label if
    those are given."""
    autoscaled = max_gen is not None or max_label is not None
    gpu = 1.0 if gpus else 0.0
    types = (({"gen": gen, "label": label, "GPU": gpus},) if shared else
             ({"gen": 8, "GPU": 8 * gpu}, {"label": 1, "GPU": gpu}))
    return ClusterView(slots={"gen": gen, "label": label},
                       max_slots={"gen": max(gen, max_gen or 0),
                                  "label": max(label, max_label or 0)},
                       gpus=gpus, max_gpus=gpus, autoscaled=autoscaled, node_types=types)


def test_auto_generators_fill_every_gen_slot_and_grow_to_what_the_autoscaler_adds():
    pools = size_pools(view(max_gen=64, max_label=4), units=1000,
                       labeller_images_per_s=GROUNDING)
    gen, lab = pools["generator"], pools["labeller"]
    assert (gen.min_size, gen.max_size, gen.gpus) == (16, 64, 1.0)
    # one grounding-head labeller keeps up with floor(126 / 4.41) = 28 generators
    assert (lab.min_size, lab.max_size, lab.gpus) == (1, 3, 1.0)
    assert gen.bundle() == {"CPU": 0.25, "gen": 1, "GPU": 1.0}


def test_auto_pools_never_exceed_the_work_units():
    gen = size_pools(view(max_gen=64), units=5)["generator"]
    assert (gen.min_size, gen.max_size) == (5, 5)


def test_without_autoscaler_auto_pools_may_grow_onto_nodes_started_by_hand():
    gen = size_pools(view(gen=2, label=1, gpus=0.0), units=12)["generator"]
    assert (gen.min_size, gen.max_size) == (2, 12)


def test_on_this_machines_own_ray_auto_pools_keep_to_its_slots():
    """No host joins a Ray the run started here: an actor beyond the slots would wait for one,
    then start only when the run's last actor frees it, and be stopped at once."""
    local = dataclasses.replace(view(gen=1, label=1, gpus=0.0), local=True)
    pools = size_pools(local, units=12)
    assert [(p.min_size, p.max_size) for p in pools.values()] == [(1, 1), (1, 1)]


@pytest.mark.slow
def test_a_run_without_address_is_on_this_machines_own_ray(ray_local, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ClusterView.current().local and not ClusterView.current("auto").local
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # `ray job submit` sets it for the job
    assert not ClusterView.current().local


def test_mask_rcnn_labellers_are_sized_from_its_slower_speed():
    lab = size_pools(view(gen=16, label=8, gpus=24.0, max_gen=16, max_label=8), units=100,
                     labeller_images_per_s=MASKRCNN)["labeller"]
    assert (lab.min_size, lab.max_size) == (6, 6)  # 17 / 4.41 -> 3 generators each


def test_labellers_on_generator_nodes_get_a_share_of_a_gpu():
    pools = size_pools(view(gen=1, label=1, gpus=1.0, shared=True), units=10,
                       labeller_images_per_s=GROUNDING)
    assert pools["labeller"].gpus == LABEL_SHARE
    assert pools["generator"].gpus == pytest.approx(1 - LABEL_SHARE)


def test_explicit_sizes_are_kept_and_cpu_clusters_ask_no_gpu():
    pools = size_pools(view(gen=4, label=2, gpus=0.0), units=10, generators=3, labellers=2)
    assert [(p.min_size, p.max_size, p.gpus) for p in pools.values()] == [(3, 3, 0.0),
                                                                          (2, 2, 0.0)]


@pytest.mark.parametrize(("cluster", "kwargs", "message"), [
    (view(gen=0, max_gen=0), {}, "no 'gen' resource, which the generator pool needs: start "
                                 "generator nodes with `ray start"),
    (view(label=0), {}, "no 'label' resource, which the labeller pool needs: start labeller "
                        "nodes"),
    (view(gen=2), {"generators": 3}, "3 generators need 3 'gen' slots, but the cluster has 2"),
    (view(gen=4, gpus=2.0), {"generators": 4, "labellers": 1},
     "the pools need 5 GPUs, but the cluster has 2"),
])
def test_pools_the_cluster_cannot_place_are_refused_naming_the_resource(cluster, kwargs,
                                                                         message):
    with pytest.raises(FactoryError, match=re.escape(message)):
        size_pools(cluster, units=10, **kwargs)


def test_a_cold_cluster_takes_the_gpu_share_from_the_node_types_it_can_launch():
    """No node up yet (cluster.yaml's GPU types start at zero): the pools still ask for the
    GPUs the launched nodes will have, from the autoscaler's node types."""
    cold = ClusterView(slots={"gen": 0, "label": 0}, max_slots={"gen": 64, "label": 16},
                       autoscaled=True, gpus=0.0, max_gpus=80.0,
                       node_types=({"CPU": 0},  # the head, alive
                                   {"CPU": 96, "GPU": 8, "gen": 8}, {"CPU": 4, "GPU": 1,
                                                                     "label": 1}))
    pools = size_pools(cold, units=1000, labeller_images_per_s=GROUNDING)
    assert (pools["generator"].gpus, pools["labeller"].gpus) == (1.0, 1.0)
    assert (pools["generator"].min_size, pools["generator"].max_size) == (1, 64)


def test_a_gen_node_the_autoscaler_can_add_is_waited_for_not_refused():
    gen = size_pools(view(gen=0, max_gen=8, max_label=1, label=0, gpus=0.0), units=10)
    assert (gen["generator"].min_size, gen["generator"].max_size) == (1, 8)


@pytest.mark.slow
def test_an_output_a_worker_cannot_see_is_refused_naming_the_node(ray_local, tmp_path):
    with pytest.raises(FactoryError, match=r"the workers cannot use --out .* \(node [0-9a-f]+\)"
                                           r": it has no manifest there"):
        probe_output(str(tmp_path / "elsewhere"))


class Doubler:
    """A stage that raises on every batch holding sample 5 (or any sample, if `all_fail`)."""

    def __init__(self, all_fail=False, device="cpu"):
        self.calls, self.all_fail = [], all_fail

    def __call__(self, batch):
        self.calls.append(batch["index"].tolist())
        if self.all_fail or 5 in batch["index"]:
            raise RuntimeError("a corrupt input")
        return {"index": batch["index"], "double": batch["index"] * 2}


def test_a_unit_that_keeps_failing_stops_the_run_or_goes_sample_by_sample(ray_local):
    from factory.console import StageCounter
    from factory.pools import PoolStage, StageFailure

    counter = ray_local.remote(num_cpus=0)(StageCounter).remote()
    with pytest.raises(StageFailure, match=r"^the labeller stage failed on samples 4-7 "
                                           r"\(RuntimeError: a corrupt input\)$"):
        PoolStage(Doubler, {}, 2, "labeller", counter)({"index": np.arange(4, 8)})
    stage = PoolStage(Doubler, {}, 2, "labeller", counter, skip_failed=True)
    out = stage({"index": np.arange(4, 8)})
    assert stage.stage.calls == [[4, 5], [4, 5], [4], [5], [6], [7]]  # twice whole, then alone
    assert out["index"].tolist() == [4, 6, 7] and out["double"].tolist() == [8, 12, 14]
    assert all(len(out[f"_labeller_{tag}"]) == 3 for tag in ("node", "actor", "busy"))
    skipped, = ray_local.get(counter.skipped.remote())
    assert {k: skipped[k] for k in ("stage", "index", "error")} == {
        "stage": "labeller", "index": 5, "error": "RuntimeError: a corrupt input"}
    assert skipped["traceback"].startswith("Traceback") and "a corrupt input" in skipped[
        "traceback"]
    none = PoolStage(Doubler, dict(all_fail=True), 2, "labeller", counter, skip_failed=True)(
        {"index": np.arange(0, 2)})
    assert none["index"].tolist() == [] and len(none["_labeller_node"]) == 0
    assert [s["index"] for s in ray_local.get(counter.skipped.remote(1))] == [0, 1]
    assert ray_local.get(counter.failed.remote()) == [("labeller", [4, 5, 6, 7],
                                                       "RuntimeError: a corrupt input")]


def test_block_indices_are_the_blocks_index_column():
    assert block_indices(pa.table({"index": [3, 4, 5, 8, 9]})) == [3, 4, 5, 8, 9]
    assert block_indices(pa.table({})) == []  # a unit whose samples were all skipped


def test_stage_tags_give_nodes_and_busy_time_per_actor():
    table = pa.table({"_generator_node": ["n1", "n1", "n2"], "_generator_actor": ["a", "a", "b"],
                      "_generator_busy": [1.0, 1.0, 3.0], "_generator_start": [0.0, 0.0, 1.0],
                      "_generator_end": [2.0, 2.0, 4.0]})
    nodes, busy = stage_tags(table)
    assert nodes == {"generator": ["n1", "n2"]}
    assert busy == {"generator": {"a": [2.0, 0.0, 2.0], "b": [3.0, 1.0, 4.0]}}
    w = WriteResult()
    w.add_busy(busy)
    w.add_busy({"generator": {"a": [1.0, 3.0, 4.0]}})
    # a: 3 s busy from 0 to the stage's end at 4; b: 3 s busy from 1 to 4
    assert w.busy_fraction("generator") == pytest.approx(6 / 7)
    assert w.busy_fraction("labeller") is None


def test_work_units_tile_the_shards_on_a_fixed_grid():
    from factory.store import ShardLayout
    from factory.units import work_units

    layout = ShardLayout(root="/unused", n=10, shard_size=4, kind="triplets")
    assert work_units(layout, [0, 1, 2], unit=3).tolist() == [[0, 4]]  # samples 0..11
    # resuming shard 2 (samples 8, 9): the unit grid does not move, so unit 2 (6..8) is redone
    assert work_units(layout, [2], unit=3).tolist() == [[2, 4]]
    assert np.array_equal(work_units(layout, [0, 2], unit=4), [[0, 1], [2, 3]])


def test_progress_shows_actors_warming_up_then_their_warm_up_time():
    from factory.console import Progress, StageCounter

    counter = StageCounter()  # the Ray actor's class, called directly
    counter.warming("generator")
    counter.warming("generator")
    counter.warmed("generator", 67.4)
    progress = Progress({"generator": 32}, {"generator": "SD generator"})
    line, = progress.lines(counter.counts(), *counter.warm_ups())
    assert line.endswith("1 actor(s) warming up (model load, compile)")
    counter.warmed("generator", 3.2)
    counter.add("generator", 16)
    line, = progress.lines(counter.counts(), *counter.warm_ups())
    assert "16/32 rows" in line and line.endswith("warm-up 67 s")
    assert counter.warm_ups() == ({"generator": 0}, {"generator": [67.4, 3.2]})


def test_each_work_unit_reaches_the_stages_as_a_block_of_its_own(ray_local):
    """A few read tasks make the specs of many units; each unit must still be one block, so
    that the actor pool spreads units over its actors (merged blocks would give one actor a
    read task's every unit)."""
    from factory.graph import READ_TASKS, unit_specs_dataset
    from factory.prompts import SamplePlan
    from factory.store import ShardLayout
    from factory.units import work_units
    from factory.vocab import get_split

    layout = ShardLayout(root="/unused", n=45, shard_size=8, kind="triplets")
    spans = work_units(layout, [0, 1, 3, 4, 5], unit=3)  # shard 2 done: units 0-5, 8-14
    ds = unit_specs_dataset(SamplePlan(get_split("pascal", "1"), "train", 0), spans, 3)
    blocks = [ray_local.get(ref).column("index").to_pylist()
              for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]
    units = [u for first, end in spans.tolist() for u in range(first, end)]
    assert sorted(blocks) == [list(range(3 * u, 3 * u + 3)) for u in units]
    assert len(units) > READ_TASKS
