"""Protocol II: VOC and COCO ground truth, the Table-2 metrics by hand, and the CLI's refusals."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eval.metrics import IoUAccumulator
from eval.protocol2 import (
    ScoreImages,
    Scorer,
    check_inputs,
    coco_semantic,
    evaluate,
    main,
    protocol2_split,
    summarise,
    write_report,
)

# (ground truth, prediction) in VOC values: 1 aeroplane, 15 person (seen in zs3), 18 sofa
# (unseen), 0 background, 255 ignore; 50 is no VOC class (a prediction of nothing)
A_GT = [[1, 1, 0, 0], [15, 15, 255, 18]]
A_PRED = [[1, 0, 0, 0], [15, 1, 15, 50]]
B_GT = [[18, 18], [0, 0]]
B_PRED = [[18, 0], [0, 18]]


def write_voc_val(root, images: dict[str, tuple]) -> str:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name, (gt, _) in images.items():
        gt = np.asarray(gt, dtype=np.uint8)
        Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(
            os.path.join(root, "JPEGImages", name + ".jpg"))
        Image.fromarray(gt).save(os.path.join(root, "SegmentationClass", name + ".png"))
    with open(os.path.join(root, "ImageSets/Segmentation/val.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    return root


def write_predictions(folder, images: dict[str, tuple], use_truth=False) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, (gt, pred) in images.items():
        Image.fromarray(np.asarray(gt if use_truth else pred, dtype=np.uint8)).save(
            os.path.join(folder, name + ".png"))
    return folder


def scored(pairs) -> dict:
    scorer = Scorer("voc")
    totals = {}
    for gt, pred in pairs:
        for conv, (inter, union) in scorer.counts(np.asarray(pred, np.uint8),
                                                  np.asarray(gt, np.uint8)).items():
            acc = totals.setdefault(conv, IoUAccumulator(21, include_background=True))
            acc.intersection += np.asarray(inter)
            acc.union += np.asarray(union)
    return summarise(totals, "voc", *protocol2_split("voc", "zs3"))


def summed(counts: list[dict], n: int) -> dict[str, IoUAccumulator]:
    totals = {}
    for image in counts:
        for conv, (inter, union) in image.items():
            acc = totals.setdefault(conv, IoUAccumulator(n, include_background=True))
            acc.intersection += np.asarray(inter)
            acc.union += np.asarray(union)
    return totals


def test_voc_metrics_match_a_hand_count():
    r = scored([(A_GT, A_PRED), (B_GT, B_PRED)])
    # 20 classes, background ignored: aeroplane 1/3, person 1/2, sofa 1/3
    assert r["voc20"]["per_class"] == pytest.approx({"aeroplane": 100 / 3, "person": 50.0,
                                                     "sofa": 100 / 3})
    assert (r["voc20"]["seen"], r["voc20"]["unseen"], r["voc20"]["harmonic"]) == pytest.approx(
        (500 / 12, 100 / 3, 100 * 120 / 324))
    # 21 classes: background 3/6 joins the seen classes, sofa 1/4
    assert r["voc21"]["per_class"]["background"] == pytest.approx(50.0)
    assert (r["voc21"]["seen"], r["voc21"]["unseen"], r["voc21"]["harmonic"]) == pytest.approx(
        (400 / 9, 25.0, 32.0))
    assert "cat" not in r["voc20"]["per_class"]  # absent from val: not averaged


def test_perfect_predictions_score_100_everywhere():
    r = scored([(A_GT, A_GT), (B_GT, B_GT)])
    for conv in ("voc20", "voc21"):
        assert (r[conv]["seen"], r[conv]["unseen"], r[conv]["harmonic"]) == (100, 100, 100)


def test_coco_semantic_map_overlaps_crowds_and_empty_images():
    def box(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    anns = [{"category_id": 1, "area": 64, "iscrowd": 0, "segmentation": box(0, 0, 8, 8)},
            {"category_id": 18, "area": 4, "iscrowd": 0, "segmentation": box(2, 2, 2, 2)},
            {"category_id": 3, "area": 4, "iscrowd": 1, "segmentation": box(10, 0, 2, 2)}]
    label = coco_semantic(anns, 12, 12)
    assert label[3, 3] == 18 and label[0, 0] == 1 and label[6, 6] == 1  # the dog on top
    assert label[1, 11] == 255 and label[11, 11] == 255  # crowd and no thing are ignored
    assert (coco_semantic([], 5, 6) == 255).all() and coco_semantic([], 5, 6).shape == (5, 6)


def test_coco_zs65_adds_mouse_to_the_fold_1_unseen():
    seen, unseen = protocol2_split("coco", "zs65")
    assert (len(seen), len(unseen)) == (65, 15) and "mouse" in unseen and "airplane" in unseen
    assert protocol2_split("voc", "zs3")[1] == ["pottedplant", "sheep", "sofa", "train",
                                                "tvmonitor"]


@pytest.mark.slow
def test_predictions_folder_through_ray_and_the_report(ray_local, tmp_path, run_cli):
    images = {"2007_000001": (A_GT, A_PRED), "2007_000002": (B_GT, B_PRED)}
    voc = write_voc_val(str(tmp_path / "VOC2012"), images)
    pred = write_predictions(str(tmp_path / "pred"), images)
    report = evaluate(voc=voc, predictions=pred)
    assert report["conventions"] == scored(images.values())
    out, md = write_report(report, str(tmp_path / "report" / "protocol2.json"))
    assert json.load(open(out))["conventions"]["voc20"]["unseen"] == pytest.approx(100 / 3)
    assert "| sofa (unseen) |" in open(md).read() and "(paper" in open(md).read()
    cli_out = tmp_path / "new" / "p2.json"  # the CLI makes the report's folder, log beside it
    code, stdout, _ = run_cli(main, ["--voc", voc, "--predictions", pred, "--out", str(cli_out)])
    assert code == 0 and "| sofa (unseen) |" in stdout
    assert json.loads(cli_out.read_text())["conventions"] == report["conventions"]
    assert (tmp_path / "new" / "p2.log").is_file() and (tmp_path / "new" / "p2.md").is_file()


def test_bad_input_is_one_line(tmp_path, run_cli, capsys):
    images = {"a": (A_GT, A_PRED), "b": (B_GT, B_PRED)}
    voc = write_voc_val(str(tmp_path / "VOC2012"), images)
    pred = write_predictions(str(tmp_path / "pred"), {"a": images["a"]})
    no_val = str(tmp_path / "noval")
    os.makedirs(no_val)
    no_images = write_voc_val(str(tmp_path / "noimages"), images)
    shutil.rmtree(os.path.join(no_images, "JPEGImages"))
    no_labels = write_voc_val(str(tmp_path / "nolabels"), images)
    shutil.rmtree(os.path.join(no_labels, "SegmentationClass"))
    cases = [
        (["--voc", voc, "--predictions", pred], "1 of 2 predictions missing"),
        (["--voc", no_val, "--predictions", pred], "no ImageSets/Segmentation/val.txt"),
        (["--voc", no_images, "--predictions", pred], "not a VOC folder: no JPEGImages"),
        (["--voc", no_labels, "--predictions", pred], "not a VOC folder: no SegmentationClass"),
        (["--voc", voc, "--predictions", str(tmp_path / "nowhere")], "is not a folder"),
        (["--voc", voc, "--coco", voc, "--predictions", pred], "give one of --voc or --coco"),
        (["--voc", voc, "--predictions", pred, "--batch-size", "0"], "batch size must be > 0"),
        (["--coco", str(tmp_path), "--predictions", pred], "no annotations/instances_val2017"),
        (["--voc", voc, "--predictions", pred, "--fold", "zs65"], "unknown fold 'zs65' for VOC"),
        (["--voc", voc], "give one of --checkpoint or --predictions"),
        (["--voc", voc, "--checkpoint", no_val], "no MaskFormer checkpoint"),
    ]
    import torch

    if not torch.cuda.is_available():
        ckpt = constant_checkpoint(str(tmp_path / "ckpt"), "pascal", "zs3", "background", "cat")
        capsys.readouterr()  # transformers' saving progress
        cases.append((["--voc", voc, "--checkpoint", ckpt, "--fold", "zs3", "--device", "cuda"],
                      "--device cuda, but this machine has no CUDA device"))
    for argv, message in cases:
        code, _, err = run_cli(main, argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_the_demos_drawn_voc_folder_reads_as_voc_val(tmp_path):
    from eval.protocol2 import ground_truth, voc_items
    from factory.toyvoc import write_shapes_voc

    root = write_shapes_voc(str(tmp_path / "VOC2012"), 3, seed=4)
    items = voc_items(root)
    assert len(items) == 3
    for item in items:
        label, image_path = ground_truth("voc", root, item)
        image = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
        assert Image.open(os.path.join(root, "SegmentationClass", item + ".png")).mode == "P"
        assert set(np.unique(label)) - {0, 255} and set(np.unique(label)) <= set(range(21)) | {255}
        # the shapes are drawn where the label says (JPEG blurs their edges a little)
        assert image[label == 0].max(axis=1).mean() < 70 < image[label != 0].max(axis=1).mean()


def test_a_checkpoint_of_another_split_or_fold_is_refused(tmp_path, run_cli, capsys):
    """(Scoring a checkpoint through Ray is the demo's last step: tests/test_pipeline.py.)"""
    import torch

    from train.maskformer.job import save_checkpoint
    from train.maskformer.model import build_maskformer

    model = build_maskformer("tiny", 21)
    ckpt = str(tmp_path / "ckpt")
    os.makedirs(ckpt)
    save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), 1, 8,
                    {"kind": "maskformer", "split": "pascal", "fold": "zs3", "crop": 64})
    capsys.readouterr()  # transformers' "Writing model shards" bar
    voc = write_voc_val(str(tmp_path / "VOC2012"), {"a": (A_GT, A_PRED)})
    os.makedirs(os.path.join(tmp_path, "annotations"))
    with open(os.path.join(tmp_path, "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": [], "annotations": [], "categories": []}, f)
    for argv, message in [
        (["--voc", voc, "--fold", "1"], "trained for pascal fold zs3, not VOC fold 1"),
        (["--coco", str(tmp_path)], "trained for pascal fold zs3, not COCO fold zs65"),
    ]:
        code, _, err = run_cli(main, [*argv, "--checkpoint", ckpt, "--out",
                                      str(tmp_path / "r.json")])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(tmp_path / "r.json")


def test_voc20_takes_the_argmax_over_the_object_classes_the_zegformer_way():
    """A crafted prediction of a model with a background class: on the aeroplane and person
    pixels background scores highest, the object second. ZegFormer (no background class) would
    predict the object: voc20 counts it, voc20_argmax21 counts a miss; background pixels stay
    ignored in both."""
    gt = np.array([[1, 1, 0, 0], [15, 15, 255, 18]], np.uint8)
    pred = np.array([[0, 1, 0, 0], [0, 15, 15, 18]], np.uint8)  # the argmax over all 21
    objects = np.array([[1, 1, 5, 9], [15, 15, 15, 18]], np.uint8)  # over the 20 objects
    r = summarise(summed([Scorer("voc").counts(pred, gt, objects)], 21), "voc",
                  *protocol2_split("voc", "zs3"))
    assert set(r) == {"voc20", "voc20_argmax21", "voc21"}
    # objects: aeroplane 2/2, person 2/2, sofa 1/1; bottle (5) and chair (9) sit on background
    assert r["voc20"]["per_class"] == pytest.approx({"aeroplane": 100.0, "person": 100.0,
                                                     "sofa": 100.0})
    # over 21: aeroplane 1/2, person 1/2 (the ignored pixel's prediction counts nowhere), sofa 1
    assert r["voc20_argmax21"]["per_class"] == pytest.approx({"aeroplane": 50.0, "person": 50.0,
                                                              "sofa": 100.0})
    assert (r["voc20"]["seen"], r["voc20_argmax21"]["seen"]) == pytest.approx((100.0, 50.0))
    assert r["voc21"]["per_class"]["background"] == pytest.approx(100 * 2 / 4)  # 2 of 4
    # a label map alone (a predictions folder) is scored as given: no second argmax
    assert set(Scorer("voc").counts(pred, gt)) == {"voc20", "voc21"}


def constant_checkpoint(folder: str, split: str, fold: str, first: str, second: str) -> str:
    """A tiny MaskFormer checkpoint that predicts the same scores at every pixel: class
    `first` highest, `second` next (class logits = a bias, mask logits = 0)."""
    import torch

    from train.maskformer.data import CLASS_LISTS
    from train.maskformer.job import save_checkpoint
    from train.maskformer.model import build_maskformer

    names = CLASS_LISTS[split].names
    model = build_maskformer("tiny", len(names)).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[names.index(first)] = 5.0
        model.class_predictor.bias[names.index(second)] = 4.0
        last = [m for m in model.mask_embedder.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.zero_()
    save_checkpoint(folder, model, torch.optim.AdamW(model.parameters()), 1, 8,
                    {"kind": "maskformer", "split": split, "fold": fold, "crop": 64,
                     "classes": list(names), "background": split == "pascal"})
    return folder


def score(dataset: str, root: str, checkpoint: str, fold: str) -> dict:
    _, _, fold, items = check_inputs(root if dataset == "voc" else None,
                                     root if dataset == "coco" else None, checkpoint, None, fold)
    rows = ScoreImages(dataset, root, checkpoint, None)({"item": np.array(items)})
    n = 21 if dataset == "voc" else 80
    return summarise(summed([json.loads(c) for c in rows["counts"]], n), dataset,
                     *protocol2_split(dataset, fold))


def test_score_images_on_a_crafted_voc_checkpoint_gives_the_hand_count(tmp_path, capsys):
    """Background everywhere over 21 classes, aeroplane over the 20 objects, on A and B."""
    ckpt = constant_checkpoint(str(tmp_path / "ckpt"), "pascal", "zs3", "background",
                               "aeroplane")
    voc = write_voc_val(str(tmp_path / "VOC2012"), {"a": (A_GT, A_PRED), "b": (B_GT, B_PRED)})
    r = score("voc", voc, ckpt, "zs3")
    capsys.readouterr()
    # 20 objects: aeroplane 2 of the 7 object pixels; person (2) and sofa (3) missed
    assert r["voc20"]["per_class"] == pytest.approx({"aeroplane": 200 / 7, "person": 0.0,
                                                     "sofa": 0.0})
    assert (r["voc20"]["seen"], r["voc20"]["unseen"]) == pytest.approx((100 / 7, 0.0))
    # over all 21: background on every object pixel, a miss each
    assert r["voc20_argmax21"]["per_class"] == pytest.approx({"aeroplane": 0.0, "person": 0.0,
                                                              "sofa": 0.0})
    # 21 classes: background 4 of the 11 labelled pixels; seen = (4/11 + 0 + 0) / 3
    assert r["voc21"]["per_class"]["background"] == pytest.approx(400 / 11)
    assert r["voc21"]["seen"] == pytest.approx(400 / 33)
    import torch

    if not torch.cuda.is_available():  # --device cuda never falls back to the CPU
        with pytest.raises(RuntimeError, match="sees no CUDA device; pass --device cpu"):
            ScoreImages("voc", voc, ckpt, None, device="cuda")


def test_coco_scoring_on_a_tiny_coco_folder_and_its_14_unseen(tmp_path, capsys):
    """A COCO-layout folder of boxes: person (seen) 12 pixels, cat (unseen) 12, mouse
    (unseen in zs65, absent from COCO-sim) 4, a crowd region and unlabelled pixels ignored; a
    checkpoint that predicts cat everywhere."""
    root = write_boxes_coco(str(tmp_path / "coco"), [(6, 8, [
        (1, (0, 0, 4, 3), False), (17, (4, 0, 4, 3), False), (74, (0, 3, 2, 2), False),
        (1, (6, 4, 2, 2), True)])])
    ckpt = constant_checkpoint(str(tmp_path / "ckpt"), "coco", "1", "cat", "dog")
    r = score("coco", root, ckpt, "zs65")
    capsys.readouterr()
    # cat: 12 of the 28 labelled pixels; person and mouse missed
    assert r["coco80"]["per_class"] == pytest.approx({"person": 0.0, "cat": 300 / 7,
                                                      "mouse": 0.0})
    assert (r["coco80"]["seen"], r["coco80"]["unseen"]) == pytest.approx((0.0, 150 / 7))
    assert r["coco80_sim14"]["unseen"] == pytest.approx(300 / 7)  # cat alone: mouse left out
    assert len(r["coco80_sim14"]["unseen_classes"]) == 14
    assert "mouse" not in r["coco80_sim14"]["unseen_classes"]


def test_a_checkpoint_without_a_fold_is_refused_for_zero_shot_scoring(tmp_path, run_cli, capsys):
    ckpt = constant_checkpoint(str(tmp_path / "ckpt"), "pascal", None, "background", "cat")
    voc = write_voc_val(str(tmp_path / "VOC2012"), {"a": (A_GT, A_PRED)})
    capsys.readouterr()
    code, _, err = run_cli(main, ["--voc", voc, "--checkpoint", ckpt])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "trained without a zero-shot fold (every class seen)" in err


COCO_BOX = tuple[int, tuple[int, int, int, int], bool]  # category id, (x, y, w, h), crowd


def write_boxes_coco(root: str, images: list[tuple[int, int, list[COCO_BOX]]], *,
                     seed: int = 0) -> str:
    """A COCO val2017-layout folder under `root`: val2017/ID.jpg (dark, each box filled with a
    colour) and annotations/instances_val2017.json, one image per (height, width, boxes) of
    `images`, ids 1, 2, ... Boxes are polygons (a box (x, y, w, h) covers pixels x .. x + w - 1
    and y .. y + h - 1), crowds RLE as in COCO; returns `root`."""
    from pycocotools import mask as mask_utils

    from factory.vocab import COCO_CATEGORIES

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "val2017"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    infos, anns = [], []
    for image_id, (height, width, boxes) in enumerate(images, start=1):
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        name = f"{image_id:012d}.jpg"
        for category, (x, y, w, h), crowd in boxes:
            image[y:y + h, x:x + w] = rng.integers(80, 256, 3, dtype=np.uint8)
            if crowd:
                mask = np.zeros((height, width), dtype=np.uint8, order="F")
                mask[y:y + h, x:x + w] = 1
                rle = mask_utils.encode(mask)
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category,
                         "segmentation": segmentation, "area": w * h, "bbox": [x, y, w, h],
                         "iscrowd": int(crowd)})
        Image.fromarray(image).save(os.path.join(root, "val2017", name))
        infos.append({"id": image_id, "file_name": name, "height": height, "width": width})
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in COCO_CATEGORIES.items()]
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w",
              encoding="utf-8") as f:
        json.dump({"images": infos, "annotations": anns, "categories": categories}, f)
    return root
