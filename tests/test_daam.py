"""The DAAM baseline on the tiny SD: same images as the generator, per-class heat maps and masks
(by both mask rules, on hand-made heat maps too), token spans, processors put back, batch
independence."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from eval.daam import (
    AttentionSums,
    CrossAttentionRecorder,
    DAAMLabeller,
    class_token_spans,
    is_daam_layer,
    layer_hw,
)
from factory.schema import decode_masks

STEPS = 5  # as the tiny_generator fixture


@pytest.fixture(scope="module")
def daam():
    return DAAMLabeller("tiny", steps=STEPS)


@pytest.fixture(scope="module")
def batch(spec_batch):
    return spec_batch([("dog", "cat"), ("hair drier",)], [3, 4])


@pytest.fixture(scope="module")
def labelled(daam, batch):
    return daam(batch), daam.heat_maps(batch)


def test_regenerated_images_are_the_generators_bit_for_bit(tiny_generator, batch, labelled):
    out, _ = labelled
    # the recorder returns the layer's own processor's output: nothing in the UNet changes
    np.testing.assert_array_equal(out["image"], tiny_generator(batch)["image"])
    assert out["image"].shape == (2, 64, 64, 3) and out["image"].dtype == np.uint8


def test_masks_are_the_heat_maps_over_the_threshold(batch, labelled):
    out, (images, heats) = labelled
    np.testing.assert_array_equal(images, out["image"])
    assert [h.shape for h in heats] == [(2, 64, 64), (1, 64, 64)]
    for rles, heat, classes in zip(out["masks"], heats, batch["classes"], strict=True):
        masks = decode_masks(rles, 64, 64)
        assert masks.shape == (len(classes), 64, 64)
        np.testing.assert_array_equal(masks, heat >= 0.4)
        assert 0 < masks.sum() < masks.size  # the threshold cuts inside the normalised map
        np.testing.assert_allclose(heat.min((1, 2)), 0, atol=1e-6)
        np.testing.assert_allclose(heat.max((1, 2)), 1, atol=1e-6)
    assert list(out["prompt"]) == list(batch["prompt"]) and "heat" not in out


def test_independent_masks_overlap_where_exclusive_ones_pick_the_hotter_class(daam, batch,
                                                                            monkeypatch):
    heats = [np.array([[[1.0, 0.6, 0.2, 0.5]], [[0.0, 0.8, 0.5, 0.3]]], dtype=np.float32),
             np.array([[[0.3, 0.9, 0.4, 0.1]]], dtype=np.float32)]  # (K_b, 1, 4) per sample
    images = np.zeros((2, 1, 4, 3), dtype=np.uint8)
    exclusive = DAAMLabeller("tiny", steps=STEPS, mask_rule="exclusive")
    got = {}
    for name, labeller in (("independent", daam), ("exclusive", exclusive)):
        monkeypatch.setattr(labeller, "heat_maps", lambda b: (images, heats))
        got[name] = [decode_masks(m, 1, 4)[:, 0].tolist() for m in labeller(batch)["masks"]]
    # threshold 0.4: pixel 1 is hot for both classes, 0.8 beats 0.6
    assert got["independent"][0] == [[True, True, False, True], [False, True, True, False]]
    assert got["exclusive"][0] == [[True, False, False, True], [False, True, True, False]]
    assert got["independent"][1] == got["exclusive"][1] == [[False, True, True, False]]
    with pytest.raises(ValueError, match="unknown mask rule 'top'"):
        DAAMLabeller("tiny", steps=STEPS, mask_rule="top")


def test_two_classes_of_one_prompt_get_different_heat(labelled):
    out, (_, heats) = labelled
    dog, cat = heats[0]
    # random weights make the two words' text states alike, so the maps differ by a few percent
    # only; reading both classes from the same tokens would make them equal
    assert np.abs(dog - cat).max() > 0.03
    masks = decode_masks(out["masks"][0], 64, 64)
    assert (masks[0] != masks[1]).sum() > 50


def test_a_sample_gets_the_same_masks_alone_as_in_a_batch(daam, batch, labelled):
    out, (_, heats) = labelled
    for i in range(2):
        alone = {k: v[i:i + 1] for k, v in batch.items()}
        _, (heat,) = daam.heat_maps(alone)
        # float32 on the CPU: other batch sizes take other BLAS kernels (tests/test_stages.py)
        np.testing.assert_allclose(heat, heats[i], atol=1e-4)
        assert daam(alone)["masks"][0] == out["masks"][i]


def test_token_spans_of_multi_token_names(daam):
    tok = daam.generator.pipe.tokenizer  # SD's real CLIP BPE
    prompt = "a photograph of a tvmonitor and a hair drier"
    spans = class_token_spans(tok, prompt, ["tvmonitor", "hair drier"])
    assert spans == [(5, 7), (9, 11)]  # BOS a photograph of a | tv monitor | and a | hair drier
    ids = tok(prompt).input_ids
    assert [tok.decode(ids[s:e]) for s, e in spans] == ["tvmonitor", "hair drier"]
    # a name inside a later name, and a name that is also a template word, get their own place
    assert class_token_spans(tok, "a photograph of a dog and a hot dog", ["dog", "hot dog"]) \
        == [(5, 6), (8, 10)]
    assert class_token_spans(tok, "a photograph of a photograph", ["photograph"]) == [(5, 6)]


def test_a_class_missing_from_its_prompt_is_refused_by_name(daam, spec_batch):
    batch = spec_batch([("dog",)], [1])
    batch["classes"][0] = ["zebra"]
    before = daam.generator.pipe.unet.attn_processors
    with pytest.raises(ValueError, match="class 'zebra' in prompt 'a photograph of a dog'"):
        daam(batch)
    after = daam.generator.pipe.unet.attn_processors
    assert all(after[n] is p for n, p in before.items())


def test_recorders_sit_on_cross_attention_only_and_are_removed_even_on_error(
        daam, batch, monkeypatch):
    pipe = daam.generator.pipe
    before = pipe.unet.attn_processors
    seen = {}

    def fail_decode(*args, **kwargs):  # the VAE runs after the last UNet call
        seen.update(pipe.unet.attn_processors)
        raise RuntimeError("stop")

    monkeypatch.setattr(pipe.vae, "decode", fail_decode)
    with pytest.raises(RuntimeError, match="stop"):
        daam(batch)
    recorded = sorted(n for n, p in seen.items() if isinstance(p, CrossAttentionRecorder))
    assert recorded == sorted(n for n in before if is_daam_layer(n))
    assert len(recorded) == 9 and not any(n.startswith("mid_block") for n in recorded)
    assert all(seen[n] is p for n, p in before.items() if n not in recorded)
    after = pipe.unet.attn_processors
    assert all(after[n] is p for n, p in before.items())


def test_recorder_keeps_the_output_and_sums_the_conditional_probabilities():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    x, text = torch.randn(4, 10, 8), torch.randn(4, 77, 6)      # 2B: [uncond, cond], B = 2
    tokens = torch.tensor([[5, 6], [7, 0]])
    sums = AttentionSums(tokens)
    attn.set_processor(CrossAttentionRecorder(AttnProcessor2_0(), "layer", sums))
    with torch.no_grad():
        out = attn(x, text)
        out = attn(x, text)  # two steps: the sums add up
        attn.set_processor(AttnProcessor2_0())
        torch.testing.assert_close(out, attn(x, text), rtol=0, atol=0)
        q = attn.to_q(x[2:]).view(2, 10, 2, 4).transpose(1, 2)  # cond half: (B, heads, N, d)
        k = attn.to_k(text[2:]).view(2, 77, 2, 4).transpose(1, 2)
        probs = (q @ k.transpose(2, 3) / 2).softmax(-1)          # d = 4: scale 1 / 2
    want = torch.stack([probs[b, :, :, tokens[b]] for b in range(2)]).transpose(2, 3)
    torch.testing.assert_close(sums.sums["layer"], 2 * want)    # (B, heads, T, N)


def test_recording_wraps_the_fused_processors_of_the_gpu_path(batch, labelled):
    out, (_, heats) = labelled
    daam = DAAMLabeller("tiny", steps=STEPS)  # its own UNet: the shared fixture stays unfused
    daam.generator.pipe.unet.fuse_qkv_projections()  # what SDGenerator does on a GPU
    images, fused = daam.heat_maps(batch)
    plain = daam.generator({"prompt": batch["prompt"], "noise_seed": batch["noise_seed"]})
    np.testing.assert_array_equal(images, plain["image"])
    np.testing.assert_allclose(images, out["image"], atol=1)
    for a, b in zip(fused, heats, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(("n", "latent", "hw"), [(64, (8, 8), (8, 8)), (4, (8, 8), (2, 2)),
                                                 (20, (8, 10), (4, 5)), (16, (7, 7), (4, 4))])
def test_layer_maps_unflatten_to_their_downsampled_size(n, latent, hw):
    assert layer_hw(n, *latent) == hw


def test_a_threshold_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="threshold must lie in"):
        DAAMLabeller("tiny", steps=STEPS, threshold=1.5)
