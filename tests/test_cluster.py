"""`factory generate` on a multi-node Ray cluster simulated on this machine (tests/simcluster.py):
a head with a CPU and no stage resource, two `gen` nodes and one `label` node, tiny models. The
driver is its own process, joining with --address as on a real cluster."""

import json
import os
import time

import pyarrow.parquet as pq
import pytest
from simcluster import driver, simulated_cluster

from factory.store import ShardStore

pytestmark = pytest.mark.slow

RUN = ["generate", "--split", "pascal", "--n", "16", "--shard-size", "4", "--model", "tiny",
       "--steps", "200", "--batch-size", "2", "--label-batch-size", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(gen_nodes=2, label_nodes=1) as sim:
        yield sim


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def undisturbed(cluster, tmp_path_factory):
    """A run on the cluster as it is, its driver watched by a ray.get spy."""
    root = tmp_path_factory.mktemp("cl")
    out, report = str(root / "out"), str(root / "report.json")
    code, stdout, err = finish(driver([*RUN, "--address", cluster.address, "--out", out],
                                      report=report))
    assert code == 0, err
    with open(report) as f:
        fetched = json.load(f)["fetched"]
    return out, stdout, err, fetched


def shard_bytes(out: str) -> dict[int, bytes]:
    store = ShardStore.open(out)
    return {k: open(store.shard_path(k), "rb").read() for k in store.finished()}


def test_stages_run_on_their_node_groups_and_every_shard_is_recorded(cluster, undisturbed):
    out, stdout, _, _ = undisturbed
    store = ShardStore.open(out)
    gen = {n.node_id for n in cluster.gen}
    label = {n.node_id for n in cluster.label}
    assert "wrote 16 samples (4 shards)" in stdout
    assert sorted(store.records) == list(range(4)) == store.finished()
    for k, rec in store.records.items():
        data = open(store.shard_path(k), "rb").read()
        assert rec["rows"] == 4 and rec["bytes"] == len(data)
        assert set(rec["generators"]) <= gen and set(rec["labellers"]) <= label
        assert rec["node"] in gen | label  # not the head, though it has a CPU
    assert pq.read_table(store.data_dir).num_rows == 16


def test_auto_pools_fill_every_gen_slot(cluster, undisturbed):
    out, _, err, _ = undisturbed
    store = ShardStore.open(out)
    used = {n for rec in store.records.values() for n in rec["generators"]}
    assert used == {n.node_id for n in cluster.gen}  # both gen nodes made rows
    assert "generators 2-" in err or "generators 2 " in err  # the pool started at 2 slots


def test_no_row_reaches_the_driver(undisturbed):
    _, _, _, fetched = undisturbed
    kinds = {kind for kind, _ in fetched}
    assert not {k for k in kinds if "pyarrow" in k or "pandas" in k or "numpy" in k}, kinds
    # what it fetched: block summaries, write records, Ray Data's metadata; all small
    assert max(size for _, size in fetched) < 16_000


def test_the_console_shows_progress_lines_not_ray_internals(undisturbed):
    out, stdout, err, _ = undisturbed
    assert stdout.strip().splitlines() == [stdout.strip()]  # the final line only
    lines = err.strip().splitlines()
    assert any(line.startswith("SD generator") and "images/s" in line for line in lines)
    assert not [line for line in lines if "Dataset" in line or "Running" in line or
                "ray" in line.lower() and "log" not in line.lower()], lines
    with open(os.path.join(out, "factory.log")) as f:
        assert f.read()  # Ray's own messages went here


@pytest.fixture(scope="module")
def disturbed(cluster, undisturbed, tmp_path_factory):
    """The same run, during which both gen nodes are lost and a new one (two slots) joins, so
    the work left must move there."""
    out = str(tmp_path_factory.mktemp("cl") / "out")
    proc = driver([*RUN, "--address", cluster.address, "--out", out])
    deadline = time.time() + 300
    while not (os.path.isfile(os.path.join(out, "manifest.json")) and ShardStore.open(out).records):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    lost = list(cluster.gen)
    for node in lost:
        cluster.remove(node)
    added = cluster.add("gen", slots=2)
    code, stdout, err = finish(proc)
    assert code == 0, err
    return out, [n.node_id for n in lost], added.node_id


def test_lost_gen_nodes_leave_every_index_once_and_identical_shards(undisturbed, disturbed):
    out, _, _ = disturbed
    store = ShardStore.open(out)
    rows = pq.read_table(store.data_dir, columns=["index"]).column("index").to_pylist()
    assert sorted(rows) == list(range(16))
    assert shard_bytes(out) == shard_bytes(undisturbed[0])


def test_a_node_added_mid_run_gets_work(disturbed):
    out, _, added = disturbed
    used = {n for rec in ShardStore.open(out).records.values() for n in rec["generators"]}
    assert added in used


def test_a_cluster_without_labeller_nodes_is_refused_in_one_line(cluster, tmp_path, disturbed):
    for node in list(cluster.label):  # runs last: the other tests need the label node
        cluster.remove(node)
    out = str(tmp_path / "out")
    code, _, err = finish(driver([*RUN, "--address", cluster.address, "--out", out]))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and "notice: no --pairs file" in lines[0]
    assert lines[1].startswith("factory: error: the Ray cluster has no 'label' resource")
    assert "--resources='{\"label\": N}'" in lines[1]
    assert not os.path.exists(out)
