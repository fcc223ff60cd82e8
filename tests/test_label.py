"""`factory label` end to end on a local Ray with tiny models: an open vocabulary no split
contains, quality filtering, resume; and its bad inputs."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from factory.cli import main
from factory.identity import prepare_label
from factory.options import LabelOptions
from factory.prompts import SamplePlan
from factory.schema import SEGMENTATION_SCHEMA, decode_label, decode_masks
from factory.store import ShardStore
from factory.vocab import open_vocabulary

VOCAB = "# an open vocabulary\nzebra\nred panda\nfire truck, zebra\n"
NAMES = ["zebra", "red panda", "fire truck"]
RUN = ["--n", "6", "--shard-size", "3", "--steps", "5", "--seed", "2", "--batch-size", "2",
       "--label-batch-size", "3", "--per-pair", "2"]


@pytest.fixture(scope="module")
def expected(tiny_generator, tiny_checkpoint):
    """The run's 6 samples made in this process by the two stages, without Ray."""
    from actors.batch import object_column
    from actors.grounding_labeller import GroundingLabeller

    plan = SamplePlan(open_vocabulary(NAMES), "label", 2, (("fire truck", "zebra"),), per_pair=2)
    specs = [plan.sample(i) for i in range(6)]
    batch = tiny_generator({
        "prompt": np.array([s.prompt for s in specs], dtype=object),
        "noise_seed": np.array([s.noise_seed for s in specs]),
        "classes": object_column([list(s.classes) for s in specs]),
        "class_ids": object_column([[NAMES.index(c) + 1 for c in s.classes] for s in specs])})
    return plan, GroundingLabeller(tiny_checkpoint, device="cpu")(batch)


@pytest.fixture(scope="module")
def labelled(ray_local, tiny_checkpoint, expected, tmp_path_factory):
    """The run through the CLI, images below the median quality dropped; the shards as first
    written."""
    root = tmp_path_factory.mktemp("label")
    vocab = root / "vocab.txt"
    vocab.write_text(VOCAB)
    quality = np.sort(expected[1]["quality"])
    cut = float((quality[2] + quality[3]) / 2)  # keeps 3 of the 6
    out = str(root / "out")
    argv = ["label", "--checkpoint", tiny_checkpoint, "--vocab", str(vocab), "--out", out, *RUN,
            "--min-quality", str(cut)]
    main(argv)
    store = ShardStore.open(out)
    return argv, out, cut, {k: pq.read_table(store.shard_path(k)) for k in store.finished()}


@pytest.mark.slow
def test_an_open_vocabulary_is_labelled_with_its_own_ids(labelled, expected):
    _, out, _, _ = labelled
    plan, made = expected
    store = ShardStore.open(out)
    m = store.manifest
    assert m["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    assert m["unseen"] == NAMES and m["seen"] == []  # the head was trained on pascal fold 1
    assert m["run"]["split"] == "custom" and m["pairs"]["source"] == "file"
    assert plan.default_n() == 3 * 500 + 2
    table = store.read()
    assert table.schema.equals(SEGMENTATION_SCHEMA, check_metadata=False)
    for row in table.to_pylist():
        i = row["index"]
        spec = plan.sample(i)
        assert (row["prompt"], tuple(row["classes"])) == (spec.prompt, spec.classes)
        assert row["class_ids"] == [NAMES.index(c) + 1 for c in row["classes"]]
        assert row["quality"] == pytest.approx(made["quality"][i], abs=1e-5)
        label = decode_label(row["label"])
        assert (label != made["label"][i]).mean() < 0.01  # batch composition: float rounding
        masks = decode_masks(row["masks"], 64, 64)  # each class's own, may overlap
        assert (masks != decode_masks(made["masks"][i], 64, 64)).mean() < 0.01
        for k, class_id in enumerate(row["class_ids"]):
            assert not ((label == class_id) & ~masks[k]).any()  # the label map picks in them
        assert row["checkpoint"] == m["models"]["checkpoint"] and row["subset"] == "label"


@pytest.mark.slow
def test_images_below_min_quality_are_dropped_and_listed(labelled, expected):
    _, out, cut, tables = labelled
    store = ShardStore.open(out)
    kept = sorted(i for t in tables.values() for i in t.column("index").to_pylist())
    assert kept == [i for i, q in enumerate(expected[1]["quality"]) if q >= cut]
    assert store.dropped == sorted(set(range(6)) - set(kept)) and len(kept) == 3
    assert store.manifest["dropped_count"] == 3 and sorted(tables) == [0, 1]


@pytest.mark.slow
def test_label_resumes_to_the_same_files(labelled, capsys):
    argv, out, _, tables = labelled
    store = ShardStore.open(out)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["dropped_count"] == 3  # the cut drops 3 of the 6: some shard lists them
    k = int(next(iter(manifest["dropped"])))
    lost = manifest["dropped"].pop(str(k))  # as if the run died before recording shard k
    del manifest["shards"][str(k)]
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    os.remove(store.shard_path(1 - k))  # ... and before writing the other one
    main(argv)
    again = ShardStore.open(out)
    assert pq.read_table(again.shard_path(1 - k)).equals(tables[1 - k])
    assert again.dropped == store.dropped and again.manifest["dropped_count"] == 3
    assert lost and again.manifest["dropped"][str(k)] == lost
    capsys.readouterr()
    main(argv)
    assert "nothing to do" in capsys.readouterr().out


@pytest.fixture
def bad_checkpoints(tmp_path, tiny_checkpoint):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    (corrupt / "head.pt").write_bytes(b"not a state dict")
    (tmp_path / "empty").mkdir()
    return {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty"),
            "corrupt": str(corrupt)}


@pytest.mark.parametrize("case, args, message", [
    ("missing", [], "no grounding-head checkpoint"),
    ("empty", [], "no grounding-head checkpoint"),
    ("corrupt", [], "cannot load the checkpoint"),
    ("good", ["--split", "coco"], "trained for split 'pascal', not 'coco'"),
    ("good", ["--fold", "2"], "trained for fold '1', not '2'"),
    ("good", ["--model", "sd15-random"], "trained for SD model 'tiny'"),
    ("good", ["--classes", "a,b", "--vocab", "v.txt"], "not both"),
    ("good", ["--classes", "zebra", "--pairs", "p.json"], "--vocab file"),
    ("good", ["--threshold", "1.5"], "threshold must lie in (0, 1)"),
    ("good", ["--ignore-band", "0.7", "0.3"], "0 < low <= high < 1"),
    ("good", ["--min-quality", "1"], "min quality"),
    ("good", ["--n", "0"], "n must be > 0"),
])
def test_bad_label_input_is_one_line_and_writes_nothing(run_cli, tmp_path, tiny_checkpoint,
                                                        bad_checkpoints, case, args, message):
    ckpt = tiny_checkpoint if case == "good" else bad_checkpoints[case]
    out = tmp_path / "out"
    code, _, err = run_cli(main, ["label", "--checkpoint", ckpt, "--out", str(out), "--model",
                                  "tiny", *args] if "--model" not in args else
                           ["label", "--checkpoint", ckpt, "--out", str(out), *args])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_label_refuses_a_folder_of_another_run(tmp_path, tiny_checkpoint, run_cli):
    out = str(tmp_path / "out")
    prepare_label(LabelOptions(out=out, checkpoint=tiny_checkpoint, n=4))[1].create()
    code, _, err = run_cli(main, ["label", "--checkpoint", tiny_checkpoint, "--out", out,
                                  "--n", "4", "--threshold", "0.6"])
    assert code == 2 and "threshold=0.5 (now 0.6)" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    code, _, err = run_cli(main, ["label", "--checkpoint", tiny_checkpoint, "--out",
                                  str(tmp_path / "other")])
    assert code == 2 and "not an empty folder" in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["coco", "voc", "parquet"])
def test_label_output_exports_and_reads_back(labelled, tmp_path, fmt, run_cli):
    """What `factory label` wrote, exported and read back with pycocotools, PIL and pandas."""
    import pandas as pd
    from PIL import Image
    from pycocotools.coco import COCO

    _, out, _, _ = labelled
    rows = {r["index"]: r for r in ShardStore.open(out).read().to_pylist()}
    dest = tmp_path / fmt
    code, stdout, err = run_cli(main, ["export", out, "--format", fmt, "--out", str(dest)])
    assert code == 0, err
    if fmt == "coco":
        coco = COCO(str(dest / "annotations.json"))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == set(NAMES)
        for i, row in rows.items():
            masks = decode_masks(row["masks"], 64, 64)
            anns = {a["category_id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[i]))}
            for class_id, mask in zip(row["class_ids"], masks, strict=True):
                if mask.any():
                    np.testing.assert_array_equal(coco.annToMask(anns[class_id]), mask)
                else:
                    assert class_id not in anns
            assert (dest / "images" / f"{i:08d}.png").read_bytes() == row["image"]
    elif fmt == "voc":
        names = (dest / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        assert names == [f"{i:08d}" for i in sorted(rows)]
        for i, row in rows.items():
            png = Image.open(dest / "SegmentationClass" / f"{i:08d}.png")
            assert png.mode == "P"
            np.testing.assert_array_equal(np.asarray(png), decode_label(row["label"]))
        categories = json.loads((dest / "categories.json").read_text())
        assert [c["name"] for c in categories] == NAMES
    else:
        df = pd.read_parquet(dest / "data")
        assert sorted(df["index"]) == sorted(rows)
        assert ShardStore.open(str(dest)).manifest == ShardStore.open(out).manifest


@pytest.mark.parametrize("fmt, source, occupied, message", [
    ("tfrecord", "data", False, "unknown export format 'tfrecord'"),
    ("coco", "elsewhere", False, "not a factory output folder"),
    ("voc", "data", True, "exists and is not an empty folder"),
])
def test_bad_export_input_is_one_line_and_leaves_nothing(run_cli, tmp_path, fmt, source,
                                                         occupied, message):
    ShardStore.create_or_resume(str(tmp_path / "data"), {"kind": "triplets", "split": "pascal",
                                                         "n": 1, "shard_size": 1},
                                seen=[], unseen=[])
    (tmp_path / "elsewhere").mkdir()
    dest = tmp_path / "dest"
    if occupied:
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
    code, _, err = run_cli(main, ["export", str(tmp_path / source), "--format", fmt,
                                  "--out", str(dest)])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data", "elsewhere"] + (["dest"] if occupied else []))
    if occupied:
        assert [p.name for p in dest.iterdir()] == ["keep.txt"]
