import json
import os

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from actors.batch import object_column
from factory.integrity import check_on_resume, redo, remove_partial, verify
from factory.schema import (
    TRIPLET_SCHEMA,
    decode_latent,
    decode_masks,
    decode_png,
    encode_masks,
    to_triplets,
)
from factory.store import DATA, MANIFEST, RECORDS, ShardStore, StoreError

META = dict(split="pascal", fold="1", subset="train", run_seed=7, sd_model="tiny",
            detector="tiny")


def stage_batch(indices, h=16, w=24):
    """What the labeller stage hands on: spec columns, generator and labeller outputs."""
    rng = np.random.default_rng(0)
    n = len(indices)
    masks = [rng.random((1 + i % 2, h, w)) > 0.5 for i in range(n)]
    masks[0][0] = False  # an empty mask
    return {
        "index": np.array(indices, dtype=np.int64),
        "prompt": np.array(["a photograph of a cat"] * n, dtype=object),
        "noise_seed": np.arange(n, dtype=np.int64) + 2**62,
        "classes": object_column([["cat", "dog"][: 1 + i % 2] for i in range(n)]),
        "class_ids": object_column([[8, 12][: 1 + i % 2] for i in range(n)]),
        "image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "x_t": rng.standard_normal((n, 4, h // 8, w // 8)).astype(np.float16),
        "t": np.full(n, 1, dtype=np.int32),
        "masks": object_column([encode_masks(m) for m in masks]),
        "scores": object_column([[0.9] * len(m) for m in masks]),
        "areas": object_column([m.sum((1, 2)).tolist() for m in masks]),
    }, masks


def test_triplets_round_trip_through_parquet_and_pandas(tmp_path):
    batch, masks = stage_batch([0, 1, 2])
    table = to_triplets(batch, **META)
    assert table.schema.equals(TRIPLET_SCHEMA)
    pq.write_table(table, tmp_path / "s.parquet")
    df = pd.read_parquet(tmp_path / "s.parquet")
    assert list(df.columns) == TRIPLET_SCHEMA.names
    for i, row in df.iterrows():
        np.testing.assert_array_equal(decode_png(row["image"]), batch["image"][i])
        np.testing.assert_array_equal(decode_masks(row["masks"], row["height"], row["width"]),
                                      masks[i])
        np.testing.assert_array_equal(
            decode_latent(row["x_t"], row["x_t_shape"], row["x_t_dtype"]), batch["x_t"][i])
        assert list(row["classes"]) == list(batch["classes"][i])
        assert row["noise_seed"] == batch["noise_seed"][i]
    assert df["areas"][0][0] == 0
    assert pq.read_schema(tmp_path / "s.parquet").metadata[b"schema_version"] == b"1"


def make_store(tmp_path, n=10, shard_size=4, **run):
    return ShardStore.create_or_resume(str(tmp_path / "out"), {"kind": "triplets", "n": n,
                                                               "shard_size": shard_size, **run},
                                       seen=[], unseen=[])


def test_shards_are_fixed_ranges_and_written_whole(tmp_path):
    store = make_store(tmp_path)
    assert store.num_shards == 3 and list(store.shard_rows(2)) == [8, 9]
    assert store.todo() == [0, 1, 2]
    table = to_triplets(stage_batch([9, 8])[0], **META)
    store.write_shard(2, table)
    assert store.finished() == [2] and store.todo() == [0, 1]
    assert pq.read_table(store.shard_path(2)).column("index").to_pylist() == [8, 9]
    with pytest.raises(StoreError, match="shard 1 must hold samples"):
        store.write_shard(1, to_triplets(stage_batch([4, 5])[0], **META))
    assert store.finished() == [2]


class HalfWrite:
    """A local filesystem whose writes stop half-way, as on a full disk."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path):
        stream = self.fs.open_output_stream(path)

        class Stream:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data):
                stream.write(b"PAR1 half a file")
                raise OSError("disk full")

        return Stream()


def test_a_crash_while_writing_leaves_no_shard_and_no_temp_file(tmp_path, monkeypatch):
    import factory.store

    store = make_store(tmp_path)
    table = to_triplets(stage_batch([0, 1, 2, 3])[0], **META)
    monkeypatch.setattr(factory.store, "open_location",
                        lambda root: (HalfWrite(), os.path.abspath(root)))
    with pytest.raises(OSError, match="disk full"):
        ShardStore.open(store.root).write_shard(0, table)  # a store that opens HalfWrite
    assert sorted(os.listdir(store.root)) == [DATA, MANIFEST, RECORDS]
    assert not os.listdir(store.data_dir) and not os.listdir(os.path.join(store.root, RECORDS))


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    store = make_store(tmp_path)
    open(os.path.join(store.data_dir, ".shard-00000-of-00003.parquet.tmp-1234abcd"), "wb").close()
    open(os.path.join(store.root, RECORDS, ".shard-00000-of-00003.json.tmp-1234abcd"),
         "wb").close()
    assert remove_partial(store) == 2
    assert not os.listdir(store.data_dir) and not os.listdir(os.path.join(store.root, RECORDS))


def test_rerun_with_same_run_resumes_and_other_run_is_refused(tmp_path):
    store = make_store(tmp_path, seed=1)
    store.write_shard(0, to_triplets(stage_batch([0, 1, 2, 3])[0], **META))
    again = make_store(tmp_path, seed=1)
    assert again.finished() == [0] and again.manifest == store.manifest
    with pytest.raises(StoreError, match=r"holds another run \(seed=1 \(now 2\)\)"):
        make_store(tmp_path, seed=2)
    with open(os.path.join(store.root, MANIFEST)) as f:
        assert json.load(f)["run"]["seed"] == 1


def test_non_empty_foreign_folder_is_refused(tmp_path):
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an empty folder or a factory output"):
        make_store(tmp_path)
    with pytest.raises(StoreError, match="not a factory output folder"):
        ShardStore.open(str(tmp_path / "out"))


def test_a_file_uri_store_writes_the_same_bytes_and_records_each_shard(tmp_path):
    import hashlib

    table = to_triplets(stage_batch([9, 8])[0], **META)
    run = {"kind": "triplets", "n": 10, "shard_size": 4}
    uri = ShardStore.create_or_resume((tmp_path / "uri").as_uri(), run, seen=[], unseen=[])
    path = make_store(tmp_path)
    uri.write_shard(2, table)
    path.write_shard(2, table)
    again = ShardStore.open((tmp_path / "uri").as_uri())
    assert again.root.startswith("file://") and again.finished() == [2]
    data = (tmp_path / "uri" / DATA / "shard-00002-of-00003.parquet").read_bytes()
    assert data == (tmp_path / "out" / DATA / "shard-00002-of-00003.parquet").read_bytes()
    assert again.records == {2: {"rows": 2, "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}}
    assert json.loads((tmp_path / "uri" / RECORDS / "shard-00002-of-00003.json").read_text()) == {
        **again.records[2], "dropped": [], "failed": []}
    assert again.read(["index"]).column("index").to_pylist() == [8, 9]


def record_file(store, k) -> str:
    return os.path.join(store.root, RECORDS, store.layout.record_name(k))


def test_a_shard_written_before_its_record_is_recorded_on_resume(tmp_path):
    store = make_store(tmp_path)
    store.layout.write(1, to_triplets(stage_batch([4, 5, 7])[0], **META), dropped=[6])
    os.remove(record_file(store, 1))  # as if the run died between the shard and its record
    pq.write_table(to_triplets(stage_batch([0, 1, 3])[0], **META),  # as older versions wrote
                   store.shard_path(0))  # it: no list of what it lacks, sample 2 missing
    again = ShardStore.open(store.root)
    assert again.records == {}
    assert check_on_resume(again).unrecorded == [0, 1]
    assert check_on_resume(ShardStore.open(store.root)).unrecorded == []
    again = ShardStore.open(store.root)
    assert again.records[1]["rows"] == 3 and again.records[0]["rows"] == 3
    assert again.dropped == [2, 6] and again.failed == []
    assert os.path.isfile(record_file(store, 0)) and verify(again) == {}


def test_records_written_since_the_last_compaction_are_not_lost(tmp_path):
    store = make_store(tmp_path)
    for k, rows in enumerate(([0, 1, 2, 3], [4, 5, 6, 7])):  # as the write tasks do: no
        record = store.layout.write(k, to_triplets(stage_batch(rows)[0], **META),  # manifest
                                    node="n1", written_at=1.0)
        store.add_records({k: record})
    with open(os.path.join(store.root, MANIFEST)) as f:
        assert "shards" not in json.load(f)  # not compacted: the run died here
    again = ShardStore.open(store.root)  # readers merge the record files
    assert sorted(again.records) == [0, 1] and again.records[1]["node"] == "n1"
    assert store.compact()
    with open(os.path.join(store.root, MANIFEST)) as f:
        assert sorted(json.load(f)["shards"]) == ["0", "1"]


def test_a_record_file_that_disagrees_with_the_manifest_is_redone_from_the_shard(tmp_path,
                                                                                 caplog):
    store = three_written_shards(tmp_path)
    good = dict(store.records[1])
    bad = json.loads(open(record_file(store, 1)).read())
    bad["sha256"] = "0" * 64
    open(record_file(store, 1), "w").write(json.dumps(bad))
    assert "differ in sha256" in verify(ShardStore.open(store.root))[1]
    with caplog.at_level("WARNING"):
        assert list(check_on_resume(ShardStore.open(store.root)).disagree) == [1]
    assert "shard 1: its record file and the manifest differ in sha256; recorded again from " \
           "the shard" in caplog.text
    again = ShardStore.open(store.root)
    assert again.records[1] == good and verify(again) == {}
    assert json.loads(open(record_file(store, 1)).read())["sha256"] == good["sha256"]


def test_failed_samples_are_listed_by_shard_and_cleared_when_the_shard_is_redone(tmp_path):
    store = make_store(tmp_path)
    why = {"index": 6, "stage": "labeller", "error": "RuntimeError: a corrupt image"}
    rows = to_triplets(stage_batch([4, 7])[0], **META)
    with pytest.raises(StoreError, match="2 rows, 1 dropped and 0 failed"):
        store.layout.write(1, rows, dropped=[5])  # sample 6 neither written nor listed
    record = store.layout.write(1, rows, dropped=[5], failed=[why])
    os.remove(record_file(store, 1))  # the run stopped before the record: the shard knows
    again = ShardStore.open(store.root)
    assert check_on_resume(again).unrecorded == [1]
    assert again.records[1] == {**{k: record[k] for k in ("rows", "bytes", "sha256")},
                                "node": None}
    again = ShardStore.open(store.root)
    assert again.failed == [why] and again.dropped == [5]
    assert again.manifest["failed"] == {"1": [why]} and again.manifest["failed_count"] == 1
    assert again.records[1]["rows"] == 2 and "failed" not in again.records[1]
    assert verify(again) == {}
    redo(again, [1])
    assert again.failed == [] and again.dropped == [] and again.todo() == [0, 1, 2]
    assert ShardStore.open(store.root).manifest["failed_count"] == 0
    assert not os.path.exists(record_file(store, 1))


def test_a_planned_run_writes_nothing_until_created_and_can_be_discarded(tmp_path):
    store = ShardStore.plan(str(tmp_path / "new"), {"kind": "triplets", "n": 4,
                                                     "shard_size": 4}, seen=[], unseen=[])
    assert not store.exists and not (tmp_path / "new").exists()
    store.create()
    assert store.exists and sorted(os.listdir(tmp_path / "new")) == [DATA, MANIFEST, RECORDS]
    store.discard()
    assert not (tmp_path / "new").exists()


def three_written_shards(tmp_path) -> ShardStore:
    """A store whose three shards are written and compacted."""
    store = make_store(tmp_path)
    for k, rows in enumerate(([0, 1, 2, 3], [4, 5, 6, 7], [8, 9])):
        store.write_shard(k, to_triplets(stage_batch(rows)[0], **META))
    return ShardStore.open(store.root)


def test_truncated_empty_or_altered_shards_are_found_and_redone(tmp_path):
    store = three_written_shards(tmp_path)
    assert check_on_resume(store).damaged == {} and verify(store) == {}
    size = store.records[0]["bytes"]
    with open(store.shard_path(0), "r+b") as f:
        f.truncate(size // 2)  # what a power loss without fsync may leave
    open(store.shard_path(1), "wb").close()
    data = bytearray(open(store.shard_path(2), "rb").read())
    data[50] ^= 0xFF  # in the first data page: same size and footer, only the checksum tells
    open(store.shard_path(2), "wb").write(bytes(data))
    bad = verify(store)
    assert sorted(bad) == [0, 1, 2] and "SHA-256" in bad[2]
    damaged = check_on_resume(store).damaged  # the cheap checks: size and footer
    assert sorted(damaged) == [0, 1] and "unreadable" in damaged[0] and "0 bytes" in damaged[1]
    redo(store, [2])
    again = ShardStore.open(store.root)
    assert again.finished() == [] and again.records == {} and verify(again) == {}
    assert not os.listdir(os.path.join(store.root, RECORDS))


def test_verify_names_shards_unrecorded_or_missing(tmp_path):
    store = three_written_shards(tmp_path)
    os.remove(record_file(store, 1))
    del store.manifest["shards"]["1"]
    store.compact()
    os.remove(store.shard_path(2))
    bad = verify(ShardStore.open(store.root))
    assert bad == {1: "not recorded: no record file and no manifest entry",
                   2: "recorded, but its file is missing"}


def test_a_local_shard_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    import factory.store

    store = make_store(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(factory.store.os, "fsync", fsync)
    monkeypatch.setattr(factory.store.os, "replace",
                        lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    store.layout.write(2, to_triplets(stage_batch([8, 9])[0], **META))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)] * 2  # and record


def test_one_writer_per_folder(tmp_path, caplog):
    import socket
    import subprocess
    import sys

    store = make_store(tmp_path)
    lock_path = os.path.join(store.root, "factory.lock")
    with store.lock():
        assert json.load(open(lock_path))["pid"] == os.getpid()
        with pytest.raises(StoreError, match=rf"another run: pid {os.getpid()} on host "):
            store.lock()
    assert not os.path.exists(lock_path)  # released
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for holder, refused in ((alive.pid, True), (dead.pid, False)):
            json.dump({"host": socket.gethostname(), "pid": holder, "started": "earlier"},
                      open(lock_path, "w"))
            if refused:
                with pytest.raises(StoreError, match=rf"pid {holder} on host .* since earlier"):
                    store.lock()
            else:
                with caplog.at_level("WARNING"), store.lock():
                    assert json.load(open(lock_path))["pid"] == os.getpid()
                assert f"taking over the lock of {store.root} from pid {holder}" in caplog.text
        json.dump({"host": "elsewhere", "pid": dead.pid, "started": "x"}, open(lock_path, "w"))
        with pytest.raises(StoreError, match="on host elsewhere"):  # cannot be checked: refused
            store.lock()
    finally:
        alive.kill()
