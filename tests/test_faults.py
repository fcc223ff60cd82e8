"""Faults injected into `factory generate` runs (tiny models, the session's local Ray). Each
test fails if the protection it covers is removed. A Ray Train worker killed mid-training is in
tests/test_grounding_job.py."""

import dataclasses
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ray_worker_pids
from simcluster import driver

from actors.names import TEST_DETECTOR
from factory.cli import main
from factory.errors import FactoryError
from factory.integrity import verify
from factory.options import GenerateOptions
from factory.pipeline import generate
from factory.store import ShardStore

pytestmark = pytest.mark.slow

# the test-fixture detector: non-empty masks, so "byte-identical" covers masks too
RUN = ["--split", "pascal", "--n", "8", "--shard-size", "2", "--seed", "4", "--model", "tiny",
       "--steps", "5", "--batch-size", "2", "--label-batch-size", "2", "--detector",
       TEST_DETECTOR]


def shard_bytes(out: str) -> dict[int, bytes]:
    store = ShardStore.open(out)
    return {k: open(store.shard_path(k), "rb").read() for k in store.finished()}


def wait_for_stage_slots(ray_local) -> None:
    """Wait until a stopped run's actors have given the `gen` and `label` slots back (they hold
    them until the failed pipeline, which its exception's traceback refers to, is freed)."""
    deadline = time.time() + 120
    while ray_local.available_resources().get("gen", 0) < 1 or ray_local.available_resources(
            ).get("label", 0) < 1:
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """An uninterrupted run: its folder and its shards' bytes."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    main(["generate", "--out", out, *RUN])
    areas = ShardStore.open(out).read(["areas"]).column("areas").to_pylist()
    assert sum(map(sum, areas)) > 0
    return out, shard_bytes(out)


def test_truncated_and_empty_shards_are_made_again(reference, tmp_path, run_cli, caplog):
    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)
    store = ShardStore.open(out)
    with open(store.shard_path(1), "r+b") as f:
        f.truncate(100)
    open(store.shard_path(3), "wb").close()
    with caplog.at_level("INFO"):
        code, _, err = run_cli(main, ["generate", "--out", out, *RUN])
    assert code == 0, err
    assert "shard 1 is damaged (unreadable, 100 bytes" in caplog.text
    assert "shard 3 is damaged (unreadable, 0 bytes" in caplog.text
    assert shard_bytes(out) == reference[1] and verify(ShardStore.open(out)) == {}


def test_a_second_run_into_a_folder_being_written_is_refused(reference, tmp_path, run_cli):
    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)
    store = ShardStore.open(out)
    os.remove(store.shard_path(2))
    temp = os.path.join(store.data_dir, ".shard-00002-of-00004.parquet.tmp-0123abcd")
    open(temp, "wb").write(b"the other run's shard, half written")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(out, "factory.lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid, "started": "earlier"}, f)
        code, _, err = run_cli(main, ["generate", "--out", out, *RUN])
    finally:
        holder.kill()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert f"is being written by another run: pid {holder.pid} on host" in lines[0]
    assert os.path.exists(temp)  # its cleanup did not touch the other run's files
    assert sorted(ShardStore.open(out).finished()) == [0, 1, 3]


def test_a_killed_driver_leaves_a_folder_that_a_rerun_finishes_identically(
        ray_local, reference, tmp_path, run_cli, caplog):
    out = str(tmp_path / "out")
    address = ray_local.get_runtime_context().gcs_address
    proc = driver(["generate", "--out", out, *RUN, "--address", address])
    deadline = time.time() + 300
    try:  # the manifest, written whole, appears after data/: wait for it before opening
        while not (os.path.isfile(os.path.join(out, "manifest.json"))
                   and ShardStore.open(out).finished()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
    finally:  # a failed wait too: a driver left running would hold the next tests' slots
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = len(ShardStore.open(out).finished())
    assert left < 4  # killed mid-run
    with caplog.at_level("INFO"):
        code, _, err = run_cli(main, ["generate", "--out", out, *RUN])
    assert code == 0, err
    assert f"taking over the lock of {out} from pid {proc.pid}" in caplog.text  # the driver's
    # its write tasks, in the session's Ray, may finish a shard after the kill
    done = re.search(r"(\d) of 4 shards already done", caplog.text)
    assert done and left <= int(done[1]) < 4
    assert shard_bytes(out) == reference[1]


def test_an_interrupted_run_stops_in_one_line_and_leaves_no_ray_process(reference, tmp_path,
                                                                          run_cli):
    """Ctrl-C mid-run (SIGTERM takes the same path, factory/command.py), on the run's own
    local Ray: one line, exit 130, no traceback
    (Ray's atexit hooks included), none of the Ray processes it started left a few seconds
    later (their command lines name its session folder, which ends with the driver's pid),
    and a rerun finishes byte-identical."""
    out = str(tmp_path / "out")
    proc = driver(["generate", "--out", out, *RUN])
    deadline = time.time() + 300
    try:
        while not (os.path.isfile(os.path.join(out, "manifest.json"))
                   and ShardStore.open(out).finished()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(ShardStore.open(out).finished())
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"factory: interrupted after {done} of 4 shards; "
                                            "rerun the same command to finish")
    deadline = time.time() + 10
    while [p for p in ray_session_pids(f"_{proc.pid}/")]:
        assert time.time() < deadline, ray_session_pids(f"_{proc.pid}/")
        time.sleep(0.5)
    code, _, err = run_cli(main, ["generate", "--out", out, *RUN])
    assert code == 0, err
    assert shard_bytes(out) == reference[1]


def ray_session_pids(marker: str) -> list[int]:
    """Processes whose command line holds `marker`."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_a_resume_that_resolves_differently_is_refused_unless_drift_is_allowed(
        reference, tmp_path, caplog):
    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)
    store = ShardStore.open(out)
    resolved = store.manifest["resolved"]
    assert resolved["precision"] == "float32" and resolved["sd_weights"].startswith("tiny")
    os.remove(store.shard_path(3))
    store.record("resolved", {**resolved, "precision": "bfloat16", "torch": "0.1"})
    options = GenerateOptions(out=out, split="pascal", n=8, shard_size=2, seed=4, model="tiny",
                              detector=TEST_DETECTOR, steps=5, batch_size=2, label_batch_size=2)
    with pytest.raises(FactoryError, match=r"\(precision bfloat16 then, float32 now; torch 0\.1 "
                                           r"then, .* now\).*--allow-drift"):
        generate(options)
    assert ShardStore.open(out).finished() == [0, 1, 2]
    with caplog.at_level("WARNING"):
        result = generate(dataclasses.replace(options, allow_drift=True))
    assert result.shards_written == 1 and "notice: --allow-drift" in caplog.text
    drift = ShardStore.open(out).manifest["drift"]
    assert len(drift) == 1 and drift[0]["from"] == {"precision": "bfloat16", "torch": "0.1"}
    assert drift[0]["to"]["precision"] == "float32"


def test_verify_checks_every_checksum_and_lists_the_bad_shards(reference, tmp_path, run_cli):
    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)
    code, stdout, _ = run_cli(main, ["verify", out])
    assert code == 0 and "4 of 4 shards verified" in stdout
    path = ShardStore.open(out).shard_path(2)
    data = bytearray(open(path, "rb").read())
    data[50] ^= 0xFF  # a flipped bit in a data page: size and footer as recorded
    open(path, "wb").write(bytes(data))
    code, _, err = run_cli(main, ["verify", out])
    lines = err.strip().splitlines()
    assert code == 1 and lines[0].startswith("shard 2 (shard-00002-of-00004.parquet): its SHA")
    assert lines[1].startswith("1 bad shard(s)")
    code, _, err = run_cli(main, ["verify", str(tmp_path)])
    assert code == 2 and "not a factory output folder" in err


def test_a_stage_that_keeps_failing_stops_the_run_in_one_line_and_logs_the_traceback(
        ray_local, tmp_path):
    from actors.maskrcnn_labeller import MaskRCNNLabeller
    from factory.graph import Labeller
    from factory.identity import prepare
    from factory.pipeline import _run
    from factory.schema import to_triplets

    class BrokenLabeller(MaskRCNNLabeller):  # defined here: Ray ships it to the actors by value
        def __call__(self, batch):
            if 5 in batch["index"]:
                raise RuntimeError("CUDA out of memory (injected)")
            return super().__call__(batch)

    options = GenerateOptions(out=str(tmp_path / "out"), split="pascal", n=8, shard_size=2,
                              seed=4, model="tiny", steps=5, batch_size=2, label_batch_size=2)
    plan, store = prepare(options)
    labeller = Labeller(BrokenLabeller, dict(vocab="pascal", detector="tiny"), to_triplets,
                        dict(detector="tiny"), images_per_s=1.0)
    with pytest.raises(FactoryError) as failed:
        _run(options, plan, store, labeller)
    message = str(failed.value)
    del failed  # its traceback holds the stopped pipeline, whose actors hold the stage slots
    gc.collect()
    wait_for_stage_slots(ray_local)  # the next tests need both slots again
    assert message.startswith("the labeller stage failed on samples 4-5 (RuntimeError: CUDA out "
                              "of memory (injected)); its full traceback is in ")
    assert "\n" not in message
    with open(store.log_path) as f:
        log = f.read()
    assert "Traceback" in log and "CUDA out of memory (injected)" in log
    assert 2 not in ShardStore.open(store.root).finished()  # the failed unit's shard is not written


def test_max_failed_samples_skips_and_lists_failing_samples_and_stops_one_past_it(
        ray_local, tmp_path, caplog):
    """The labeller raises on samples 1, 6 and 7 (6 and 7 make a whole unit, and a whole
    shard). One failure allowed: the run stops, naming it; three allowed: the rerun finishes
    without them, each named on the console, listed in the manifest, its traceback logged;
    a shard deleted and made again with a mended labeller holds its samples; a failure once
    earlier runs have used K up stops the run, saying so."""
    from actors.maskrcnn_labeller import MaskRCNNLabeller
    from factory.graph import Labeller
    from factory.identity import prepare
    from factory.pipeline import _run
    from factory.schema import to_triplets
    from factory.stats import dataset_stats, format_stats

    class BrokenLabeller(MaskRCNNLabeller):  # defined here: Ray ships it to the actors by value
        def __call__(self, batch):
            if {1, 6, 7} & set(batch["index"].tolist()):
                raise ValueError("a corrupt image (injected)")
            return super().__call__(batch)

    def run(k, cls=BrokenLabeller):
        options = GenerateOptions(out=str(tmp_path / "out"), split="pascal", n=8, shard_size=2,
                                  seed=4, model="tiny", steps=5, batch_size=2,
                                  label_batch_size=2, max_failed_samples=k)
        plan, store = prepare(options)
        labeller = Labeller(cls, dict(vocab="pascal", detector="tiny"), to_triplets,
                            dict(detector="tiny"), images_per_s=1.0)
        return _run(options, plan, store, labeller), store

    with pytest.raises(FactoryError) as failed:
        run(1)
    message = str(failed.value)
    del failed  # its traceback holds the stopped pipeline, whose actors hold the stage slots
    gc.collect()
    assert re.fullmatch(r"more than 1 samples failed \(--max-failed-samples 1(, with 1 skipped by "
                        r"earlier runs)?\): the labeller stage failed on sample [167] \(ValueError:"
                        r" a corrupt image \(injected\)\) and [12] more; their tracebacks are in "
                        r".*factory\.log", message), message
    wait_for_stage_slots(ray_local)
    with caplog.at_level("WARNING"):
        result, store = run(3)
    done = ShardStore.open(store.root)
    assert [f["index"] for f in done.failed] == [1, 6, 7] and done.manifest["failed_count"] == 3
    assert {(f["stage"], f["error"]) for f in done.failed} == {
        ("labeller", "ValueError: a corrupt image (injected)")}
    assert verify(done) == {} and len(done.finished()) == 4
    # each sample of the shards this call made was written or skipped (shard size 2)
    assert result.written + result.failed == 2 * result.shards_written
    assert done.read(["index"]).column("index").to_pylist() == [0, 2, 3, 4, 5]
    assert done.records[3]["rows"] == 0  # every sample of shard 3 failed: an empty shard
    for i in (6, 7):
        assert f"skipped sample {i}: the labeller stage kept failing on it" in caplog.text
    with open(store.log_path) as f:
        log = f.read()
    assert "sample 7 skipped; the labeller stage's traceback:\nTraceback" in log
    assert "(3 skipped after failing" in format_stats(dataset_stats(store.root))

    class MendedLabeller(MaskRCNNLabeller):  # all but sample 7
        def __call__(self, batch):
            if 7 in batch["index"].tolist():
                raise ValueError("a corrupt image (injected)")
            return super().__call__(batch)

    os.remove(store.shard_path(3))  # to try its samples again, with the labeller mended
    result, _ = run(2, MendedLabeller)  # shard 3's old failures no longer count: 1 + 7 <= 2
    again = ShardStore.open(store.root)
    assert result.written == 1 and result.failed == 1 and verify(again) == {}
    assert [f["index"] for f in again.failed] == [1, 7] and again.manifest["failed_count"] == 2
    assert again.read(["index"]).column("index").to_pylist() == [0, 2, 3, 4, 5, 6]
    os.remove(store.shard_path(0))  # sample 1 fails again, and sample 7 has used up K = 1
    with pytest.raises(FactoryError) as failed:
        run(1)
    message = str(failed.value)
    del failed
    gc.collect()
    wait_for_stage_slots(ray_local)  # the next tests need both slots again
    assert message.startswith("the labeller stage failed on samples 0-1 (ValueError: a corrupt "
                              "image (injected)) (--max-failed-samples 1: used up by the 1 "
                              "samples earlier runs skipped); its full traceback is in "), message


@pytest.mark.parametrize("code, text", [(28, "No space left on device"),
                                        (13, "Permission denied")])
def test_a_full_disk_or_a_permission_error_mid_run_is_one_line(code, text):
    from factory.failures import run_failure

    class WorkerError(Exception):  # as Ray hands a worker's exception on: the original as .cause
        def __init__(self, cause):
            super().__init__("ray::write_shard() failed")
            self.cause = cause

    disk = OSError(code, os.strerror(code), "/data/out/data/.shard-00001.parquet.tmp-1")
    try:
        raise RuntimeError("the pipeline stopped") from WorkerError(disk)
    except RuntimeError as e:
        failure = run_failure(e, "/data/out/factory.log")
    assert str(failure) == (f"cannot write the output /data/out/data/.shard-00001.parquet.tmp-1: "
                            f"{text}; the full traceback is in /data/out/factory.log")
    assert run_failure(RuntimeError("a bug"), "log") is None  # not a write error: a traceback


def test_a_killed_generator_actor_leaves_every_index_exactly_once(ray_local, tmp_path):
    """SIGKILL of the generator actor once the first shard is written, while the others are
    still to make (200 steps a batch keeps it busy): Ray Data replaces the actor and retries its
    unit, and the shards hold every index once."""
    options = GenerateOptions(out=str(tmp_path / "out"), split="pascal", n=8, shard_size=2,
                              seed=4, model="tiny", steps=200, batch_size=2, label_batch_size=2)
    result = {}
    run = threading.Thread(target=lambda: result.update(run=generate(options)))
    run.start()
    deadline = time.time() + 300
    while not (os.path.isfile(os.path.join(options.out, "manifest.json"))
               and ShardStore.open(options.out).finished()):
        assert run.is_alive() and time.time() < deadline
        time.sleep(0.05)
    generators = ray_worker_pids(b"MapBatches(GeneratorStage)")
    assert len(generators) == 1  # the local Ray has one gen slot
    os.kill(generators[0], signal.SIGKILL)
    assert len(ShardStore.open(options.out).finished()) < 4  # killed with work left
    while set(ray_worker_pids(b"MapBatches(GeneratorStage)")) <= set(generators):
        assert run.is_alive() and time.time() < deadline  # the rest needs a new actor
        time.sleep(0.05)
    run.join(timeout=300)
    assert result["run"].written == 8
    indices = ShardStore.open(options.out).read(["index"]).column("index").to_pylist()
    assert sorted(indices) == list(range(8))
