"""`factory.export`: COCO, VOC and Parquet exports of both kinds of output folder, read back with
the readers their users have (pycocotools, torchvision's VOCSegmentation, pandas)."""

import json
import logging
import os
import re

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO

import factory.export as export_module
from actors.batch import object_column
from factory.export import ExportError, export, voc_colormap
from factory.schema import encode_masks, to_segmentation, to_triplets
from factory.store import ShardStore, StoreError

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "red panda"}]
IDS = {c["name"]: c["id"] for c in CATEGORIES}
# Samples 1 and 2 overlap two masks; the higher score is second in 1 and first in 2.
CLASSES = [["cat"], ["cat", "red panda"], ["dog", "cat"], ["red panda"], ["dog", "red panda"]]
SCORES = [[0.2], [0.3, 0.8], [0.9, 0.6], [0.55], [1.0, 0.05]]
KINDS = ("triplets", "segmentation")


def write_folder(root, kind, h=16, w=24, images=None, drop=(), shard_size=2):
    """A hand-made output folder of the 5 samples above, in shards of 2 (the last of 1), with an
    open-vocabulary class ('red panda'). Sample 0's only mask is empty. Triplet masks are random
    and overlap; segmentation label maps are random over 0, 255 and the sample's class ids, the
    masks their pixels of each class. `drop`: indices left out as the quality filter does.
    Returns (root, per sample: masks (K, H, W) bool, label map (H, W) or None, image)."""
    rng = np.random.default_rng(0)
    n = len(CLASSES)
    if images is None:  # smooth, so JPEG keeps them close
        ramp = np.add.outer(np.arange(h) * 4, np.arange(w) * 3)             # (H, W)
        images = np.stack([np.stack([ramp + 40 * i, ramp + 10, 200 - ramp], -1)
                           for i in range(n)]).clip(0, 255).astype(np.uint8)
    masks, labels = [], []
    for i, classes in enumerate(CLASSES):
        if kind == "segmentation":
            ids = [IDS[c] for c in classes] if i else []
            label = rng.choice(np.array([0, 255, *ids], dtype=np.uint8), size=(h, w))
            masks.append(np.stack([label == IDS[c] for c in classes]))
            labels.append(label)
        else:
            masks.append(rng.random((len(classes), h, w)) > 0.5 if i else
                         np.zeros((1, h, w), dtype=bool))
            labels.append(None)
    batch = {
        "index": np.arange(n, dtype=np.int64),
        "prompt": np.array(["a photograph of a " + " and a ".join(c) for c in CLASSES],
                           dtype=object),
        "noise_seed": np.arange(n, dtype=np.int64),
        "classes": object_column(CLASSES),
        "class_ids": object_column([[IDS[c] for c in cs] for cs in CLASSES]),
        "image": images,
        "x_t": np.zeros((n, 4, 2, 3), dtype=np.float16),
        "t": np.full(n, 1, dtype=np.int32),
        "masks": object_column([encode_masks(m) for m in masks]),
        "scores": object_column(SCORES),
        "areas": object_column([m.sum((1, 2)).tolist() for m in masks]),
    }
    meta = dict(split="open", fold="open", run_seed=0, sd_model="tiny")
    run = {"kind": kind, "split": "open", "fold": "open", "n": n, "shard_size": shard_size,
           "model": "tiny"}
    if kind == "segmentation":
        batch.update(label=np.stack(labels),
                     quality=np.array([np.mean(s) for s in SCORES], dtype=np.float32))
        table = to_segmentation(batch, checkpoint="head", subset="label", **meta)
        run.update(subset="label", checkpoint="0123456789abcdef", checkpoint_step=7,
                   threshold=0.5, ignore_band=[0.4, 0.6], min_quality=0.1)
    else:
        table = to_triplets(batch, detector="tiny", subset="train", **meta)
        run.update(subset="train", detector="tiny", oracle="top")
    store = ShardStore.create_or_resume(
        str(root), run, seen=["cat", "dog"], unseen=["red panda"], categories=CATEGORIES,
        pairs={"source": "uniform"})
    for k in range(store.num_shards):
        rows = store.shard_rows(k)
        keep = [i for i in rows if i not in drop]
        store.write_shard(k, table.take(keep), dropped=[i for i in rows if i in drop])
    return str(root), masks, labels, images


def expected_voc_label(kind, masks, label, classes, scores):
    """The label map a VOC export must hold: the stored one, or for triplets each pixel's
    highest-scored covering class (computed here as an argmax, not by painting)."""
    if kind == "segmentation":
        return label
    ids = np.array([IDS[c] for c in classes])
    score = np.where(masks, np.array(scores)[:, None, None], -1.0)         # (K, H, W)
    return np.where(masks.any(0), ids[score.argmax(0)], 0).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_coco_export_reads_back_with_pycocotools(tmp_path, kind, caplog):
    root, masks, _, _ = write_folder(tmp_path / "data", kind)
    with caplog.at_level(logging.INFO, logger="factory.export"):
        r = export(root, "coco", str(tmp_path / "coco"))
    assert "exporting shard 3/3" in caplog.text
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert coco.loadCats(coco.getCatIds()) == CATEGORIES  # open-vocabulary name included
    assert coco.dataset["info"]["kind"] == kind and coco.getImgIds() == [0, 1, 2, 3, 4]
    stored = ShardStore.open(root).read(columns=["index", "image"]).to_pylist()
    for row in stored:
        img = coco.loadImgs(row["index"])[0]
        assert (img["height"], img["width"]) == (16, 24)
        with open(tmp_path / "coco" / "images" / img["file_name"], "rb") as f:
            assert f.read() == row["image"]  # the stored PNG bytes, not re-encoded
    n_anns = 0
    for i, classes in enumerate(CLASSES):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[i]))
        want = [(IDS[c], m) for c, m in zip(classes, masks[i], strict=True) if m.any()]
        assert [a["category_id"] for a in anns] == [c for c, _ in want]
        for a, (_, m) in zip(anns, want, strict=True):
            np.testing.assert_array_equal(coco.annToMask(a), m)
            ys, xs = np.nonzero(m)
            assert a["area"] == m.sum() and a["iscrowd"] == 0
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                 ys.max() - ys.min() + 1]
            assert isinstance(a["segmentation"]["counts"], str)
        n_anns += len(anns)
    assert not coco.getAnnIds(imgIds=[0])  # its only mask is empty
    assert (r.fmt, r.images, r.annotations, n_anns) == ("coco", 5, n_anns, 7)


@pytest.mark.parametrize("kind", KINDS)
def test_voc_export_reads_back_with_torchvision(tmp_path, kind):
    from torchvision.datasets import VOCSegmentation

    root, masks, labels, images = write_folder(tmp_path / "data", kind)
    r = export(root, "voc", str(tmp_path / "VOCdevkit" / "VOC2012"))
    assert (r.images, r.annotations) == (5, None)
    ds = VOCSegmentation(root=str(tmp_path), year="2012", image_set="train")
    assert len(ds) == 5
    for i in range(5):
        image, target = ds[i]
        assert target.mode == "P" and target.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        got = np.array(target)
        want = expected_voc_label(kind, masks[i], labels[i], CLASSES[i], SCORES[i])
        np.testing.assert_array_equal(got, want)
        assert np.abs(np.asarray(image, dtype=int) - images[i]).mean() < 3  # JPEG, quality 95
    if kind == "segmentation":
        assert all((np.array(ds[i][1]) == 255).any() for i in range(5))
    else:  # where two masks overlap, the higher score wins, whichever class is listed first
        both = masks[1][0] & masks[1][1]
        assert both.any() and (np.array(ds[1][1])[both] == IDS["red panda"]).all()
        both = masks[2][0] & masks[2][1]
        assert both.any() and (np.array(ds[2][1])[both] == IDS["dog"]).all()
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    assert json.loads((voc / "categories.json").read_text()) == CATEGORIES
    assert (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [
        f"{i:08d}" for i in range(5)]


def test_voc_colormap_is_the_devkits():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert cmap[[0, 1, 2, 3, 15, 20, 255]].tolist() == [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [192, 128, 128], [0, 64, 128],
        [224, 224, 192]]


def test_voc_refuses_class_ids_a_uint8_map_cannot_hold(tmp_path):
    root, *_ = write_folder(tmp_path / "data", "triplets")
    store = ShardStore.open(root)
    store.manifest["categories"] = [*CATEGORIES, {"id": 255, "name": "fire truck"}]
    store.compact()
    with pytest.raises(ExportError, match="these classes do not fit: fire truck=255"):
        export(root, "voc", str(tmp_path / "voc"))
    assert sorted(os.listdir(tmp_path)) == ["data"]
    export(root, "coco", str(tmp_path / "coco"))  # COCO has no such limit


@pytest.mark.parametrize("fmt", ["coco", "voc", "parquet"])
@pytest.mark.parametrize(("names", "message"), [
    (["cat", "dog", "Dog"], "'dog' and 'Dog' differ only in case or spacing"),
    (["cat", "dog", "dog"], "class name 'dog' is given twice"),
    (["cat", "", "red panda"], "class name 2 of 3 is empty"),
])
def test_an_export_refuses_class_names_a_hand_edited_manifest_spoils(tmp_path, fmt, names,
                                                                      message):
    root, *_ = write_folder(tmp_path / "data", "segmentation")
    store = ShardStore.open(root)
    store.manifest["categories"] = [{"id": c["id"], "name": n}
                                    for c, n in zip(CATEGORIES, names, strict=True)]
    store.compact()
    with pytest.raises(ExportError, match=re.escape(f"the manifest of '{root}' names classes "
                                                    f"badly: {message}")):
        export(root, fmt, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.mark.parametrize("kind", KINDS)
def test_parquet_export_is_the_same_folder(tmp_path, kind):
    root, *_ = write_folder(tmp_path / "data", kind, drop=[3])
    os.makedirs(tmp_path / "copy")  # an empty folder may be replaced
    r = export(root, "parquet", str(tmp_path / "copy"))
    assert (r.images, r.out) == (4, str(tmp_path / "copy"))
    copy, orig = ShardStore.open(str(tmp_path / "copy")), ShardStore.open(root)
    assert copy.manifest == orig.manifest and copy.dropped == [3] and copy.kind == kind
    a = pd.read_parquet(os.path.join(root, "data"))
    b = pd.read_parquet(os.path.join(r.out, "data"))
    assert list(b["index"]) == [0, 1, 2, 4]
    pd.testing.assert_frame_equal(a, b)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    root, *_ = write_folder(tmp_path / "data", "triplets")
    with pytest.raises(ExportError, match="unknown export format 'yolo': choose one of coco, "
                                          "voc, parquet"):
        export(root, "yolo", str(tmp_path / "o"))
    with pytest.raises(StoreError, match="not a factory output folder"):
        export(str(tmp_path), "coco", str(tmp_path / "o"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out in ("busy", "file"):
        with pytest.raises(ExportError, match="exists and is not an empty folder"):
            export(root, "coco", str(tmp_path / out))
    assert sorted(os.listdir(tmp_path)) == ["busy", "data", "file"]
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_an_occupied_out_is_refused_before_any_model_library_loads(tmp_path):
    """`factory export` into an existing --out answers as fast as the other refusals: the
    check comes before the tokenizer (transformers, torch) loads."""
    import subprocess
    import sys

    root, *_ = write_folder(tmp_path / "data", "triplets")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code = ("import sys\nfrom factory.cli import main\ntry:\n"
            f"    main(['export', {root!r}, '--format', 'coco', '--out', "
            f"{str(tmp_path / 'busy')!r}])\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('transformers', 'torch') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.split("\n")[0] == "2 []", run.stdout + run.stderr
    assert "exists and is not an empty folder" in run.stderr


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_a_failure_mid_export_leaves_no_folder_and_no_temp_folder(tmp_path, monkeypatch, fmt):
    root, *_ = write_folder(tmp_path / "data", "segmentation")
    name = export_module._name
    calls = []

    def fail_on_the_fourth_image(index):  # after shards 0 and 1 are written out
        calls.append(index)
        if len(calls) == 4:
            raise OSError("disk full")
        return name(index)

    monkeypatch.setattr(export_module, "_name", fail_on_the_fourth_image)
    with pytest.raises(OSError, match="disk full"):
        export(root, fmt, str(tmp_path / "out"))
    assert len(calls) == 4 and sorted(os.listdir(tmp_path)) == ["data"]

