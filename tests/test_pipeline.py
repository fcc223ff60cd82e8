"""`factory generate` end to end on a local Ray with tiny models."""

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from actors.names import TEST_DETECTOR
from factory.cli import main
from factory.integrity import verify
from factory.options import GenerateOptions
from factory.pipeline import generate
from factory.prompts import SamplePlan
from factory.schema import TRIPLET_SCHEMA, decode_masks, decode_png
from factory.stats import dataset_stats
from factory.store import ShardStore
from factory.vocab import get_split

pytestmark = pytest.mark.slow

# the test-fixture detector: masks that are a fixed function of the image, never all empty,
# so that the resume and determinism tests below compare real masks
RUN = ["--split", "pascal", "--fold", "2", "--n", "7", "--seed", "3", "--model", "tiny",
       "--steps", "5", "--detector", TEST_DETECTOR]


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    """7 samples in shards of 4 through the CLI, in work units of 3 (the last one runs past n);
    the tables of its shards as first written."""
    out = str(tmp_path_factory.mktemp("gen") / "out")
    main(["generate", "--out", out, *RUN, "--shard-size", "4", "--batch-size", "2",
          "--label-batch-size", "3"])
    store = ShardStore.open(out)
    return out, {k: pq.read_table(store.shard_path(k)) for k in store.finished()}


def test_generate_writes_every_sample_once_in_shards_pandas_and_ray_read(ray_local, first_run):
    out, tables = first_run
    assert sorted(tables) == [0, 1]
    assert sorted(os.listdir(out)) == ["data", "factory.log", "manifest.json", "records"]
    assert sorted(os.listdir(os.path.join(out, "records"))) == [
        "shard-00000-of-00002.json", "shard-00001-of-00002.json"]
    data = os.path.join(out, "data")
    assert sorted(os.listdir(data)) == [
        "shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"]
    df = pd.read_parquet(data)
    assert sorted(df["index"]) == list(range(7))
    plan = SamplePlan(get_split("pascal", "2"), "train", 3)
    for _, row in df.iterrows():
        spec = plan.sample(int(row["index"]))
        assert row["prompt"] == spec.prompt and tuple(row["classes"]) == spec.classes
        assert row["noise_seed"] == spec.noise_seed and row["split"] == "pascal"
        assert decode_png(row["image"]).shape == (64, 64, 3)
        assert decode_masks(row["masks"], 64, 64).shape == (len(spec.classes), 64, 64)
        assert row["t"] == 1 and row["sd_model"] == "tiny" and row["detector"] == TEST_DETECTOR
    assert 0 < sum(a for areas in df["areas"] for a in areas) < 7 * 2 * 64 * 64  # masks to test
    ds = ray_local.data.read_parquet(data)
    assert ds.count() == 7 and set(TRIPLET_SCHEMA.names) <= set(ds.schema().names)


def test_stats_count_what_the_shards_hold(first_run, capsys):
    out, tables = first_run
    s = dataset_stats(out)
    assert (s.shards_done, s.num_shards, s.samples) == (2, 2, 7)
    classes = [c for t in tables.values() for cs in t.column("classes").to_pylist() for c in cs]
    assert s.masks == len(classes)
    assert {c: v.samples for c, v in s.per_class.items()} == {c: classes.count(c)
                                                              for c in set(classes)}
    main(["stats", out])
    text = capsys.readouterr().out
    assert "shards 2/2 done, samples 7/7" in text and "class pairs: uniform" in text


def test_rerun_adds_nothing_and_a_lost_shard_comes_back_identical(ray_local, first_run, capsys):
    out, tables = first_run
    store = ShardStore.open(out)
    mtimes = {k: os.path.getmtime(store.shard_path(k)) for k in tables}
    main(["generate", "--out", out, *RUN, "--shard-size", "4"])
    assert "nothing to do: all 2 shards" in capsys.readouterr().out
    assert {k: os.path.getmtime(store.shard_path(k)) for k in tables} == mtimes
    os.remove(store.shard_path(1))
    r = generate(GenerateOptions(out=out, split="pascal", fold="2", n=7, seed=3, model="tiny",
                                 detector=TEST_DETECTOR, steps=5, shard_size=4, batch_size=2,
                                 label_batch_size=3))
    assert (r.written, r.shards_written, r.shards_skipped) == (3, 1, 1)
    assert set(r.warm_up_s) == {"generator", "labeller"}  # each actor's, shown while running
    assert all(s >= 0 for secs in r.warm_up_s.values() for s in secs)
    records = ShardStore.open(out).records
    assert records[1]["written_at"] > records[0]["written_at"]  # rewritten just now
    assert os.path.getmtime(store.shard_path(0)) == mtimes[0]
    assert pq.read_table(store.shard_path(1)).equals(tables[1])


def test_samples_do_not_depend_on_shard_or_batch_size(ray_local, first_run, tmp_path, caplog):
    out, tables = first_run
    other = str(tmp_path / "other")
    with caplog.at_level("INFO"):
        generate(GenerateOptions(out=other, split="pascal", fold="2", n=7, seed=3, model="tiny",
                                 detector=TEST_DETECTOR, steps=5, shard_size=64, batch_size=3,
                                 label_batch_size=1))  # a shard larger than n
    # 3 work units, yet on this machine's own Ray the pools keep to its one slot of each stage
    assert ("3 work units of 3; pools: generators 1 (0 GPU each), labellers 1 (0 GPU each)"
            in caplog.text)
    a = pd.concat([t.to_pandas() for t in tables.values()]).sort_values("index")
    b = pd.read_parquet(os.path.join(other, "data")).sort_values("index")
    for col in ("index", "prompt", "noise_seed", "t"):
        assert list(a[col]) == list(b[col])
    assert [list(c) for c in a["classes"]] == [list(c) for c in b["classes"]]
    for x, y in zip(a["image"], b["image"], strict=True):  # float sums may regroup by batch
        assert np.abs(decode_png(x).astype(int) - decode_png(y)).max() <= 1
    for x, y in zip(a["masks"], b["masks"], strict=True):  # a pixel at 127/128 may flip
        assert (decode_masks(x, 64, 64) != decode_masks(y, 64, 64)).mean() < 0.01


def test_the_readme_first_command_finishes_at_any_n(ray_local, tmp_path, run_cli):
    """The quick start's call at n = 8: one work unit of 16 (the default batch size) runs past
    n inside the only shard, of 256. Its rows past n are dropped."""
    out = str(tmp_path / "g1")
    code, text, err = run_cli(main, ["generate", "--split", "pascal", "--n", "8", "--model",
                                     "tiny", "--seed", "1", "--out", out, "--steps", "5"])
    assert code == 0, err
    assert "wrote 8 samples (1 shards)" in text
    store = ShardStore.open(out)
    assert store.read(["index"]).column("index").to_pylist() == list(range(8))
    assert verify(store) == {} and store.records[0]["rows"] == 8


def test_demo_runs_the_whole_chain_and_can_run_again(ray_local, tmp_path, capsys):
    import json

    from PIL import Image

    demo = tmp_path / "demo"
    main(["demo", "--out", str(demo)])
    text = capsys.readouterr().out
    assert "wrote 16 samples (2 shards)" in text
    assert "shards 2/2 done, samples 16/16" in text
    assert "grounding head: 10 steps, loss" in text
    assert ShardStore.open(str(demo / "triplets")).manifest["run"]["model"] == "tiny"
    labels = ShardStore.open(str(demo / "labels"))
    assert labels.kind == "segmentation" and len(labels.read(["index"])) == 8
    assert len(json.loads((demo / "export" / "coco" / "annotations.json").read_text())[
        "images"]) == 8
    assert len(list((demo / "export" / "voc" / "SegmentationClass").iterdir())) == 8
    assert Image.open(demo / "grid.png").size == (3 * 256, 3 * 256)  # 8 tiles, 3 a row
    report = json.loads((demo / "protocol1.json").read_text())
    assert report["kept"] == 8 and set(report["rows"]) == {"grounding head", "DAAM"}
    assert "| grounding head |" in text and "meaningless" in text
    assert "MaskFormer (tiny): 4 steps on the labels, loss" in text
    segmentation = json.loads((demo / "protocol2.json").read_text())
    assert (segmentation["dataset"], segmentation["fold"], segmentation["images"]) == (
        "voc", "1", 8)
    assert set(segmentation["conventions"]) == {"voc20", "voc20_argmax21", "voc21"}
    assert "| VOC, 20 classes, background ignored, argmax over the 20 object classes" in text
    assert "Protocol II numbers are meaningless" in text
    for folder in ("triplets", "labels", "test", ""):  # a report page of each, and one of both
        page = demo / folder / "report" / "index.html"  # protocols' results
        assert "report of " in text and str(page) in text
        assert "</html>" in page.read_text()
    main(["demo", "--out", str(demo)])
    text = capsys.readouterr().out
    assert text.count("nothing to do: all") == 3 and "grounding head: 10 steps" in text
    assert "MaskFormer (tiny): 4 steps on the labels" in text
    assert json.loads((demo / "protocol2.json").read_text()) == segmentation
