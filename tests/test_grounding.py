import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_triplets

from actors.frozen_sd import FrozenSD
from factory.store import ShardStore
from train.grounding.checkpoint import CheckpointError, load_grounding_head
from train.grounding.data import training_batch
from train.grounding.model import SegBlock, build_grounding_head, grounding_loss, trained_pairs
from train.grounding.trainer import mask_iou, train_step

TINY_GROUPS = ((128, 1), (128, 2), (112, 4), (96, 8))  # tiny SD's feature groups: channels, size


def tiny_inputs(b, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(b, c, r, r, generator=g) for c, r in TINY_GROUPS]
    return feats, torch.randn(b, k, 32, generator=g)


@pytest.mark.parametrize("conditional", [False, True])
def test_samples_and_padding_do_not_mix_across_the_batch(conditional):
    torch.manual_seed(0)
    head = build_grounding_head("tiny", conditional_norm=conditional).eval()
    feats, text = tiny_inputs(4)
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    with torch.no_grad():
        both = head(feats, text, valid, size=(64, 64))                # B = 4, one- and two-class
        for i in range(4):
            k = int(valid[i].sum())
            alone = head([f[i:i + 1] for f in feats], text[i:i + 1, :k], size=(64, 64))
            assert alone.shape == (1, k, 64, 64)
            torch.testing.assert_close(both[i, :k], alone[0], atol=1e-5, rtol=1e-5)


def test_paper_head_shapes():
    """The official widths and resolutions: mix blocks of 48, 112, 240 channels at 32, 64, 64;
    a 240-d mask embedding per class from a 3-layer pre-norm decoder."""
    head = build_grounding_head("paper").eval()
    feats = [torch.randn(1, c, r, r) for c, r in zip((15360, 14080, 8320, 5120), (8, 16, 32, 64),
                                                      strict=True)]
    mixed = []
    handles = [m.register_forward_hook(lambda m, a, out: mixed.append(tuple(out.shape[1:])))
               for m in head.visual.mix]
    try:
        with torch.no_grad():
            logits = head(feats, torch.randn(1, 2, 768), size=(512, 512))
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (1, 2, 512, 512)
    assert mixed == [(48, 32, 32), (112, 64, 64), (240, 64, 64)]
    assert head.fusion.mask_mlp[-1].out_features == head.cfg.pixel_dim == 240
    layers = head.fusion.decoder.layers
    assert len(layers) == 3 and all(layer.norm_first for layer in layers)
    assert head.fusion.decoder.norm is None


def test_reducing_before_upsampling_is_the_official_encoder():
    """The official `_prepare_features` upsamples each group but the finest 2x and then applies
    its 1x1 conv; ours reduces first. Both orders, and so both encoders, agree."""
    torch.manual_seed(0)
    visual = build_grounding_head("tiny").visual.eval()
    feats, _ = tiny_inputs(2)

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        for reduce, f in zip(visual.reduce[:-1], feats[:-1], strict=True):
            size = 2 * f.shape[-1]
            torch.testing.assert_close(reduce(up(f, size)), up(reduce(f), size))
        low = visual.reduce[0](up(feats[0], 2))                                 # 2x2
        mid = visual.mix[0](torch.cat([up(low, 4), visual.reduce[1](up(feats[1], 4))], 1))
        high = visual.mix[1](torch.cat([up(mid, 8), visual.reduce[2](up(feats[2], 8))], 1))
        highest = visual.mix[2](torch.cat([high, visual.reduce[3](feats[3])], 1))
        torch.testing.assert_close(visual(feats), highest)


def test_seg_block_is_the_official_pre_activation_block():
    """`SegBlock.forward` of the official code, on our block's spectral-normalised weights: batch
    norm (training, eps 1e-4) first, the residual from the normalised input, no ReLU at the end."""
    torch.manual_seed(0)
    block = SegBlock(8).train()
    block.conv1.eval()  # freezes the spectral norm's power iteration, so both see one weight
    block.conv2.eval()
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    stats = [torch.zeros(8), torch.ones(8), torch.zeros(8), torch.ones(8)]

    def conv(c, h):
        return F.conv2d(h, c.weight, c.bias, padding=1)

    ref_x = F.batch_norm(x, stats[0], stats[1], None, None, True, 0.1, 1e-4)
    h = conv(block.conv1, F.relu(ref_x))
    h = F.batch_norm(h, stats[2], stats[3], None, None, True, 0.1, 1e-4)
    ref = conv(block.conv2, F.relu(h)) + ref_x
    out = block(x)
    torch.testing.assert_close(out, ref)
    assert (out < 0).any()
    torch.testing.assert_close(block.norm1.bn.running_mean, stats[0])
    for c in (block.conv1, block.conv2):  # spectral norm ~1: divided by its top singular value
        sigma = torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)
        assert 0.99 < sigma < 1.1, sigma


def test_loss_is_bce_over_seen_non_empty_masks():
    logits = torch.zeros(2, 2, 4, 4, requires_grad=True)
    masks = torch.zeros(2, 2, 4, 4)
    masks[0, 0, :2] = 1          # sample 0, class 0: half the pixels
    masks[1, 0] = 1              # sample 1, class 0: all pixels; class 1 empty
    valid = torch.tensor([[True, False], [True, True]])  # sample 0 class 1: padding
    assert grounding_loss(logits, masks, valid).item() == pytest.approx(np.log(2))
    logits2 = torch.zeros(2, 2, 4, 4)
    logits2[1, 1] = -10.0        # confident "nothing" on the empty mask...
    logits2[0, 0] = -10.0        # ...and right everywhere on sample 0
    logits2[0, 0, :2] = 10.0
    skip = grounding_loss(logits2, masks, valid)
    keep = grounding_loss(logits2, masks, valid, skip_empty=False)
    # skip: mean of (~0 for sample 0 class 0, ln 2 for sample 1 class 0) over 2 pairs;
    # keep: also the empty mask, predicted ~right, over 3 pairs
    assert skip.item() == pytest.approx(np.log(2) / 2, abs=1e-3)
    assert keep.item() == pytest.approx(np.log(2) / 3, abs=1e-3)
    none = grounding_loss(logits, masks, torch.zeros(2, 2, dtype=torch.bool))
    none.backward()
    assert none.item() == 0 and logits.grad is not None


def test_mask_iou():
    logits = torch.full((1, 2, 4, 4), -1.0)
    logits[0, 0, :2] = 1.0
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :1] = 1
    masks[0, 1, :] = 1
    use = torch.tensor([[True, False]])
    assert mask_iou(logits, masks, use) == pytest.approx(0.5)


def batches_of(root):
    table = ShardStore.open(root).read()
    cols = {c: np.array(table.column(c).to_pylist() + [None], dtype=object)[:-1]
            for c in table.column_names}
    return training_batch(cols, seen=ShardStore.open(root).manifest["seen"])


# The learning test's toy task. Mask k of a sample covers the pixels where channel k of the
# UNet's first layer (`conv_in`, the first map of the finest feature group) applied to the stored
# latent x_t, upsampled bilinearly to the image, exceeds one fixed threshold per channel (its
# 80th percentile over the first 64 training samples: ~20% of the pixels). It is a known
# function of the latent that the head sees only through the recomputed features, and it picks
# the channel by the class name, so only a working data path, feature extractor, class embedding,
# head and loss learn it; and unlike the top-20% cells of x_t itself it generalises:
# - x_t (std ~5.5, spatially white) is not linear in the features (a ridge regression from 5x5
#   neighbourhoods of the finest group recovers it with R^2 ~0.93, the head far worse), while
#   conv_in(x_t) is, exactly;
# - 8x8-pixel cells disagree with the head's bilinearly upsampled 8x8 logits (an isolated cell
#   predicted as +1 among -1 gets IoU 0.62); the upsampled map's level set is exactly what a
#   linear read-out of the features gives;
# - a per-sample quantile needs a global statistic of the sample; a fixed threshold is local.
# Measured (train / held-out IoU after training): top-20% cells of x_t, 512 samples, 1000 steps:
# 0.64 / 0.37; per-sample top 20% of upsampled conv_in, 1024 samples, 500 steps: 0.87 / 0.84;
# this task, 256 samples, 300 steps: 0.94 / 0.90 (torch seeds 0-3: held-out 0.89-0.91); this
# task with the features shuffled across samples: 0.15 / 0.05.
TOY_CLASSES = ("bird", "bus", "diningtable", "motorbike")  # pascal fold 1 seen; the tiny text
# encoder's embeddings of these are the least alike of its seen classes (cosine <= 0.96; 0.97 to
# 0.99 for KNOWN_CLASSES), so the head tells them apart in fewer steps
TOY_TRAIN, TOY_HELD_OUT, TOY_QUANTILE = 256, 64, 0.8
TOY_SEED = 100  # the training samples' first noise seed; the held-out ones start at 100x


@contextlib.contextmanager
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they spin:
    the learning test took 160 s there with torch's default 2 threads, 14 s with 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def first_layer_maps(sd: FrozenSD, x_t: np.ndarray) -> torch.Tensor:
    """(B, 4, h, w) latents -> the UNet's conv_in output upsampled to the image, (B, C, 8h, 8w)."""
    with torch.no_grad():
        maps = sd.pipe.unet.conv_in(torch.from_numpy(np.asarray(x_t, dtype=np.float32)))
    return F.interpolate(maps, scale_factor=8, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory, tiny_generator):
    """Training and held-out (other noise seeds, other class draws) triplet folders of the toy
    task above, and the FrozenSD whose conv_in defines it."""
    with one_torch_thread():
        return make_toy_data(tmp_path_factory, tiny_generator)


def make_toy_data(tmp_path_factory, tiny_generator):
    from factory.prompts import prompt_for

    sd = FrozenSD("tiny", "cpu")
    root = tmp_path_factory.mktemp("toy")

    def draw(n, seed):
        rng = np.random.default_rng(seed)
        return [tuple(rng.choice(TOY_CLASSES, size=1 + i % 2, replace=False)) for i in range(n)]

    train, held_out = draw(TOY_TRAIN, 0), draw(TOY_HELD_OUT, 1)
    ref = train[:64]
    x_ref = tiny_generator({"prompt": np.array([prompt_for(c) for c in ref], dtype=object),
                            "noise_seed": np.arange(len(ref)) + TOY_SEED})["x_t"]
    maps = first_layer_maps(sd, x_ref)[:, :len(TOY_CLASSES)]
    thresholds = torch.quantile(maps.transpose(0, 1).flatten(1), TOY_QUANTILE, dim=1)  # (K,)

    def masks_of(i, x_t, classes):
        maps = first_layer_maps(sd, x_t[None])[0]
        ks = [TOY_CLASSES.index(c) for c in classes]
        return (maps[ks] > thresholds[ks, None, None]).numpy()

    def write(name, classes, first_seed):
        return write_triplets(str(root / name), tiny_generator, classes, masks_of,
                              subset="train", seen=list(TOY_CLASSES), unseen=[],
                              first_seed=first_seed)

    return sd, write("train", train, TOY_SEED), write("held-out", held_out, 100 * TOY_SEED)


def test_head_learns_known_masks_on_cpu(toy_data):
    """Parquet triplets -> training batches -> recomputed features -> head: IoU from < 0.2 to
    > 0.8, on the training samples and on held-out ones (other noise seeds). Measured: train
    0.122 -> 0.942, held-out 0.119 -> 0.902, in 15 s on a busy 2-core CPU. (The old task, the
    top-20% cells of x_t, memorised its 16 samples: held-out IoU ~0.15, issue 14.)"""
    with one_torch_thread():
        before, after = learn_toy_task(*toy_data)
    assert max(before) < 0.2 and min(after) > 0.8, (before, after)


def learn_toy_task(sd, train_root, held_out_root):
    """(train, held-out) IoUs before and after training a seeded tiny head on the toy task."""
    train = sd.inputs(batches_of(train_root))  # features: a deterministic function of the batch
    held_out = sd.inputs(batches_of(held_out_root))
    torch.manual_seed(0)
    head = build_grounding_head("tiny", **sd.head_overrides())
    steps, batch_size = 300, 32
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def iou(inputs):
        feats, text, valid, masks = inputs
        head.eval()
        with torch.no_grad():
            logits = head(feats, text, valid, size=masks.shape[-2:])
        head.train()
        return mask_iou(logits, masks, trained_pairs(masks, valid))

    before = iou(train), iou(held_out)
    feats, text, valid, masks = train
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randperm(len(masks), generator=order)[:batch_size]
        train_step(head, opt, ([f[i] for f in feats], text[i], valid[i], masks[i]))
        schedule.step()
    return before, (iou(train), iou(held_out))


def test_loading_a_folder_without_a_head_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no grounding-head checkpoint"):
        load_grounding_head(str(tmp_path))
    (tmp_path / "head.json").write_text(json.dumps({"config": {"mask_dim": "x"}, "step": 1}))
    with pytest.raises(CheckpointError, match="cannot load the checkpoint"):
        load_grounding_head(str(tmp_path))
