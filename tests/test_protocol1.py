"""Protocol I end to end on a local Ray: a hand-made test set with a known mix of one/two,
seen/unseen samples, the tiny grounding head and DAAM, by the default (independent) mask rule and
the exclusive one; and the protocol's bad inputs."""

import json

import numpy as np
import pytest
from conftest import known_masks, write_triplets

from eval.protocol1 import DAAM, HEAD, evaluate, main
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


@pytest.fixture(scope="module")
def exclusive_report(ray_local, test_set, tiny_checkpoint, tmp_path_factory):
    """The one other run of the protocol: both methods by the exclusive mask rule."""
    return evaluate(test_set, tiny_checkpoint, "daam", mask_rule="exclusive", batch_size=8,
                    ray_log=str(tmp_path_factory.mktemp("p1") / "exclusive.log"))


@pytest.fixture(scope="module")
def kept_batch(test_set):
    """The kept samples (all but the last) as the stages get them, for runs without Ray."""
    from actors.batch import object_column
    from eval.protocol1 import eval_rows
    from factory.store import ShardStore

    batch = {k: object_column(v[:7]) if isinstance(v[0], list) else np.array(v[:7])
             for k, v in ShardStore.open(test_set).read().to_pydict().items()}
    return eval_rows(batch, stored=False)


def batched(batch, size):
    """`batch` cut as the protocol's pipeline cuts its kept rows: blocks of `size` in order, so
    that the stages here see the very batches they saw there."""
    n = len(batch["classes"])
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def table_row(method, batch, masks):
    """`method`'s Protocol I row of the predicted `masks`, (K, H, W) bool per sample of
    `batch`."""
    table = ProtocolTable([method], SPLIT.seen, SPLIT.unseen)
    for i, classes in enumerate(batch["classes"]):
        table.update(method, classes, masks[i], decode_masks(batch["oracle"][i], 64, 64))
    return table.rows()[method]


@pytest.mark.slow
def test_samples_land_in_their_columns_and_empty_masks_are_filtered(report):
    r, _ = report
    assert (r["samples"], r["kept"]) == (8, 7)
    assert r["mask_rule"] == "independent"
    assert r["columns"] == list(COLUMNS)
    for method in (HEAD, DAAM):
        assert r["counts"][method] == EXPECTED_COUNTS
        assert all(0 <= v <= 100 for v in r["rows"][method].values())


@pytest.mark.slow
def test_the_table_is_the_stages_masks_scored_against_the_oracle(report, kept_batch,
                                                                tiny_checkpoint):
    """The same head, run here without Ray on the same batches of the kept samples, gives the
    same masks, hence the same table row up to the order of the metric's float64 sums."""
    from actors.grounding_labeller import GroundingLabeller

    r, _ = report
    labeller = GroundingLabeller(tiny_checkpoint, device="cpu")
    masks = [decode_masks(m, 64, 64) for b in batched(kept_batch, 3)  # the report's batch size
             for m in labeller(b)["masks"]]
    for column, value in table_row(HEAD, kept_batch, masks).items():
        assert r["rows"][HEAD][column] == pytest.approx(value, rel=1e-9, abs=1e-9)


@pytest.mark.slow
def test_the_exclusive_rule_reaches_both_methods(report, exclusive_report, kept_batch,
                                                 tiny_checkpoint):
    """Each method's row by either rule is that rule applied to its scores (the head's
    probabilities, DAAM's heat), computed here without Ray on the run's batches (3 for the
    independent rule's report, 8 for the exclusive one's); the two rules' rows differ."""
    import torch

    from actors.grounding_labeller import GroundingLabeller, apply_mask_rule
    from eval.daam import DAAMLabeller

    r, _ = report
    assert exclusive_report["mask_rule"] == "exclusive"
    assert "Mask rule: exclusive, each pixel to the class of highest score" in \
        exclusive_report["markdown"]
    head, daam = GroundingLabeller(tiny_checkpoint, device="cpu"), DAAMLabeller("tiny", steps=5)
    threshold = {HEAD: 0.5, DAAM: 0.4}  # the protocol's defaults
    reports = {"independent": (r, 3), "exclusive": (exclusive_report, 8)}
    rows = {}
    for rule, (_, size) in reports.items():
        probs = [p[:len(c)] for b in batched(kept_batch, size)
                 for p, c in zip(head.probabilities(b, (64, 64))[0], b["classes"], strict=True)]
        heats = [torch.from_numpy(h) for b in batched(kept_batch, size)
                 for h in daam.heat_maps(b)[1]]  # (K, 64, 64) per sample
        for method, scores in ((HEAD, probs), (DAAM, heats)):
            rows[method, rule] = table_row(method, kept_batch, [
                apply_mask_rule(x, threshold[method], rule, inclusive=method == DAAM).numpy()
                for x in scores])
    two = [c for c in COLUMNS if c.startswith("Two")]
    for method in (HEAD, DAAM):  # two-class samples: the rules' rows differ
        assert max(abs(rows[method, "independent"][c] - rows[method, "exclusive"][c])
                   for c in two) > 2
        for rule, (got, _) in reports.items():
            for column in COLUMNS:  # the same masks: only the float64 sums may regroup
                assert got["rows"][method][column] == pytest.approx(rows[method, rule][column],
                                                                    rel=1e-9, abs=1e-9)


@pytest.mark.slow
def test_daam_regenerates_the_stored_images_and_reports_in_markdown(report):
    r, out = report
    assert r["daam_regenerated"]["of"] == 7 and r["daam_regenerated"]["max_uint8_diff"] <= 1
    with open(out.replace(".json", ".md")) as f:
        md = f.read()
    assert "| grounding head |" in md and "| DAAM |" in md and "(paper)" in md
    assert ("Mask rule: independent, each class's score above the threshold on its own (the "
            "head: >, as the paper's test.py; DAAM: >=)") in md


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
    (["--baseline", "daam", "--mask-rule", "argmax"], "unknown mask rule 'argmax'"),
])
def test_bad_protocol_input_is_one_line(run_cli, test_set, train_set, tmp_path, args, message):
    argv = ["--data", test_set, *args]  # a second --data wins
    argv = [train_set if a == "TRAIN" else str(tmp_path / "nowhere") if a == "NOWHERE" else a
            for a in argv]
    code, _, err = run_cli(main, argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_factory_eval_grounding_takes_the_mask_rule_too(run_cli, test_set):
    from factory.cli import main as factory

    code, _, err = run_cli(factory, ["eval", "grounding", "--data", test_set, "--baseline",
                                     "daam", "--mask-rule", "argmax"])
    assert code == 2 and err == ("factory: error: unknown mask rule 'argmax': one of "
                                 "independent, exclusive\n")


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


@pytest.mark.slow
def test_a_file_whose_samples_are_all_filtered_out_is_no_crash(ray_local, tmp_path,
                                                              tiny_generator, tiny_checkpoint):
    """Two shards of 8; every oracle mask of the second is empty, so --min-area keeps none of
    its rows. Rows are filtered before any decoding (the protocol used to decode each block's
    kept rows, and a block that kept none made it stack an empty list of latents)."""
    classes = [("aeroplane",), ("dog",)] * 8
    data = write_triplets(str(tmp_path / "test"), tiny_generator, classes,
                          lambda i, x, c: known_masks(x, [0]) & (i < 8), subset="test",
                          seen=list(SPLIT.seen), unseen=list(SPLIT.unseen))
    report = evaluate(data, tiny_checkpoint, None, batch_size=4,
                      ray_log=str(tmp_path / "p1.log"))
    assert (report["samples"], report["kept"]) == (16, 8)
    assert report["counts"][HEAD] == {"One/Seen": 4, "One/Unseen": 4, "Two/Seen": 0,
                                      "Two/Seen+Unseen": 0, "Two/Unseen": 0}
