"""MaskFormer's data without Ray: a worker's units read each shard once per pass, a restarted
worker skips its done items unread, VOC lists (SBD-augmented too), and every run's fold."""

import os
import shutil
from collections import Counter

import numpy as np
import pytest
from test_maskformer import load_batch, write_label_set, write_voc

import train.maskformer.data as data
from train.maskformer.data import (
    decode_units,
    encode_units,
    load_units,
    open_sources,
    plan_units,
    skip_units,
    stream,
)
from train.stream import worker_items


def columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def load(units: list[dict], sources, seed: int, items: int = 64) -> dict[str, np.ndarray]:
    """What a worker's Ray Data tasks make of its units (`encode_units` rows, `load_units`)."""
    rows = encode_units(units, items)
    assert decode_units(rows) == units
    parts = [load_units(columns([r]), sources=sources, seed=seed, size=32) for r in rows]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """40 toy samples in 5 shards of 8."""
    return write_label_set(str(tmp_path_factory.mktemp("units") / "labels"), 40)


@pytest.fixture
def reads(monkeypatch):
    """Counts pyarrow's shard reads by path, and crops made (each a decoded item)."""
    counts = {"read": Counter(), "crops": 0}
    read_table, crop = data.pq.read_table, data.random_resized_crop

    def counted_read(path, *args, **kwargs):
        counts["read"][path] += 1
        return read_table(path, *args, **kwargs)

    def counted_crop(*args, **kwargs):
        counts["crops"] += 1
        return crop(*args, **kwargs)

    monkeypatch.setattr(data.pq, "read_table", counted_read)
    monkeypatch.setattr(data, "random_resized_crop", counted_crop)
    return counts


def test_a_worker_reads_each_shard_once_a_pass(labels, reads):
    """Two workers, per-worker batch 2, over 5 shards: in one pass each worker reads each shard
    once, in two passes at most twice (the old loader read a shard once per 64-row batch that
    touched it)."""
    sources, _, _ = open_sources([labels])
    for passes in (1, 2):
        items = stream(sources, seed=0, start=0, count=40 * passes)
        for mine in worker_items(items, 2, 2):
            reads["read"].clear()
            units = plan_units(mine)
            out = load(units, sources, seed=0, items=3)  # several tasks, units whole
            assert list(out["position"]) == [it["position"] for it in mine]
            assert len(reads["read"]) == 5 and max(reads["read"].values()) == passes
            # a shard that ends a pass and starts the next is read once for both
            assert len(units) == sum(reads["read"].values()) <= 5 * passes


def test_a_restarted_worker_skips_its_done_items_without_decoding_them(labels, reads):
    sources, _, _ = open_sources([labels])
    mine = worker_items(stream(sources, seed=1, start=0, count=48), 4, 2)[1]  # 24 items
    units = plan_units(mine)
    whole = load(units, sources, seed=1)
    reads["crops"] = 0
    rest = skip_units(units, 13)  # three batches of 4 done, and one item into the next
    assert sum(len(u["members"]) for u in rest) == 11
    again = load(rest, sources, seed=1)
    assert reads["crops"] == 11  # the 13 done items were neither read nor decoded
    for key in ("position", "image", "label"):
        np.testing.assert_array_equal(again[key], whole[key][13:])
    assert skip_units(units, 24) == [] and skip_units(units, 0) == units


def test_load_batch_equals_the_units_path(labels):
    sources, _, _ = open_sources([labels])
    rows = stream(sources, seed=2, start=5, count=12)
    a = load_batch(columns(rows), sources=sources, seed=2, size=32)
    b = load(plan_units(rows), sources, seed=2)
    for key in ("position", "image", "label"):
        np.testing.assert_array_equal(a[key], b[key])


def test_voc_alone_needs_a_fold_and_a_label_folder_sets_it(tmp_path, labels):
    voc = write_voc(str(tmp_path / "voc"), ["a", "b"])
    with pytest.raises(ValueError, match="VOC folders alone need --fold"):
        open_sources([voc])
    sources, classes, fold = open_sources([voc], fold="zs3")
    assert (classes.name, fold) == ("pascal", "zs3")
    assert np.asarray(sources[0].lut)[18] == 255  # sofa hidden: unseen in zs3
    with pytest.raises(ValueError, match="unknown"):
        open_sources([voc], fold="7")
    assert open_sources([labels, voc])[2] == "zs3"  # the label folder's fold
    with pytest.raises(ValueError, match="--fold 1 differs from the --data folders' fold zs3"):
        open_sources([labels, voc], fold="1")


def test_a_label_folder_without_a_fold_is_refused(tmp_path):
    folder = write_label_set(str(tmp_path / "nofold"), 4)
    manifest = os.path.join(folder, "manifest.json")
    with open(manifest) as f:
        text = f.read()
    with open(manifest, "w") as f:
        f.write(text.replace('"fold": "zs3"', '"fold": null'))
    with pytest.raises(ValueError, match="labelled without a fold"):
        open_sources([folder])


def test_voc_train_list_reads_sbd_augmented_labels(tmp_path, reads):
    """A list naming images whose labels are in SegmentationClassAug (SBD's), in DeepLab's
    two-path format or as ids; missing files are refused at once."""
    voc = write_voc(str(tmp_path / "voc"), ["2007_000001", "2008_000002", "2008_000003"])
    aug = os.path.join(voc, "SegmentationClassAug")
    os.makedirs(aug)
    for i in ("2008_000002", "2008_000003"):  # SBD images: labels only in the Aug folder
        shutil.move(os.path.join(voc, "SegmentationClass", i + ".png"), aug)
    listed = tmp_path / "train_aug.txt"
    listed.write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
                      "2008_000002\n2008_000003\n")
    sources, _, _ = open_sources([voc], fold="zs3", voc_list=str(listed))
    assert sources[0].augmented == {"2008_000002", "2008_000003"}
    rows = stream(sources, seed=0, start=0, count=3)
    batch = load_batch(columns(rows), sources=sources, seed=0, size=16)
    assert sorted(batch["position"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="is not a file"):
        open_sources([voc], fold="zs3", voc_list=str(tmp_path / "none.txt"))
    os.remove(os.path.join(aug, "2008_000003.png"))
    listed.write_text("2009_000009\n2008_000003\n2007_000001\n")
    with pytest.raises(ValueError, match=r"2 of the 3 images .* JPEGImages/2009_000009.jpg, "
                                         r"SegmentationClass\[Aug\]/2008_000003.png$"):
        open_sources([voc], fold="zs3", voc_list=str(listed))
