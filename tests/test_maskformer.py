"""MaskFormer for Protocol II: the model and its traps, the data stream, and the Ray Train job."""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers import MaskFormerImageProcessor

from eval.metrics import IoUAccumulator
from factory.schema import SEGMENTATION_SCHEMA, encode_png
from factory.store import ShardStore
from train.maskformer.data import (
    CLASS_LISTS,
    encode_units,
    load_units,
    open_sources,
    plan_units,
    stream,
)
from train.maskformer.job import probe_input
from train.maskformer.model import (
    MaskFormerTraining,
    build_maskformer,
    image_processor,
    load_backbone,
    semantic_scores,
    targets,
)
from train.maskformer.optim import Schedule, build_optimizer, clip_and_step

SIZE = 48


def load_batch(batch: dict[str, np.ndarray], *, sources, seed: int,
               size: int) -> dict[str, np.ndarray]:
    """Stream rows (columns of `stream`'s rows) -> position, image and label, through the job's
    own path: packed into units (`plan_units`), then read by `load_units`."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    packed = encode_units(plan_units(rows))
    return load_units({"units": np.asarray([r["units"] for r in packed])}, sources=sources,
                      seed=seed, size=size)


def toy_sample(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with a red square (class 1, aeroplane) and/or a green one (class 8, cat):
    labels are a known function of the pixels."""
    image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.uint8)
    for cls, channel in ((1, 0), (8, 1)):
        if rng.random() < 0.7:
            s = int(rng.integers(size // 4, size // 2))
            y, x = rng.integers(0, size - s, 2)
            image[y:y + s, x:x + s] = 0
            image[y:y + s, x:x + s, channel] = 220
            label[y:y + s, x:x + s] = cls
    return image, label


def write_label_set(root: str, n: int, *, seed: int = 0, fold: str = "zs3",
                    shard_size: int = 8) -> str:
    """A `factory label`-style folder of n toy samples (what MaskFormer reads of it)."""
    rng = np.random.default_rng(seed)
    samples = [toy_sample(rng) for _ in range(n)]
    run = {"kind": "segmentation", "split": "pascal", "fold": fold, "subset": "label", "n": n,
           "shard_size": shard_size, "model": "tiny"}
    store = ShardStore.create_or_resume(root, run, seen=[], unseen=[])
    cols = {f.name: [None] * n for f in SEGMENTATION_SCHEMA}
    cols.update(index=list(range(n)), split=["pascal"] * n, fold=[fold] * n,
                image=[encode_png(im) for im, _ in samples],
                label=[encode_png(lab) for _, lab in samples],
                height=[SIZE] * n, width=[SIZE] * n)
    table = pa.Table.from_pydict(cols, schema=SEGMENTATION_SCHEMA)
    for k in range(store.num_shards):
        store.write_shard(k, table.slice(k * shard_size, shard_size))
    return root


def write_voc(root: str, ids: list[str], seed: int = 1, size: int = 40) -> str:
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in ids:
        image, label = toy_sample(rng, size)
        label[0, :] = 255  # VOC's object borders
        label[1, :] = 18  # sofa: unseen in fold zs3
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", i + ".jpg"))
        Image.fromarray(label).save(os.path.join(root, "SegmentationClass", i + ".png"))
    with open(os.path.join(root, "ImageSets/Segmentation/train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return root


def test_the_head_has_one_more_class_than_the_labels_for_no_object():
    model = build_maskformer("tiny", num_labels=21).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 64, 64))
    assert out.class_queries_logits.shape == (1, 16, 22)
    assert build_maskformer("paper", 21).config.backbone_config.depths == [3, 4, 23, 3]


def test_queries_start_apart_as_in_the_original_code():
    """transformers' own init (N(0, 0.02) decoder weights and queries) gives every query the
    same output at the start (spread ~0.004), and training never separates them."""
    model = build_maskformer("tiny", num_labels=21).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 64, 64,
                                             generator=torch.Generator().manual_seed(0)))
    spread = out.transformer_decoder_last_hidden_state.std(dim=1).mean()  # across queries
    assert spread > 0.1


def test_a_tiny_maskformer_learns_the_toy_shapes(tmp_path):
    """On the job's stream, crops, loss and schedule (deep supervision, backbone lr x0.1, poly
    decay, gradient clipping at 0.01), a tiny MaskFormer learns to segment held-out toy images
    (mIoU of background, aeroplane and cat > 0.8: 0.92 here; 0.27 if it learns one mask)."""
    sources, classes, _ = open_sources([write_label_set(str(tmp_path / "labels"), 64)])
    steps, batch, crop = 500, 8, 64  # crops upscale the 48-pixel images: masks at 1/4 size
    rows = stream(sources, seed=0, start=0, count=steps * batch)
    data = load_batch({k: np.array([r[k] for r in rows]) for k in rows[0]}, sources=sources,
                      seed=0, size=crop)
    model = build_maskformer("tiny", len(classes.names)).train()
    trainer = MaskFormerTraining(model)
    schedule = Schedule(steps=steps, lr=1e-3)
    opt, lr_schedule = build_optimizer(trainer, schedule)
    processor = image_processor()
    with torch.random.fork_rng(devices=[]):  # the decoder's dropout
        torch.manual_seed(0)
        for step in range(steps):
            part = slice(step * batch, (step + 1) * batch)
            loss = sum(trainer(**targets(processor, data["image"][part], data["label"][part],
                                         "cpu")).values())
            opt.zero_grad()
            loss.backward()
            clip_and_step(trainer, opt, lr_schedule, schedule)
    model.eval()
    acc = IoUAccumulator(len(classes.names), include_background=True)
    rng = np.random.default_rng(99)  # not the training set's seed
    for _ in range(16):
        image, label = toy_sample(rng)
        acc.update(semantic_scores(model, processor, image, crop).argmax(dim=0).numpy(), label)
    assert acc.miou([0, 1, 8]) > 0.8, acc.iou([0, 1, 8])
    # the scores Protocol II takes its two VOC argmaxes from are transformers' own
    image, _ = toy_sample(rng)
    enc = processor(images=[image], return_tensors="pt", input_data_format="channels_last")
    with torch.no_grad():
        theirs = processor.post_process_semantic_segmentation(
            model(pixel_values=enc["pixel_values"]), target_sizes=[(SIZE, SIZE)])[0]
    np.testing.assert_array_equal(semantic_scores(model, processor, image, SIZE).argmax(0),
                                  theirs)


def test_reduce_labels_would_turn_the_ignore_label_into_a_class():
    """The trap: with do_reduce_labels, 255 becomes 254 and is trained as a class. Our
    processor keeps it ignored (training ids are mapped beforehand)."""
    label = np.array([[0, 1], [255, 255]], dtype=np.uint8)
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    reduced = MaskFormerImageProcessor(do_resize=False, do_reduce_labels=True, ignore_index=255)
    assert 254 in reduced(images=[image], segmentation_maps=[label],
                          return_tensors="pt")["class_labels"][0].tolist()
    enc = image_processor()(images=[image], segmentation_maps=[label], return_tensors="pt")
    assert enc["class_labels"][0].tolist() == [0, 1]
    assert enc["mask_labels"][0][:, 1].sum() == 0  # ignored pixels belong to no target mask


def test_mixed_sizes_would_pad_binary_masks_with_255_so_crops_share_one_size(tmp_path):
    """The trap: the processor pads a smaller image's 0/1 target masks with 255, a value the
    mask loss takes at face value. The training stream crops every source to one size."""
    enc = image_processor()(images=[np.zeros((2, 2, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)],
                            segmentation_maps=[np.ones((2, 2), np.uint8),
                                               np.ones((4, 4), np.uint8)],
                            return_tensors="pt", input_data_format="channels_last")
    assert enc["mask_labels"][0][0, 3, 3] == 255
    sources, _, _ = open_sources([write_label_set(str(tmp_path / "labels"), 4),  # 48 pixels
                                  write_voc(str(tmp_path / "voc"), ["a", "b"])])  # 40 pixels
    rows = stream(sources, seed=0, start=0, count=6)
    batch = load_batch({k: np.array([r[k] for r in rows]) for k in rows[0]}, sources=sources,
                       seed=0, size=32)
    assert batch["image"].shape == (6, 32, 32, 3) and batch["label"].shape == (6, 32, 32)
    masks = image_processor()(images=list(batch["image"]), segmentation_maps=list(batch["label"]),
                              return_tensors="pt", input_data_format="channels_last")["mask_labels"]
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)


def test_label_values_map_to_training_ids():
    pascal, coco = CLASS_LISTS["pascal"], CLASS_LISTS["coco"]
    assert len(pascal.names) == 21 and len(coco.names) == 80
    lut = pascal.lut(unseen=("sofa",))
    assert lut[0] == 0 and lut[1] == 1 and lut[18] == 255 and lut[255] == 255 and lut[21] == 255
    lut = coco.lut()
    assert lut[0] == 255 and lut[1] == 0 and lut[90] == 79 and lut[12] == 255  # 12: no class


def test_stream_resumes_at_a_position_with_the_same_items_and_crops(tmp_path):
    label_set = write_label_set(str(tmp_path / "labels"), 20)
    voc = write_voc(str(tmp_path / "voc"), [f"2007_{i:06d}" for i in range(5)])
    sources, classes, fold = open_sources([label_set, voc])
    assert (classes.name, fold) == ("pascal", "zs3")
    whole = stream(sources, seed=3, start=0, count=60)  # 25 a epoch: over two epochs
    assert stream(sources, seed=3, start=37, count=23) == whole[37:]
    assert sorted(r["member"] for r in whole[:25]) == sorted(r["member"] for r in whole[25:50])
    assert [r["member"] for r in whole[:25]] != [r["member"] for r in whole[25:50]]
    cols = {k: np.array([r[k] for r in whole]) for k in whole[0]}
    batch = load_batch(cols, sources=sources, seed=3, size=32)
    assert batch["image"].shape == (60, 32, 32, 3) and batch["label"].shape == (60, 32, 32)
    again = load_batch({k: v[37:] for k, v in cols.items()}, sources=sources, seed=3, size=32)
    np.testing.assert_array_equal(again["image"], batch["image"][37:])
    np.testing.assert_array_equal(again["label"], batch["label"][37:])
    voc_labels = batch["label"][[r["source"] == 1 for r in whole]]
    assert 18 not in voc_labels and set(np.unique(voc_labels)) <= {0, 1, 8, 255}


def test_data_folders_must_agree(tmp_path):
    a = write_label_set(str(tmp_path / "a"), 4, fold="zs3")
    b = write_label_set(str(tmp_path / "b"), 4, fold="1")
    with pytest.raises(ValueError, match="different splits or folds"):
        open_sources([a, b])
    with pytest.raises(ValueError, match="neither `factory label` output nor a VOC folder"):
        open_sources([str(tmp_path)])


def test_job_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, run_cli):
    from train.maskformer.job import main

    a = write_label_set(str(tmp_path / "a"), 4, fold="zs3")
    b = write_label_set(str(tmp_path / "b"), 4, fold="1")
    coco = write_label_set(str(tmp_path / "coco"), 4, fold="zs3")
    manifest = os.path.join(coco, "manifest.json")
    with open(manifest) as f:
        text = f.read()
    assert '"split": "pascal"' in text
    with open(manifest, "w") as f:  # the same set, labelled as COCO classes
        f.write(text.replace('"split": "pascal"', '"split": "coco"'))
    out = str(tmp_path / "run")
    voc = write_voc(str(tmp_path / "voc"), ["a"])
    tiny = ["--variant", "tiny"]
    cases = [
        (["--data", a, "--data", b, *tiny], "different splits or folds"),
        (["--data", a, "--data", coco, *tiny], "different splits or folds"),
        (["--data", a, "--backbone-weights", "maskformer-swin-base-coco"], "seen the unseen"),
        (["--data", a, "--backbone-weights", str(tmp_path / "none.pth")], "no backbone weights"),
        (["--data", a, "--variant", "huge"], "unknown variant 'huge'"),
        (["--data", a, "--steps", "0"], "steps must be > 0"),
        (["--data", a, "--resume", *tiny], "nothing to resume"),
        (["--data", str(tmp_path), *tiny], "neither `factory label` output nor a VOC folder"),
        # the paper's recipe: an ImageNet backbone, a global batch, a fold, MaskFormer's solver
        (["--data", a], "--variant paper starts ResNet-101 from ImageNet weights: give "
                        "--backbone-weights FILE (torchvision's ResNet-101 ImageNet weights"),
        (["--data", a], "resnet101-63fe2227.pth"),
        (["--data", a, "--random-backbone", "--backbone-weights", a], "not both"),
        (["--data", a, "--init-from", a, "--random-backbone"], "drop --backbone-weights"),
        (["--data", a, "--init-from", str(tmp_path), *tiny], "holds no MaskFormer checkpoint"),
        (["--data", a, "--batch-size", "8", "--num-workers", "3", *tiny],
         "--batch-size 8 is the global batch: it must be a multiple of --num-workers 3"),
        (["--data", voc, *tiny], "VOC folders alone need --fold"),
        (["--data", voc, "--fold", "9", *tiny], "unknown"),
        (["--data", a, "--fold", "1", *tiny], "--fold 1 differs from the --data folders' fold zs3"),
        (["--data", voc, "--fold", "zs3", "--voc-train-list", str(tmp_path / "none.txt"), *tiny],
         "is not a file"),
        (["--data", a, "--warmup-steps", "10", "--steps", "10", *tiny],
         "warm-up steps must be in 0 .. 9"),
        (["--data", a, "--clip-grad-norm", "-1", *tiny], "gradient clip must be >= 0"),
        (["--data", a, "--lr", "0", *tiny], "lr must be > 0"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(main, [*argv, "--out", out])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not os.path.exists(out)


def test_torchvision_resnet101_weights_load_into_the_backbone(tmp_path):
    import torchvision

    tv = torchvision.models.resnet101().eval()
    path = str(tmp_path / "resnet101.pth")
    torch.save(tv.state_dict(), path)
    model = build_maskformer("paper", 21)
    load_backbone(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.model.pixel_level_module.encoder.eval()(x).feature_maps[-1]
        theirs = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(
            tv.conv1(x))))))))
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="seen the unseen classes"):
        load_backbone(model, str(tmp_path / "maskformer-swin-base-coco"))


@pytest.fixture(scope="module")
def toy_labels(tmp_path_factory):
    return write_label_set(str(tmp_path_factory.mktemp("toy") / "labels"), 32)


@pytest.mark.slow
def test_ray_train_job_learns_checkpoints_reloads_and_resumes(ray_local, toy_labels, tmp_path):
    """One Ray Train run on 2 CPU workers and its resumption: the global batch split across
    the workers, the recipe reaching the optimiser and the loss, DDP keeping both workers'
    parameters equal, the mask count averaged over the workers, and a resumed job whose model,
    before its first step, reproduces the logits saved with the checkpoint."""
    from train.maskformer.job import PROBE, latest_checkpoint, load_maskformer, train

    out = str(tmp_path / "run")
    args = dict(variant="tiny", crop=64, batch_size=8, lr=1e-3, num_workers=2,
                cpus_per_worker=0.5, report_every=4, warmup_steps=2)
    first = train([toy_labels], out, steps=8, **args).metrics_dataframe
    assert list(first["step"]) == [4, 8] and list(first["position"]) == [32, 64]
    assert first["loss"].iloc[-1] < first["loss"].iloc[0]  # it learns
    # the schedule: the lr of updates 3 and 7 (poly over 8 steps, past the warm-up), the
    # backbone at 0.1x, the gradient clipped; deep supervision: 2 decoder layers x 3 terms
    schedule = Schedule(steps=8, lr=1e-3, warmup_steps=2)
    assert list(first["lr"]) == pytest.approx([1e-3 * schedule.factor(3),
                                               1e-3 * schedule.factor(7)])
    assert list(first["backbone_lr"]) == pytest.approx(list(0.1 * first["lr"]))
    assert (first["grad_norm"] > 0.01).all() and (first["loss_terms"] == 6).all()
    for checksums in first["param_checksums"]:
        assert len(checksums) == 2 and checksums[0] == checksums[1]  # DDP: one model
    counts = [np.array(c) for c in first["mask_counts"]]  # (worker, step) masks in 4 crops
    normalisers = [np.array(n) for n in first["mask_normalisers"]]
    assert any((c[0] != c[1]).any() for c in counts)  # the workers' counts differ...
    for c, n in zip(counts, normalisers, strict=True):  # ...yet both divide by their mean
        np.testing.assert_array_equal(n[0], n[1])
        np.testing.assert_array_equal(n[0], np.maximum(c.mean(axis=0), 1))
    assert first["reload_probe_difference"].isna().all()  # a new model: nothing reloaded
    model, info = load_maskformer(out)
    assert (info["step"], info["split"], info["fold"]) == (8, "pascal", "zs3")
    assert (info["batch_size"], info["backbone"]) == (8, "random")
    with torch.no_grad():  # the reloaded weights give the logits the trainer saw at saving
        again = model(pixel_values=probe_input())
    saved = torch.load(os.path.join(latest_checkpoint(out), PROBE))
    assert torch.equal(again.class_queries_logits, saved["class"])
    assert torch.equal(again.masks_queries_logits, saved["mask"])
    assert list(first["job_started_at_step"]) == [0, 0] and first["job_first_item"].iloc[0] == 0
    resumed = train([toy_labels], out, steps=12, resume=True, **args).metrics_dataframe
    # a resumed job starts at its saved step and stream position (items 64-95), not at 0,
    # from the saved weights: their probe logits are the saved ones, before any step
    last = resumed.iloc[-1]
    assert (last["step"], last["position"], last["job_started_at_step"]) == (12, 96, 8)
    assert last["job_first_item"] == 64 and last["reload_probe_difference"] == 0
    assert last["lr"] == pytest.approx(1e-3 * Schedule(steps=12, lr=1e-3).factor(11))


def test_init_from_continues_a_trained_model_with_a_fresh_optimiser(tmp_path, capsys):
    """Model D's finetuning, without Ray: the worker's start from --init-from has the
    checkpoint's weights (checked by its probe logits), step 0, no optimiser state, the
    schedule's first lr; a checkpoint whose weights are not the saved ones is refused."""
    from factory.errors import FactoryError
    from train.maskformer.job import PROBE, plan, save_checkpoint, start

    labels = write_label_set(str(tmp_path / "labels"), 8)
    synthetic = plan([labels], str(tmp_path / "C"), variant="tiny", steps=10)
    model = build_maskformer("tiny", 21, seed=5)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = str(tmp_path / "C" / "checkpoint")
    save_checkpoint(ckpt, model, opt, 10, 80, {**synthetic["info"], "step": 10})
    voc = write_voc(str(tmp_path / "voc"), ["a", "b"])
    cfg = plan([voc], str(tmp_path / "D"), variant="tiny", steps=20, lr=1e-3,
               init_from=str(tmp_path / "C"), warmup_steps=5, warmup_factor=0.1)
    assert cfg["init_from"] == os.path.abspath(ckpt) and cfg["info"]["backbone"] == "init-from"
    assert cfg["info"]["fold"] == "zs3"  # VOC alone: the checkpoint's fold
    trainer, opt, _, step, reload = start(cfg, None, "cpu")
    assert (step, reload) == (0, 0.0) and opt.state_dict()["state"] == {}
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert (lrs["head"], lrs["backbone"]) == pytest.approx((1e-4, 1e-5))  # the warm-up's start
    for (name, p), q in zip(trainer.model.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    for argv, message in [
        (dict(fold="1"), "was trained for pascal fold zs3, not pascal fold 1"),
        (dict(fold="zs3", variant="paper"), "is a tiny MaskFormer: pass --variant tiny"),
    ]:
        with pytest.raises(FactoryError, match=message):
            plan([voc], str(tmp_path / "D2"), init_from=ckpt, **{"variant": "tiny", **argv})
    other = build_maskformer("tiny", 21, seed=6)  # as if the weights were not reloaded
    torch.save({"class": other(pixel_values=probe_input()).class_queries_logits.detach(),
                "mask": torch.load(os.path.join(ckpt, PROBE))["mask"]},
               os.path.join(ckpt, PROBE))
    with pytest.raises(RuntimeError, match="does not reproduce its probe logits"):
        start(cfg, None, "cpu")
    capsys.readouterr()


def test_an_unfinished_label_run_is_refused_unless_partial_data_is_allowed(tmp_path):
    labels = write_label_set(str(tmp_path / "labels"), 16)
    store = ShardStore.open(labels)
    os.remove(store.shard_path(1))  # as if `factory label` were still running
    with pytest.raises(ValueError, match=r"unfinished run \(1 of 2 shards done\).*--allow-part"):
        open_sources([labels])
    sources, _, _ = open_sources([labels], allow_partial=True)
    assert [len(rows) for _, rows in sources[0].groups] == [8]
