import json

import numpy as np
import pytest
import torch

from actors.class_embeddings import ClassEmbedder
from actors.features import FeatureExtractor, encode_prompts, feature_maps, group_by_resolution
from actors.names import ModelStructureError, check_model_name, check_unet_config
from actors.sd import load_sd
from factory.errors import FactoryError
from factory.identity import prepare
from factory.options import GenerateOptions

# prompts of 7 to 12 tokens
PROMPTS = [("dog",), ("pottedplant", "tvmonitor"), ("cat", "person"), ("diningtable",)]


@pytest.fixture(scope="module")
def extractor(tiny_generator):
    return FeatureExtractor(tiny_generator.pipe.unet)


def features_during_generation(generator, extractor, batch):
    """Generate `batch`, keeping the outputs of the extractor's modules (the 17 ldm block outputs
    of the tiny UNet) in the UNet call at the feature step."""
    unet, calls, kept = generator.pipe.unet, [], []

    def count(module, args):
        calls.append(1)

    def keep(module, args, output):
        if len(calls) == generator.feature_step + 1:
            sample = output if isinstance(output, torch.Tensor) else output[0]
            kept.append(sample.clone())

    handles = [unet.register_forward_pre_hook(count)]
    handles += [m.register_forward_hook(keep) for m in extractor.modules]
    try:
        out = generator(batch)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == generator.steps and len(kept) == len(extractor.maps) == 17
    B = len(batch["prompt"])
    groups = group_by_resolution(kept, extractor.maps)        # (2B, C, r, r), uncond first
    return out, [torch.cat([g[:B], g[B:]], dim=1) for g in groups]


def test_recomputed_features_equal_those_of_generation(tiny_generator, extractor, spec_batch):
    batch = spec_batch(PROMPTS, [1, 2, 3, 4])
    out, hooked = features_during_generation(tiny_generator, extractor, batch)
    cond, uncond = encode_prompts(tiny_generator.pipe, list(out["prompt"]))
    recomputed = extractor(torch.from_numpy(out["x_t"]), torch.from_numpy(out["t"]), cond, uncond)
    assert [f.shape for f in recomputed] == [f.shape for f in hooked]
    for r, h in zip(recomputed, hooked, strict=True):
        assert (r - h).abs().max() <= 1e-5


def test_features_of_a_sample_do_not_depend_on_its_batch(tiny_generator, extractor, spec_batch,
                                                        tiny_labeller):
    batch = spec_batch(PROMPTS, [1, 2, 3, 4])
    together = tiny_generator(batch)
    cond, uncond = encode_prompts(tiny_generator.pipe, list(together["prompt"]))
    feats = extractor(torch.from_numpy(together["x_t"]), 1, cond, uncond)
    masks = tiny_labeller(together)["masks"]
    for i in range(4):
        alone = tiny_generator(spec_batch(PROMPTS[i:i + 1], [i + 1]))
        # pixels agree to float32 precision before rounding to uint8, which may flip one at .5
        assert np.abs(alone["image"][0].astype(int) - together["image"][i]).max() <= 1
        # BLAS picks other kernels for other batch sizes: equal to float32 precision of x_t's scale
        scale = np.abs(together["x_t"][i]).max()
        assert np.abs(alone["x_t"][0] - together["x_t"][i]).max() <= 1e-5 * scale
        assert tiny_labeller(alone)["masks"][0] == masks[i]
        one = extractor(torch.from_numpy(together["x_t"][i:i + 1]), 1, cond[i:i + 1],
                        uncond[i:i + 1])
        for f, g in zip(one, feats, strict=True):
            assert (f[0] - g[i]).abs().max() <= 1e-5


def test_feature_pyramid_shapes_and_cfg_stacking(extractor):
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 32)
    stacked = extractor(x, 1, text, text * 0.5)
    assert [tuple(f.shape[2:]) for f in stacked] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert [f.shape[1] for f in stacked] == extractor.channels == [128, 128, 112, 96]
    cond_only = FeatureExtractor(extractor.unet, stack_cfg=False)(x, 1, text, text * 0.5)
    for s, c in zip(stacked, cond_only, strict=True):
        torch.testing.assert_close(s[:, s.shape[1] // 2:], c)
        assert not torch.allclose(s[:, : s.shape[1] // 2], c)


@pytest.fixture(scope="module")
def sd15_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only, no memory
        return UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280),
                                    cross_attention_dim=768, attention_head_dim=8)


def test_sd15_sized_config_gives_the_papers_channels(sd15_unet):
    assert FeatureExtractor(sd15_unet).channels == [15360, 14080, 8320, 5120]
    assert FeatureExtractor(sd15_unet, stack_cfg=False).channels == [7680, 7040, 4160, 2560]


def test_sd15_maps_are_the_25_ldm_block_outputs(sd15_unet):
    """ldm's input blocks 0-11, middle block, output blocks 0-11 (`openaimodel.py`), as
    (module, channels, size at 512x512)."""
    maps = [(m.module, m.channels, 64 // 2**m.level) for m in feature_maps(sd15_unet.config)]
    inputs = [("conv_in", 320, 64),
              ("down_blocks.0.attentions.0", 320, 64), ("down_blocks.0.attentions.1", 320, 64),
              ("down_blocks.0.downsamplers.0", 320, 32),
              ("down_blocks.1.attentions.0", 640, 32), ("down_blocks.1.attentions.1", 640, 32),
              ("down_blocks.1.downsamplers.0", 640, 16),
              ("down_blocks.2.attentions.0", 1280, 16), ("down_blocks.2.attentions.1", 1280, 16),
              ("down_blocks.2.downsamplers.0", 1280, 8),
              ("down_blocks.3.resnets.0", 1280, 8), ("down_blocks.3.resnets.1", 1280, 8)]
    outputs = [("up_blocks.0.resnets.0", 1280, 8), ("up_blocks.0.resnets.1", 1280, 8),
               ("up_blocks.0.upsamplers.0", 1280, 16),
               ("up_blocks.1.attentions.0", 1280, 16), ("up_blocks.1.attentions.1", 1280, 16),
               ("up_blocks.1.upsamplers.0", 1280, 32),
               ("up_blocks.2.attentions.0", 640, 32), ("up_blocks.2.attentions.1", 640, 32),
               ("up_blocks.2.upsamplers.0", 640, 64),
               ("up_blocks.3.attentions.0", 320, 64), ("up_blocks.3.attentions.1", 320, 64),
               ("up_blocks.3.attentions.2", 320, 64)]
    assert maps == inputs + [("mid_block", 1280, 8)] + outputs
    assert len(FeatureExtractor(sd15_unet).modules) == 25


def test_a_unet_without_sd1_blocks_is_refused(tmp_path):
    with pytest.raises(ModelStructureError, match="got 3 down blocks"):
        check_unet_config({"down_block_types": ["A"] * 3, "up_block_types": ["B"] * 3})
    load_sd("tiny").save_pretrained(tmp_path / "sd")
    config = tmp_path / "sd" / "unet" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["mid_block_type"] = None
    config.write_text(json.dumps(cfg))
    with pytest.raises(ModelStructureError, match="mid block None"):
        check_model_name(str(tmp_path / "sd"))
    with pytest.raises(FactoryError, match="expected SD 1.x's UNet"):
        prepare(GenerateOptions(out=str(tmp_path / "out"), model=str(tmp_path / "sd"), n=2))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def embedder(tiny_generator):
    return ClassEmbedder(tiny_generator.pipe.tokenizer, tiny_generator.pipe.text_encoder)


@pytest.mark.parametrize(("name", "span", "words"), [
    ("dog", (5, 6), ["dog</w>"]),
    ("tvmonitor", (5, 7), ["tv", "monitor</w>"]),
    ("hair drier", (5, 7), ["hair</w>", "drier</w>"]),
    ("teddy bear", (5, 7), ["teddy</w>", "bear</w>"]),
])
def test_class_token_spans_on_the_real_clip_tokenizer(embedder, name, span, words):
    assert embedder.token_span(name) == span
    ids = embedder.tokenizer(f"a photograph of a {name}").input_ids
    assert embedder.tokenizer.convert_ids_to_tokens(ids[span[0]:span[1]]) == words


def test_class_embedding_is_the_mean_over_its_tokens_and_cached(embedder):
    calls = []
    handle = embedder.text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        emb = embedder(["hair drier", "dog", "hair drier"])
        assert emb.shape == (3, 32) and torch.equal(emb[0], emb[2])
        embedder(["dog", "hair drier"])
    finally:
        handle.remove()
    assert len(calls) == 1
    ids = embedder.tokenizer("a photograph of a hair drier", padding="max_length",
                             max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = embedder.text_encoder(ids)[0][0]
    torch.testing.assert_close(emb[0], hidden[5:7].mean(0))
