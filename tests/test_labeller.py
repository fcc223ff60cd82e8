"""The grounding-head labeller stage on tiny models, and its label-map and mask rules on
hand-made probabilities."""

import numpy as np
import pytest
import torch

from actors.batch import object_column
from actors.grounding_labeller import (
    GroundingLabeller,
    apply_mask_rule,
    check_band,
    label_maps,
)
from factory.prompts import prompt_for
from factory.schema import IGNORE, decode_masks

CLASSES = [("dog",), ("cat", "red panda"), ("fire truck", "bird"), ("sofa",)]


def test_label_map_takes_the_most_probable_confident_class():
    probs = torch.tensor([[[[0.9, 0.6, 0.2, 0.45]],
                           [[0.3, 0.7, 0.1, 0.40]]]])                     # (1, 2, 1, 4)
    ids = torch.tensor([[8, 12]])
    valid = torch.tensor([[True, True]])
    assert label_maps(probs, ids, valid, 0.5, 0.5).tolist() == [[[8, 12, 0, 0]]]
    # the band: > 0.65 labelled, <= 0.3 background, in between ignore
    assert label_maps(probs, ids, valid, 0.3, 0.65).tolist() == [[[8, 12, 0, IGNORE]]]


def test_a_probability_at_the_threshold_is_not_the_class():
    """The official test.py: `label_pred_mask[label_pred_prob > 0.5] = 1`. A logit of 0 is a
    probability of exactly 0.5: background, in no class's mask."""
    probs = torch.sigmoid(torch.tensor([[[[0.0, 0.1, -0.1]], [[-1.0, -1.0, -1.0]]]]))  # (1,2,1,3)
    assert probs[0, 0, 0, 0] == 0.5
    ids, valid = torch.tensor([[8, 12]]), torch.tensor([[True, True]])
    assert label_maps(probs, ids, valid, 0.5, 0.5).tolist() == [[[0, 8, 0]]]
    for rule in ("independent", "exclusive"):
        masks = apply_mask_rule(probs, 0.5, rule, valid)
        assert masks[0, 0, 0].tolist() == [False, True, False] and not masks[0, 1].any()
        daam = apply_mask_rule(probs, 0.5, rule, valid, inclusive=True)  # DAAM's heat >= t
        assert daam[0, 0, 0].tolist() == [True, True, False]
    # a band's ends: at high ignore, at low background
    band = torch.tensor([[[[0.75, 0.25, 0.5]]]])                              # (1, 1, 1, 3)
    label = label_maps(band, ids[:, :1], valid[:, :1], 0.25, 0.75)
    assert label.tolist() == [[[IGNORE, 0, IGNORE]]]


def test_label_map_never_uses_a_padding_class():
    probs = torch.tensor([[[[0.2, 0.8]], [[0.99, 0.99]]]])                  # (1, 2, 1, 2)
    out = label_maps(probs, torch.tensor([[3, 0]]), torch.tensor([[True, False]]), 0.5, 0.5)
    assert out.tolist() == [[[0, 3]]]


def test_independent_masks_overlap_where_exclusive_ones_pick_one_class():
    logits = torch.tensor([[[[3.0, 1.0, -2.0, 0.5]], [[2.0, 2.0, 1.0, -3.0]]],
                           [[[-0.5, 1.0, 4.0, -1.0]], [[5.0, 5.0, 5.0, 5.0]]]])  # (2, 2, 1, 4)
    probs = torch.sigmoid(logits)  # sample 0: .95 .73 .12 .62 / .88 .88 .73 .05
    valid = torch.tensor([[True, True], [True, False]])  # sample 1 has one class
    independent = apply_mask_rule(probs, 0.5, "independent", valid)
    exclusive = apply_mask_rule(probs, 0.5, "exclusive", valid)
    assert independent[0, :, 0].tolist() == [[True, True, False, True], [True, True, True, False]]
    assert exclusive[0, :, 0].tolist() == [[True, False, False, True], [False, True, True, False]]
    assert (independent[0, 0] & independent[0, 1]).sum() == 2  # the paper's rule: overlap
    assert not (exclusive[:, 0] & exclusive[:, 1]).any()
    for masks in (independent, exclusive):  # a padding class never takes a pixel
        assert masks[1, 0, 0].tolist() == [False, True, True, False] and not masks[1, 1].any()
    # exclusive masks are the label map's pixels of each class
    ids = torch.tensor([[8, 12], [3, 0]])
    label = label_maps(probs, ids, valid, 0.5, 0.5)
    assert torch.equal(exclusive, (label[:, None] == ids[..., None, None]) & valid[..., None, None])
    high = apply_mask_rule(probs, 0.8, "exclusive", valid)  # pixel 1's winner passes, 3's not
    assert high[0, :, 0].tolist() == [[True, False, False, False], [False, True, False, False]]
    with pytest.raises(ValueError, match="unknown mask rule 'argmax'"):
        apply_mask_rule(probs, 0.5, "argmax", valid)


@pytest.mark.parametrize("threshold, band", [(0.0, None), (1.0, None), (0.5, (0.7, 0.3)),
                                             (0.5, (0.0, 0.5))])
def test_bad_thresholds_are_refused(threshold, band):
    with pytest.raises(ValueError):
        check_band(threshold, band)


@pytest.fixture(scope="module")
def generated(tiny_generator, spec_batch):
    """Four tiny samples, with the class ids a label run gives them."""
    batch = tiny_generator(spec_batch(CLASSES, [11, 12, 13, 14]))
    batch["class_ids"] = object_column([[1 + i, 10 + i][:len(c)] for i, c in enumerate(CLASSES)])
    return batch


@pytest.fixture(scope="module")
def labeller(tiny_checkpoint):
    return GroundingLabeller(tiny_checkpoint, device="cpu")


def test_labels_masks_scores_and_quality_agree(labeller, generated):
    """masks: each class's own probability > 0.5, overlapping where the exclusive label map
    gives the pixel to the more probable class."""
    out = labeller(generated)
    probs, valid = labeller.probabilities(generated, (64, 64))
    assert out["label"].shape == (4, 64, 64) and out["label"].dtype == np.uint8
    assert list(out["prompt"]) == [prompt_for(c) for c in CLASSES]
    overlap = 0
    for i, classes in enumerate(CLASSES):
        ids = list(generated["class_ids"][i])
        label = out["label"][i]
        assert set(np.unique(label)) <= {0, *ids}
        masks = decode_masks(out["masks"][i], 64, 64)
        assert masks.shape == (len(classes), 64, 64)
        p = probs[i, :len(classes)].numpy()
        for k, class_id in enumerate(ids):
            np.testing.assert_array_equal(masks[k], p[k] > 0.5)
            assert out["areas"][i][k] == masks[k].sum()
            expected = p[k][masks[k]].mean() if masks[k].any() else 0.0
            assert out["scores"][i][k] == pytest.approx(expected, abs=1e-6)
            # where a class is labelled, it is the most probable and confident one
            np.testing.assert_array_equal(label == class_id, masks[k] & (p[k] >= p.max(0)))
        assert ((label == 0) == (p.max(0) <= 0.5)).all()
        assert out["quality"][i] == pytest.approx(np.mean(out["scores"][i]), abs=1e-6)
        overlap += (masks.sum(0) > 1).sum()
    assert overlap > 0  # both prompt classes' masks hold some pixels: the label map has one
    assert not valid[0, 1] and valid[1].all()
    assert 0 < sum(out["label"].ravel() > 0) < out["label"].size  # a random head labels some


def test_the_exclusive_rule_gives_each_class_its_label_map_pixels(tiny_checkpoint, generated):
    out = GroundingLabeller(tiny_checkpoint, device="cpu", mask_rule="exclusive")(generated)
    for i, ids in enumerate(generated["class_ids"]):
        masks = decode_masks(out["masks"][i], 64, 64)
        np.testing.assert_array_equal(masks, out["label"][i] == np.array(ids)[:, None, None])


def test_ignore_band_marks_uncertain_pixels(tiny_checkpoint, generated, labeller):
    banded = GroundingLabeller(tiny_checkpoint, device="cpu", ignore_band=(0.45, 0.55))
    out = banded(generated)
    label = out["label"]
    probs = labeller.probabilities(generated, (64, 64))[0].numpy()
    top = probs.max(1)                                                        # (B, H, W)
    np.testing.assert_array_equal(label == IGNORE, (top > 0.45) & (top <= 0.55))
    np.testing.assert_array_equal(label == 0, top <= 0.45)
    for i, classes in enumerate(CLASSES):  # a class's mask is its probability > high
        masks = decode_masks(out["masks"][i], 64, 64)
        np.testing.assert_array_equal(masks, probs[i, :len(classes)] > 0.55)


def test_a_sample_is_labelled_the_same_alone_and_in_a_batch(labeller, generated):
    both = labeller.probabilities(generated, (64, 64))[0]
    alone = labeller.probabilities({k: v[1:2] for k, v in generated.items()}, (64, 64))[0]
    torch.testing.assert_close(alone[0], both[1], atol=1e-5, rtol=0)


def test_stored_latents_in_float16_label_like_float32(labeller, generated):
    half = {**generated, "x_t": generated["x_t"].astype(np.float16)}
    a = labeller.probabilities(generated, (64, 64))[0]
    b = labeller.probabilities(half, (64, 64))[0]
    assert (a - b).abs().max() < 0.05 and not torch.equal(a, b)


def test_a_head_of_another_sd_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="reads the features of 'tiny'"):
        GroundingLabeller(tiny_checkpoint, model="sd15-random", device="cpu")
    with pytest.raises(ValueError, match="unknown mask rule 'union'"):
        GroundingLabeller(tiny_checkpoint, mask_rule="union", device="cpu")
