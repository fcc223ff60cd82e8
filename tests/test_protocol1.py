"""Protocol I end to end on a local Ray: a hand-made test set with a known mix of one/two,
seen/unseen samples, the tiny grounding head and DAAM; and the protocol's bad inputs."""

import json

import numpy as np
import pytest
from conftest import known_masks, write_triplets

from eval.protocol1 import DAAM, HEAD, main
from eval.table import COLUMNS, ProtocolTable
from factory.schema import decode_masks
from factory.vocab import get_split

SPLIT = get_split("pascal", "1")
# one sample per column but One/Seen and One/Unseen (two each); the last has an empty mask
MIX = [("aeroplane",), ("bird",), ("dog",), ("car",), ("bird", "boat"), ("cat", "car"),
       ("dog", "train"), ("sofa",)]
EXPECTED_COUNTS = {"One/Seen": 2, "One/Unseen": 2, "Two/Seen": 1, "Two/Seen+Unseen": 1,
                   "Two/Unseen": 1}


def mix_masks(i, x_t, classes):
    masks = known_masks(x_t, list(range(len(classes))))
    return masks & (i != len(MIX) - 1)  # the last sample's detector "found nothing"


@pytest.fixture(scope="module")
def test_set(tmp_path_factory, tiny_generator):
    return write_triplets(str(tmp_path_factory.mktemp("p1") / "test"), tiny_generator, MIX,
                          mix_masks, subset="test", seen=list(SPLIT.seen),
                          unseen=list(SPLIT.unseen))


@pytest.fixture(scope="module")
def report(ray_local, test_set, tiny_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("p1") / "reports" / "report.json")  # a new folder
    main(["--data", test_set, "--checkpoint", tiny_checkpoint, "--baseline", "daam",
          "--out", out, "--batch-size", "3"])
    with open(out) as f:
        return json.load(f), out


@pytest.mark.slow
def test_samples_land_in_their_columns_and_empty_masks_are_filtered(report):
    r, _ = report
    assert (r["samples"], r["kept"]) == (8, 7)
    assert r["columns"] == list(COLUMNS)
    for method in (HEAD, DAAM):
        assert r["counts"][method] == EXPECTED_COUNTS
        assert all(0 <= v <= 100 for v in r["rows"][method].values())


@pytest.mark.slow
def test_the_table_is_the_stages_masks_scored_against_the_oracle(report, test_set,
                                                                tiny_checkpoint):
    """The same head, run here without Ray on the kept samples, gives the same table row."""
    from actors.batch import object_column
    from actors.grounding_labeller import GroundingLabeller
    from eval.protocol1 import eval_rows
    from factory.store import ShardStore

    r, _ = report
    batch = {k: object_column(v) if isinstance(v[0], list) else np.array(v)
             for k, v in ShardStore.open(test_set).read().to_pydict().items()}
    batch = eval_rows(batch, keep=frozenset(range(7)), stored=False)
    out = GroundingLabeller(tiny_checkpoint, device="cpu")(batch)
    table = ProtocolTable([HEAD], SPLIT.seen, SPLIT.unseen)
    for i, classes in enumerate(batch["classes"]):
        table.update(HEAD, classes, decode_masks(out["masks"][i], 64, 64),
                     decode_masks(batch["oracle"][i], 64, 64))
    for column, value in table.rows()[HEAD].items():
        assert r["rows"][HEAD][column] == pytest.approx(value, abs=1.0)  # float rounding only


@pytest.mark.slow
def test_daam_regenerates_the_stored_images_and_reports_in_markdown(report):
    r, out = report
    assert r["daam_regenerated"]["of"] == 7 and r["daam_regenerated"]["max_uint8_diff"] <= 1
    with open(out.replace(".json", ".md")) as f:
        md = f.read()
    assert "| grounding head |" in md and "| DAAM |" in md and "(paper)" in md


def test_oracle_as_prediction_scores_100_everywhere(test_set):
    from factory.store import ShardStore

    rows = ShardStore.open(test_set).read().to_pylist()[:7]
    table = ProtocolTable(["oracle"], SPLIT.seen, SPLIT.unseen)
    for row in rows:
        gt = decode_masks(row["masks"], 64, 64)
        table.update("oracle", row["classes"], gt, gt)
    assert table.rows()["oracle"] == {c: 100.0 for c in COLUMNS}


@pytest.fixture
def train_set(tmp_path, tiny_generator):
    return write_triplets(str(tmp_path / "train"), tiny_generator, MIX[:2], mix_masks,
                          subset="train", seen=list(SPLIT.seen), unseen=list(SPLIT.unseen))


@pytest.mark.parametrize("args, message", [
    (["--baseline", "clipseg"], "unknown baseline 'clipseg'"),
    (["--checkpoint", "NOWHERE"], "no grounding-head checkpoint"),
    ([], "nothing to evaluate"),
    (["--baseline", "daam", "--min-area", "0.5"], "no sample"),
    (["--baseline", "daam", "--data", "TRAIN"], "not a test set"),
])
def test_bad_protocol_input_is_one_line(run_cli, test_set, train_set, tmp_path, args, message):
    argv = ["--data", test_set, *args]  # a second --data wins
    argv = [train_set if a == "TRAIN" else str(tmp_path / "nowhere") if a == "NOWHERE" else a
            for a in argv]
    code, _, err = run_cli(main, argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_checkpoint_of_another_fold_is_refused(run_cli, test_set, tmp_path, tiny_checkpoint):
    import shutil

    other = tmp_path / "fold2"
    shutil.copytree(tiny_checkpoint, other)
    info = json.loads((other / "head.json").read_text())
    (other / "head.json").write_text(json.dumps({**info, "fold": "2"}))
    code, _, err = run_cli(main, ["--data", test_set, "--checkpoint", str(other)])
    assert code == 2 and "trained for fold '2'; the test set is fold '1'" in err


def test_an_empty_test_set_is_refused(run_cli, tmp_path, tiny_generator):
    from factory.store import ShardStore

    run = {"kind": "triplets", "split": "pascal", "fold": "1", "subset": "test", "n": 4,
           "shard_size": 4, "model": "tiny"}
    ShardStore.create_or_resume(str(tmp_path / "t"), run, seen=[], unseen=[])
    code, _, err = run_cli(main, ["--data", str(tmp_path / "t"), "--baseline", "daam"])
    assert code == 2 and "no finished shard" in err
