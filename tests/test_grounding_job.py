"""The grounding head's Ray Train job (`python -m train.grounding`): training, checkpoints,
resume, and the arguments it refuses."""

import json
import os

import pytest
import torch

from factory.store import ShardStore
from train.grounding.checkpoint import load_grounding_head
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
    assert info["config"]["in_channels"] == [96, 64, 48, 48]
    assert info["metrics"]["step"] == 4 and info["metrics"]["loss"] > 0
    code, _, err = run_job(args + ["--steps", "4", "--resume"])
    assert code == 2 and "trained to step 4 already" in err
    code, stdout, _ = run_job(args + ["--steps", "6", "--resume"])
    assert code == 0 and "trained to step 6" in stdout
    resumed, info = load_grounding_head(out)
    assert info["step"] == 6
    assert any(not torch.equal(a, b) for a, b in zip(head.state_dict().values(),
                                                      resumed.state_dict().values(), strict=True))


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
