"""MaskFormer's recipe, piece by piece, without Ray: the ImageNet backbone frozen as detectron2's
FrozenBN, deep supervision as MaskFormer computes it, the mask count averaged over workers,
and the optimiser and schedule of its `train_net.py` and configs."""

import numpy as np
import pytest
import torch
from transformers import MaskFormerForInstanceSegmentation

from train.maskformer.model import (
    MaskFormerTraining,
    build_maskformer,
    image_processor,
    targets,
)
from train.maskformer.optim import Schedule, build_optimizer, clip_and_step, param_groups


def crops(n: int = 2, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random images with one to three labelled squares each (PASCAL training ids)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for cls in rng.choice(np.arange(1, 21), int(rng.integers(1, 4)), replace=False):
            y, x = rng.integers(0, size // 2, 2)
            labels[i, y:y + size // 3, x:x + size // 3] = cls
    return images, labels


@pytest.fixture
def batch():
    return targets(image_processor(), *crops(), "cpu")


def trained_like(model):
    """`model` with its decoder's final LayerNorm away from the identity it starts as (so a
    missing or doubled LayerNorm shows)."""
    norm = model.model.transformer_module.decoder.layernorm
    with torch.no_grad():
        norm.weight.mul_(3.0)
        norm.bias.add_(0.5)
    return model


def test_without_deep_supervision_the_loss_is_transformers_own(batch):
    """Our forward reproduces transformers' loss on the last layer, so training supervises
    the predictions inference makes."""
    model = trained_like(build_maskformer("tiny", 21)).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = model(**batch).loss
        torch.manual_seed(0)
        ours = sum(MaskFormerTraining(model, deep_supervision=False)(**batch).values())
    torch.testing.assert_close(ours, theirs)


def test_deep_supervision_adds_every_earlier_layers_terms_as_maskformer_computes_them(batch):
    """tiny has 2 decoder layers: the last layer's three terms, and layer 0's three computed
    from norm(layer 0's output), as DETR's decoder with return_intermediate (MaskFormer's
    transformer.py: `intermediate.append(self.norm(output))`)."""
    model = trained_like(build_maskformer("tiny", 21)).eval()  # no dropout: comparable terms
    last = MaskFormerTraining(model, deep_supervision=False)(**batch)
    every = MaskFormerTraining(model)(**batch)
    assert set(every) == {*last, "loss_cross_entropy_0", "loss_mask_0", "loss_dice_0"}
    for key, value in last.items():
        torch.testing.assert_close(every[key], value)
    decoder = model.model.transformer_module.decoder
    seen = []
    hook = decoder.layers[0].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = model.model(batch["pixel_values"])
    hook.remove()
    hs = decoder.layernorm(seen[0][0] if isinstance(seen[0], tuple) else seen[0])  # (B, Q, C)
    classes = model.class_predictor(hs)
    masks = torch.einsum("bqc,bchw->bqhw", model.mask_embedder(hs),
                         out.pixel_decoder_last_hidden_state)
    layer0 = model.criterion(masks, classes, batch["mask_labels"], batch["class_labels"])
    for key, weight in (("loss_cross_entropy", 1.0), ("loss_mask", 20.0), ("loss_dice", 1.0)):
        torch.testing.assert_close(every[key + "_0"], weight * layer0[key])


def test_mask_count_is_this_workers_without_a_process_group(batch):
    trainer = MaskFormerTraining(build_maskformer("tiny", 21))
    trainer(**batch)
    local = sum(len(c) for c in batch["class_labels"])
    assert trainer.criterion.last_counts == (local, float(local))


def test_poly_schedule_with_linear_warmup_at_its_landmarks():
    """detectron2's WarmupPolyLR: lr(i) = base x warm-up(i) x (1 - i / steps) ** 0.9."""
    s = Schedule(steps=100, lr=1e-3, warmup_steps=10, warmup_factor=0.01)
    model = build_maskformer("tiny", 21)
    opt, schedule = build_optimizer(model, s)
    seen = {}
    for step in range(100):
        seen[step] = {g["name"]: g["lr"] for g in opt.param_groups}
        opt.step()
        schedule.step()
    head = {step: lrs["head"] for step, lrs in seen.items()}
    assert head[0] == pytest.approx(1e-3 * 0.01)  # warm-up starts at the factor
    assert head[5] == pytest.approx(1e-3 * (0.01 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)
    assert head[10] == pytest.approx(1e-3 * (1 - 10 / 100) ** 0.9)  # warm-up over
    assert head[99] == pytest.approx(1e-3 * (1 / 100) ** 0.9)  # the last update
    for lrs in seen.values():
        assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"])
    # MaskFormer's own semantic configs: no warm-up (WARMUP_ITERS 0), poly from the start
    assert Schedule().factor(0) == 1.0 and Schedule().factor(20_000) == pytest.approx(0.5 ** 0.9)


def test_a_continued_schedule_stands_where_it_stopped():
    s = Schedule(steps=50, lr=1e-3, warmup_steps=5)
    model = build_maskformer("tiny", 21)
    opt, schedule = build_optimizer(model, s)
    for _ in range(20):
        opt.step()
        schedule.step()
    again, _ = build_optimizer(model, s, start=20, state=opt.state_dict())
    assert [g["lr"] for g in again.param_groups] == pytest.approx(
        [g["lr"] for g in opt.param_groups])
    assert again.param_groups[0]["lr"] == pytest.approx(
        opt.param_groups[0]["initial_lr"] * s.factor(20))


def test_parameter_groups_follow_maskformers_build_optimizer():
    model = build_maskformer("tiny", 21)
    groups = {g["name"]: g for g in param_groups(model, Schedule(lr=1e-4, weight_decay=1e-4))}
    assert set(groups) == {"backbone", "backbone/no-decay", "head", "head/no-decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups.values():
        backbone = g["name"].startswith("backbone")
        assert all(("pixel_level_module.encoder." in names[id(p)]) == backbone
                   for p in g["params"])
        assert g["lr"] == pytest.approx(1e-5 if backbone else 1e-4)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no-decay") else 1e-4)
    no_decay = {names[id(p)] for p in groups["head/no-decay"]["params"]}
    assert "model.transformer_module.queries_embedder.weight" in no_decay  # an embedding
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_clipping_bounds_the_full_models_gradient_norm(batch):
    trainer = MaskFormerTraining(build_maskformer("tiny", 21))
    s = Schedule(steps=10)
    opt, schedule = build_optimizer(trainer, s)
    sum(trainer(**batch).values()).backward()
    grads = [p.grad for p in trainer.parameters() if p.grad is not None]
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    original = opt.step
    after = []

    def step(*args, **kwargs):  # the norm the optimiser sees
        after.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in trainer.parameters()
             if p.grad is not None])))
        return original(*args, **kwargs)

    opt.step = step
    out = clip_and_step(trainer, opt, schedule, s)
    assert out["grad_norm"] == pytest.approx(float(before)) and before > 0.01
    assert float(after[0]) == pytest.approx(0.01, rel=1e-4)
    assert out["lr"]["head"] == pytest.approx(1e-4)


def test_imagenet_backbone_norm_is_frozen_and_reloads_as_plain_batchnorm(tmp_path):
    """Backbone weights (here a tiny transformers ResNet folder with drawn BN statistics) ->
    FrozenBN: train mode uses the stored statistics, and the saved model reloads as plain
    BatchNorm with the same outputs."""
    from transformers import ResNetBackbone

    config = build_maskformer("tiny", 21).config.backbone_config
    resnet = ResNetBackbone(config)
    g = torch.Generator().manual_seed(0)
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    resnet.save_pretrained(str(tmp_path / "imagenet"))
    model = build_maskformer("tiny", 21, backbone_weights=str(tmp_path / "imagenet"))
    encoder = model.model.pixel_level_module.encoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    assert not any("normalization" in n for n, _ in encoder.named_parameters())
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        train_mode = encoder.train()(x).feature_maps[-1]
        eval_mode = encoder.eval()(x).feature_maps[-1]
        reference = resnet.eval()(x).feature_maps[-1]
    torch.testing.assert_close(train_mode, eval_mode)  # batch statistics play no part
    torch.testing.assert_close(eval_mode, reference)  # the loaded statistics do
    model.save_pretrained(str(tmp_path / "ckpt"))
    again = MaskFormerForInstanceSegmentation.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again.model.pixel_level_module.encoder(x).feature_maps[-1],
                                   eval_mode)


def test_the_tiny_variant_keeps_trainable_batchnorm():
    model = build_maskformer("tiny", 21)
    assert any(isinstance(m, torch.nn.BatchNorm2d)
               for m in model.model.pixel_level_module.encoder.modules())
