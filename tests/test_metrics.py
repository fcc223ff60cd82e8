"""mIoU, seen/unseen/harmonic and Protocol I's table on hand-computed cases."""

import json
import math

import numpy as np
import pytest

from eval.metrics import IoUAccumulator, harmonic, seen_unseen
from eval.table import COLUMNS, PAPER_TABLE1_AVERAGES, ProtocolTable, column_of


def row(bits: str) -> np.ndarray:
    """"0110" -> a (1, 4) bool mask."""
    return np.array([[b == "1" for b in bits]])


def masks(*bits: str) -> np.ndarray:
    """One (1, W) mask per string -> (K, 1, W) bool."""
    return np.stack([row(b) for b in bits])


@pytest.fixture
def random_maps():
    """Six (8, 9) label map pairs over classes 0-4, with some 255 in gt and pred."""
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 5, size=(6, 8, 9)).astype(np.uint8)
    gts = rng.integers(0, 5, size=(6, 8, 9)).astype(np.uint8)
    gts[rng.random(gts.shape) < 0.1] = 255
    preds[rng.random(preds.shape) < 0.05] = 255
    return preds, gts


def test_prediction_equal_to_ground_truth_gives_one():
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[1:3, 1:4] = 1
    gt[4:, :] = 2
    acc = IoUAccumulator(4)
    acc.update(gt.copy(), gt)
    assert acc.iou() == {1: 1.0, 2: 1.0}  # class 3 never occurs; background left out
    assert acc.miou() == 1.0
    with_bg = IoUAccumulator(4, include_background=True)
    with_bg.update(gt.copy(), gt)
    assert with_bg.iou() == {0: 1.0, 1: 1.0, 2: 1.0}


def test_shifted_square_gives_hand_computed_iou():
    gt = np.zeros((10, 10), dtype=np.uint8)
    gt[2:6, 2:6] = 1                    # 4 x 4 = 16 pixels
    pred = np.zeros_like(gt)
    pred[2:6, 4:8] = 1                  # the same square, 2 pixels to the right
    # class 1: I = 4 rows x 2 columns (cols 4, 5) = 8; U = 16 + 16 - 8 = 24; IoU = 1/3
    # background: 84 pixels in each; I = 100 - 24 = 76; U = 84 + 84 - 76 = 92; IoU = 76/92
    acc = IoUAccumulator(2, include_background=True)
    acc.update(pred, gt)
    assert acc.intersection.tolist() == [76, 8]
    assert acc.union.tolist() == [92, 24]
    assert acc.iou() == pytest.approx({0: 76 / 92, 1: 1 / 3})
    assert acc.miou() == pytest.approx((76 / 92 + 1 / 3) / 2)
    assert acc.miou(classes=[1]) == pytest.approx(1 / 3)
    no_bg = IoUAccumulator(2)
    no_bg.update(pred, gt)
    assert no_bg.miou() == pytest.approx(1 / 3)


def test_absent_classes_are_not_averaged():
    gt = np.array([[0, 1, 1, 0]])
    pred = np.array([[0, 1, 0, 0]])
    acc = IoUAccumulator(5)
    acc.update(pred, gt)
    assert acc.iou() == {1: 0.5}          # classes 2-4 occur nowhere: not in the mean as 0 or 1
    assert acc.miou() == 0.5
    assert math.isnan(acc.miou(classes=[3, 4]))
    assert acc.iou(classes=[1, 3]) == {1: 0.5}


def test_empty_and_only_predicted_classes_count_zero():
    gt = np.array([[2, 2, 1, 1, 0, 0]])
    pred = np.array([[0, 0, 1, 1, 3, 3]])  # misses class 2, predicts class 3 that is not there
    acc = IoUAccumulator(4)
    acc.update(pred, gt)
    assert acc.iou() == {1: 1.0, 2: 0.0, 3: 0.0}
    assert acc.miou() == pytest.approx(1 / 3)
    empty = IoUAccumulator(4)
    empty.update_masks(masks("0000"), masks("0110"), [2])  # an empty predicted mask
    assert empty.iou() == {2: 0.0}


def test_ignore_label_counts_nowhere():
    gt = np.array([[1, 1, 255, 255]])
    pred = np.array([[1, 1, 1, 2]])       # predictions on ignored pixels do not count
    acc = IoUAccumulator(3)
    acc.update(pred, gt)
    assert acc.iou() == {1: 1.0}          # not 2/3 for class 1, and class 2 never occurs
    assert acc.union.tolist() == [0, 2, 0]
    # a predicted 255 is "no class": class 1 misses one of its two pixels
    acc2 = IoUAccumulator(3)
    acc2.update(np.array([[1, 255]]), np.array([[1, 1]]))
    assert acc2.iou() == {1: 0.5}
    # the mask path takes an ignore map: I = 1 (pixel 0), U = 2 (pixels 0, 1); pixels 2-3 skipped
    acc3 = IoUAccumulator(3)
    acc3.update_masks(masks("1111"), masks("1000"), [1], ignore=row("0011"))
    assert (acc3.intersection[1], acc3.union[1]) == (1, 2)


def test_label_maps_match_a_brute_force_count(random_maps):
    preds, gts = random_maps
    acc = IoUAccumulator(5, include_background=True)
    for p, g in zip(preds, gts, strict=True):
        acc.update(p, g)
    valid = gts != 255
    for c in range(5):
        inter = ((preds == c) & (gts == c) & valid).sum()
        union = (((preds == c) | (gts == c)) & valid).sum()
        assert (acc.intersection[c], acc.union[c]) == (inter, union)


def test_streaming_in_pieces_equals_all_at_once(random_maps):
    preds, gts = random_maps
    pieces = IoUAccumulator(5)
    for p, g in zip(preds, gts, strict=True):
        pieces.update(p, g)
    whole = IoUAccumulator(5)
    whole.update(np.concatenate(preds), np.concatenate(gts))  # one (48, 9) image
    np.testing.assert_array_equal(pieces.intersection, whole.intersection)
    np.testing.assert_array_equal(pieces.union, whole.union)
    assert pieces.intersection.shape == (5,)  # state does not grow with the images
    assert pieces.miou() == whole.miou()


def test_merge_equals_one_accumulator_and_survives_json(random_maps):
    preds, gts = random_maps
    single = IoUAccumulator(5)
    workers = [IoUAccumulator(5) for _ in range(3)]
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        single.update(p, g)
        workers[i % 3].update(p, g)
    # each worker's state travels as JSON, as it would between processes
    parts = [IoUAccumulator.from_dict(json.loads(json.dumps(w.to_dict()))) for w in workers]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.intersection, single.intersection)
    np.testing.assert_array_equal(merged.union, single.union)
    assert merged.iou() == single.iou()
    with pytest.raises(ValueError, match="cannot merge"):
        single.merge(IoUAccumulator(6))


def test_label_map_and_mask_paths_agree(random_maps):
    preds, gts = random_maps
    by_map = IoUAccumulator(5, include_background=True)
    by_mask = IoUAccumulator(5, include_background=True)
    ids = np.arange(5)
    for p, g in zip(preds, gts, strict=True):
        by_map.update(p, g)
        by_mask.update_masks(p[None] == ids[:, None, None], g[None] == ids[:, None, None], ids,
                             ignore=g == 255)
    np.testing.assert_array_equal(by_map.intersection, by_mask.intersection)
    np.testing.assert_array_equal(by_map.union, by_mask.union)


def test_bad_inputs_are_named():
    acc = IoUAccumulator(3)
    with pytest.raises(ValueError, match=r"class ids \[7\]"):
        acc.update(np.array([[7]]), np.array([[1]]))
    with pytest.raises(ValueError, match="threshold"):
        acc.update_masks(np.ones((1, 2, 2)), np.ones((1, 2, 2), dtype=bool), [1])
    with pytest.raises(ValueError, match="len\\(class_ids\\) = 2"):
        acc.update_masks(masks("10"), masks("10"), [1, 2])


def test_seen_unseen_and_harmonic_numbers():
    acc = IoUAccumulator(5)
    # class 1: I 1, U 2 -> 0.5; class 2: I 1, U 1 -> 1.0; class 3: I 1, U 4 -> 0.25
    acc.update_masks(masks("1100", "1000", "1000"), masks("1000", "1000", "1111"), [1, 2, 3])
    s, u, h = seen_unseen(acc, seen_ids=[1, 2], unseen_ids=[3, 4])  # class 4 never occurs
    assert (s, u) == (0.75, 0.25)
    assert h == pytest.approx(2 * 0.75 * 0.25 / (0.75 + 0.25))  # 0.375
    s, u, h = seen_unseen(acc, seen_ids=[1, 2], unseen_ids=[4])
    assert s == 0.75 and math.isnan(u) and math.isnan(h)  # nothing unseen measured: nan, not 0
    assert harmonic(0.0, 0.0) == 0.0
    assert harmonic(0.5, 0.0) == 0.0


def test_column_of_follows_the_paper():
    assert [column_of(f) for f in ([True], [False], [True, True], [True, False], [False, True],
                                   [False, False])] == [
        "One/Seen", "One/Unseen", "Two/Seen", "Two/Seen+Unseen", "Two/Seen+Unseen", "Two/Unseen"]
    with pytest.raises(ValueError, match="one or two"):
        column_of([True, True, False])


# (classes, pred masks, oracle masks) of "grounding head" samples, and the column each goes to
SAMPLES = [
    (["cat"], ("1100",), ("1100",), "One/Seen"),                         # cat I 2, U 2
    (["dog"], ("1000",), ("1111",), "One/Seen"),                         # dog I 1, U 4
    (["cat"], ("0000",), ("1111",), "One/Seen"),                         # cat I 0, U 4
    (["sofa"], ("0000",), ("0110",), "One/Unseen"),                      # sofa I 0, U 2
    (["cat", "dog"], ("1000", "0011"), ("1100", "0011"), "Two/Seen"),    # cat 1/2, dog 2/2
    (["dog", "sofa"], ("1100", "0011"), ("1000", "0001"), "Two/Seen+Unseen"),  # dog 1/2, sofa 1/2
    (["train", "cat"], ("1111", "0000"), ("1111", "0000"), "Two/Seen+Unseen"),  # train 4/4, cat -
    (["sofa", "train"], ("1100", "0001"), ("0110", "0011"), "Two/Unseen"),  # sofa 1/3, train 1/2
]
# Per column, pooled over its samples, then averaged over the classes that occur there:
EXPECTED = {
    "One/Seen": 100 * (2 / 6 + 1 / 4) / 2,  # cat pooled I 2 / U 6 (not the per-sample 1/2)
    "One/Unseen": 0.0,
    "Two/Seen": 100 * (1 / 2 + 1) / 2,
    "Two/Seen+Unseen": 100 * (1 / 2 + 1 / 2 + 1) / 3,  # cat's empty masks there: not averaged
    "Two/Unseen": 100 * (1 / 3 + 1 / 2) / 2,
}
COUNTS = {"One/Seen": 3, "One/Unseen": 1, "Two/Seen": 1, "Two/Seen+Unseen": 2, "Two/Unseen": 1}


def filled_table(samples=SAMPLES) -> ProtocolTable:
    table = ProtocolTable(["grounding head", "DAAM"], seen=["cat", "dog"],
                          unseen=["sofa", "train"])
    for classes, pred, gt, column in samples:
        assert table.update("grounding head", classes, masks(*pred), masks(*gt)) == column
    # DAAM: one perfect One/Seen sample, nothing else
    table.update("DAAM", ["dog"], masks("0110"), masks("0110"))
    return table


def test_table_puts_each_sample_in_its_column():
    table = filled_table()
    assert table.counts()["grounding head"] == COUNTS
    assert table.counts()["DAAM"] == {**dict.fromkeys(COLUMNS, 0), "One/Seen": 1}
    assert table.rows()["grounding head"] == pytest.approx(EXPECTED)
    daam = table.rows()["DAAM"]
    assert daam["One/Seen"] == 100.0
    assert all(math.isnan(daam[c]) for c in COLUMNS[1:])


def test_table_merge_equals_one_table():
    merged = filled_table(SAMPLES[:3]).merge(filled_table(SAMPLES[3:]))
    assert merged.rows()["grounding head"] == pytest.approx(EXPECTED)
    assert merged.counts()["grounding head"] == COUNTS
    assert merged.counts()["DAAM"]["One/Seen"] == 2


def test_table_rejects_what_it_cannot_place():
    table = ProtocolTable(["m"], seen=["cat"], unseen=["sofa", "train"])
    with pytest.raises(ValueError, match="neither seen nor unseen"):
        table.update("m", ["horse"], masks("1"), masks("1"))
    with pytest.raises(ValueError, match="unknown method"):
        table.update("DAAM", ["cat"], masks("1"), masks("1"))
    with pytest.raises(ValueError, match="one or two"):
        table.update("m", ["cat", "sofa", "train"], masks("1", "1", "1"), masks("1", "1", "1"))
    with pytest.raises(ValueError, match="distinct"):
        table.update("m", ["cat", "cat"], masks("1", "1"), masks("1", "1"))
    with pytest.raises(ValueError, match="both seen and unseen"):
        ProtocolTable(["m"], seen=["cat"], unseen=["cat"])


def test_table_json_has_values_counts_and_columns():
    out = json.loads(filled_table().to_json())
    assert out["columns"] == list(COLUMNS)
    assert out["rows"]["grounding head"] == pytest.approx(EXPECTED)
    assert out["rows"]["DAAM"] == {**dict.fromkeys(COLUMNS, None), "One/Seen": 100.0}
    assert out["counts"]["grounding head"] == COUNTS


def test_table_markdown_has_the_paper_layout():
    md = filled_table().to_markdown(reference=PAPER_TABLE1_AVERAGES["pascal"]).splitlines()
    assert md[0] == "| # Objects | One |  | Two |  |  |"
    assert md[1] == "| --- | ---: | ---: | ---: | ---: | ---: |"
    assert md[2] == "| Categories | Seen | Unseen | Seen | Seen+Unseen | Unseen |"
    assert md[3] == "| grounding head | 29.17 | 0.00 | 75.00 | 66.67 | 41.67 |"
    assert md[4] == "| DAAM | 100.00 | – | – | – | – |"
    assert md[5] == "| # samples (grounding head) | 3 | 1 | 1 | 2 | 1 |"  # counts differ
    assert md[6] == "| # samples (DAAM) | 1 | 0 | 0 | 0 | 0 |"
    assert md[7] == "| ours (paper) | 90.30 | 83.08 | 79.10 | 67.86 | 55.74 |"
    assert md[8] == "| DAAM (paper) | 64.84 | 62.90 | 48.21 | 49.19 | 50.95 |"
    assert len(md) == 9


def test_table_markdown_has_one_count_row_when_methods_agree():
    table = ProtocolTable(["a", "b"], seen=[1], unseen=[2])
    for m in ("a", "b"):
        table.update(m, [1, 2], masks("10", "01"), masks("10", "01"))
    md = table.to_markdown().splitlines()
    assert md[3:] == ["| a | – | – | – | 100.00 | – |", "| b | – | – | – | 100.00 | – |",
                      "| # samples | 0 | 0 | 0 | 1 | 0 |"]
