"""The training stream both Ray Train jobs read (`train.stream`), and the grounding job's batches
from it (`train.grounding.data`)."""

import numpy as np
import pytest

from factory.store import ShardStore
from train.grounding.data import check_training_data, load_batch, shard_groups
from train.stream import stream, worker_items

GROUPS = [range(5), range(3), range(4)]  # 12 items an epoch


def test_each_epoch_visits_every_item_once_in_its_own_seeded_order():
    whole = stream(GROUPS, seed=7, start=0, count=36)
    assert [r["position"] for r in whole] == list(range(36))
    epochs = [[(r["group"], r["member"]) for r in whole[e * 12:(e + 1) * 12]] for e in range(3)]
    everything = sorted((g, m) for g, members in enumerate(GROUPS) for m in members)
    assert all(sorted(e) == everything for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # shuffled anew each epoch
    for e in epochs:  # a group's members come together: a batch reads few shards
        groups = [g for g, _ in e]
        assert sum(a != b for a, b in zip(groups[:-1], groups[1:], strict=True)) == 2
    assert stream(GROUPS, seed=7, start=0, count=36) == whole
    assert stream(GROUPS, seed=8, start=0, count=12) != whole[:12]


@pytest.mark.parametrize("start", [0, 5, 12, 29])
def test_a_stream_started_at_a_position_continues_the_whole_one(start):
    whole = stream(GROUPS, seed=3, start=0, count=40)
    assert stream(GROUPS, seed=3, start=start, count=40 - start) == whole[start:]


def test_workers_get_their_share_of_each_step_by_position():
    items = stream(GROUPS, seed=0, start=10, count=3 * 2 * 4)  # 3 steps, 2 workers, batch 4
    dealt = worker_items(items, batch_size=4, world=2)
    positions = [[r["position"] for r in mine] for mine in dealt]
    assert positions == [[10, 11, 12, 13, 18, 19, 20, 21, 26, 27, 28, 29],
                         [14, 15, 16, 17, 22, 23, 24, 25, 30, 31, 32, 33]]


def test_an_empty_stream_is_refused():
    with pytest.raises(ValueError, match="no items"):
        stream([range(0)], seed=0, start=0, count=1)


def test_grounding_batches_are_the_stream_items_rows(known_mask_data):
    store = ShardStore.open(known_mask_data)
    shards, rows = shard_groups(store)
    items = stream(rows, seed=0, start=5, count=8)
    cols = {k: np.array([r[k] for r in items]) for k in items[0]}
    batch = load_batch(cols, shards=shards, seen=store.manifest["seen"])
    table = store.read().to_pydict()
    index = {(k, i): j for j, (k, i) in enumerate(
        (g, r) for g in range(len(shards)) for r in rows[g])}
    expected = [table["prompt"][index[(r["group"], r["member"])]] for r in items]
    assert list(batch["prompt"]) == expected
    np.testing.assert_array_equal(batch["position"], np.arange(5, 13))
    assert batch["x_t"].shape[0] == batch["masks"].shape[0] == batch["valid"].shape[0] == 8


def test_an_unfinished_run_is_refused_unless_partial_data_is_allowed(tmp_path, known_mask_data):
    done = ShardStore.open(known_mask_data)
    run = {**done.manifest["run"], "n": 24}  # three shards of 8; the first is written
    store = ShardStore.create_or_resume(str(tmp_path / "part"), run, seen=done.manifest["seen"],
                                        unseen=[])
    store.write_shard(0, done.read().slice(0, 8))
    with pytest.raises(ValueError, match=r"unfinished run \(1 of 3 shards done\).*--allow-part"):
        check_training_data(store.root)
    shards, rows = shard_groups(check_training_data(store.root, allow_partial=True))
    assert len(shards) == 1 and list(rows[0]) == list(range(8))
