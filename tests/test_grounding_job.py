"""The grounding head's Ray Train job (`python -m train.grounding`): training, checkpoints,
resume, and the arguments it refuses."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from conftest import ray_worker_pids

from actors.frozen_sd import FrozenSD
from factory.store import ShardStore
from train.grounding.checkpoint import load_grounding_head
from train.grounding.job import RUN_NAME, iou_text
from train.grounding.job import main as job_main


@pytest.fixture
def run_job(run_cli):
    """`python -m train.grounding ARGV` in this process: (exit status, stdout, stderr)."""
    return lambda argv: run_cli(job_main, argv)


@pytest.mark.slow
def test_ray_train_job_with_two_workers_checkpoints_and_resumes(ray_local, known_mask_data,
                                                                tmp_path, run_job):
    out = str(tmp_path / "ckpt")
    args = ["--data", known_mask_data, "--out", out, "--batch-size", "4", "--lr", "1e-3",
            "--num-workers", "2", "--cpus-per-worker", "0.5", "--report-every", "2"]
    code, stdout, _ = run_job(args + ["--steps", "4"])
    assert code == 0 and "trained to step 4" in stdout
    head, info = load_grounding_head(out)
    assert info["step"] == 4 and (info["split"], info["fold"], info["model"]) == (
        "pascal", "1", "tiny")
    assert info["config"]["in_channels"] == list(FrozenSD("tiny", "cpu").extractor.channels)
    assert info["metrics"]["step"] == 4 and info["metrics"]["loss"] > 0
    # 4 steps of 2 workers x 4 samples: 32 of the 16-sample set's stream, two epochs
    assert info["position"] == info["metrics"]["position"] == 32
    assert info["metrics"]["epoch"] == 2 and info["metrics"]["job_started_at_step"] == 0
    code, _, err = run_job(args + ["--steps", "4", "--resume"])
    assert code == 2 and "trained to step 4 already" in err
    code, stdout, _ = run_job(args + ["--steps", "6", "--resume"])
    assert code == 0 and "trained to step 6" in stdout
    resumed, info = load_grounding_head(out)
    assert info["step"] == 6 and info["position"] == 48
    # the resumed job started at step 4 and at stream item 32, not at 0
    assert info["metrics"]["job_started_at_step"] == 4
    assert info["metrics"]["job_first_item"] == 32
    assert any(not torch.equal(a, b) for a, b in zip(head.state_dict().values(),
                                                      resumed.state_dict().values(), strict=True))
    code, _, err = run_job(args + ["--steps", "8", "--resume", "--seed", "1"])
    assert code == 2 and "cannot resume" in err and "seed 0 then, 1 now" in err


def test_gpu_workers_beyond_the_largest_node_are_refused(ray_local):
    from factory.errors import FactoryError
    from train.jobs import check_gpu_workers_fit_one_node

    check_gpu_workers_fit_one_node(4, use_gpu=False)  # CPU workers may spread
    with pytest.raises(FactoryError, match="1 GPU workers must share one node, but the largest "
                                           "node has 0 GPUs: use at most 0 --num-workers"):
        check_gpu_workers_fit_one_node(1, use_gpu=True)  # the local Ray has no GPU


def test_a_run_without_oracle_masks_says_so_instead_of_nan():
    assert iou_text(float("nan")) == iou_text(None) == "n/a: no oracle mask to learn from"
    assert iou_text(0.4567) == "0.457"


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "steps must be > 0"),
    (["--batch-size", "-1"], "batch size must be > 0"),
    (["--head", "huge"], "unknown head 'huge'"),
    (["--resume"], "nothing to resume"),
])
def test_job_bad_arguments(known_mask_data, tmp_path, run_job, extra, message):
    code, _, err = run_job(["--data", known_mask_data, "--out", str(tmp_path / "o"), *extra])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_job_refuses_data_that_does_not_fit(tmp_path, run_job, known_mask_data):
    code, _, err = run_job(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a factory output folder" in err
    test_set = ShardStore.create_or_resume(str(tmp_path / "test"), {
        "kind": "triplets", "split": "pascal", "fold": "1", "subset": "test", "n": 4,
        "shard_size": 4, "model": "tiny"}, seen=[], unseen=[])
    code, _, err = run_job(["--data", test_set.root, "--out", str(tmp_path / "o")])
    assert code == 2 and "is a 'test' set" in err
    empty = ShardStore.create_or_resume(str(tmp_path / "empty"), {
        "kind": "triplets", "split": "pascal", "fold": "1", "subset": "train", "n": 4,
        "shard_size": 4, "model": "tiny"}, seen=[], unseen=[])
    code, _, err = run_job(["--data", empty.root, "--out", str(tmp_path / "o")])
    assert code == 2 and "holds no finished shard" in err
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "x").write_text("x")
    code, _, err = run_job(["--data", known_mask_data, "--out", str(tmp_path / "busy")])
    assert code == 2 and "is not empty: pass --resume" in err


def test_job_refuses_to_resume_a_head_of_another_split(known_mask_data, tmp_path, run_job):
    other = tmp_path / "coco-head" / "grounding" / "checkpoint_1"
    os.makedirs(other)
    (other / "head.json").write_text(json.dumps({"split": "coco", "fold": "1", "model": "tiny",
                                                  "step": 10, "config": {}}))
    code, _, err = run_job(["--data", known_mask_data, "--out", str(tmp_path / "coco-head"),
                            "--resume"])
    assert code == 2 and "trains a head for coco fold 1 on tiny, not this data" in err


def test_job_refuses_more_workers_than_the_cluster_has(ray_local, known_mask_data, tmp_path,
                                                       run_job):
    code, _, err = run_job(["--data", known_mask_data, "--out", str(tmp_path / "o"),
                            "--num-workers", "8"])
    assert code == 2 and "8 workers need 8 CPUs (the cluster has 2)" in err
    assert not (tmp_path / "o").exists()


def registered_checkpoint(run: str) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of the run (one that a restart
    would start from), not merely written its folder."""
    try:
        with open(os.path.join(run, "checkpoint_manager_snapshot.json")) as f:
            return json.load(f).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # not written yet, or being written
        return False


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_checkpoint_and_ends_like_an_undisturbed_run(
        ray_local, known_mask_data, tmp_path):
    """SIGKILL of a worker once the first checkpoint exists: Ray Train restarts the workers
    (FailureConfig), which continue at the checkpoint's step and stream position and end at the
    step and position of an undisturbed run (8 samples a step: 2 workers x 4)."""
    from train.grounding.job import train

    steps, out, result = 16, str(tmp_path / "killed"), {}
    job = threading.Thread(target=lambda: result.update(run=train(
        known_mask_data, out, steps=steps, batch_size=4, lr=1e-3, num_workers=2,
        cpus_per_worker=0.5, report_every=2)))
    job.start()
    deadline = time.time() + 300
    while not registered_checkpoint(os.path.join(out, RUN_NAME)):
        assert job.is_alive() and time.time() < deadline
        time.sleep(0.05)
    workers = ray_worker_pids(b"RayTrainWorker")
    assert len(workers) == 2
    for pid in workers:  # freeze both first: the run must not finish before the kill lands
        os.kill(pid, signal.SIGSTOP)
    os.kill(workers[0], signal.SIGKILL)
    os.kill(workers[1], signal.SIGCONT)
    job.join(timeout=300)
    metrics = result["run"].metrics
    assert metrics["step"] == steps and metrics["position"] == steps * 8
    assert metrics["job_started_at_step"] >= 2  # the restart began at a checkpoint, not step 0
    # nor at sample 0: worker 0 went on with the first item of the checkpoint's next step
    assert metrics["job_first_item"] == metrics["job_started_at_step"] * 8
    _, info = load_grounding_head(out)
    assert info["step"] == steps and info["position"] == steps * 8
