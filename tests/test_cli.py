import json
import os
import signal
import subprocess
import sys
import time

import pytest

from factory.cli import main
from factory.identity import prepare
from factory.options import GenerateOptions


@pytest.fixture
def run(run_cli):
    """`factory ARGV` in this process: (exit status, stdout, stderr)."""
    return lambda argv: run_cli(main, argv)


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


def bad_pairs_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"format": 1, "vocabulary": "pascal",
                                "pairs": [["person", "unicorn"]]}))
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "ade"], "unknown split 'ade'"),
    (["--fold", "7"], "unknown fold '7'"),
    (["--split", "coco", "--fold", "zs3"], "unknown fold 'zs3'"),
    (["--subset", "val"], "unknown subset 'val'"),
    (["--n", "0"], "n must be > 0"),
    (["--n", "-3"], "n must be > 0"),
    (["--shard-size", "0"], "shard size must be > 0"),
    (["--model", "/no/such/sd-folder"], "no diffusers model folder"),
    (["--model", "tiny", "--detector", "torchvision", "--detector-weights", "/no/w.pth"],
     "no Mask R-CNN weights"),
    (["--oracle", "best"], "unknown oracle 'best'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--fp8"], "--fp8 needs torchao"),
    (["--feature-step", "50"], "feature step must lie in [0, 50)"),
    (["--batch-size", "0"], "batch size must be > 0"),
    (["--subset", "train", "--n", "x"], "'x' is not a valid integer"),
    (["--generators", "0"], "generators must be 'auto' or a number > 0, got '0'"),
    (["--labellers", "many"], "labellers must be 'auto' or a number > 0, got 'many'"),
    (["--placement-timeout", "0"], "placement timeout must be > 0 seconds"),
    (["--address", "127.0.0.1:9"], "cannot reach a Ray cluster at '127.0.0.1:9'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, out, run):
    base = ["generate", "--out", out, "--model", "tiny", "--n", "4"]
    code, stdout, stderr = run(base + args)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("factory: error")
    assert not os.path.exists(out)


def test_pairs_file_with_unknown_class_is_refused(tmp_path, out, run):
    code, _, stderr = run(["generate", "--out", out, "--model", "tiny", "--n", "4",
                           "--pairs", bad_pairs_file(tmp_path)])
    assert code == 2 and "lacks: unicorn" in stderr and len(stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)


@pytest.mark.slow
def test_an_output_the_workers_cannot_write_is_refused_before_any_work(ray_local, tmp_path,
                                                                     run):
    code, _, stderr = run(["generate", "--out", "file:///proc/factory/out", "--model", "tiny",
                           "--n", "4"])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot write --out 'file:///proc/factory/out'" \
        in lines[0]
    assert not os.path.exists("/proc/factory")


def test_output_folder_of_another_run_is_refused_and_left_alone(out, run):
    prepare(GenerateOptions(out=out, model="tiny", n=4, seed=1))[1].create()
    before = open(os.path.join(out, "manifest.json")).read()
    code, _, stderr = run(["generate", "--out", out, "--model", "tiny", "--n", "4",
                           "--seed", "2"])
    assert code == 2 and "holds another run (seed=1 (now 2))" in stderr
    assert open(os.path.join(out, "manifest.json")).read() == before
    assert sorted(os.listdir(out)) == ["data", "manifest.json", "records"]
    assert not os.listdir(os.path.join(out, "data"))


def test_test_subset_defaults_to_the_papers_size(out):
    _, store = prepare(GenerateOptions(out=out, model="tiny", subset="test"))
    assert store.n == 1310 and store.manifest["run"]["n"] == 1310


def test_train_subset_needs_n(out, run):
    code, _, stderr = run(["generate", "--out", out, "--model", "tiny"])
    assert code == 2 and "--n is required for subset 'train'" in stderr


def test_stats_of_a_folder_that_is_no_output(tmp_path, run):
    code, _, stderr = run(["stats", str(tmp_path)])
    assert code == 2 and "not a factory output folder" in stderr


def test_pairs_command(tmp_path, run):
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18}]}))
    code, stdout, _ = run(["pairs", "--coco", str(coco), "--split", "pascal", "--out",
                           str(tmp_path / "p.json")])
    assert code == 0 and "1 co-appearing pascal pairs from 1 images" in stdout
    assert json.loads((tmp_path / "p.json").read_text())["pairs"] == [["dog", "person"]]
    code, _, stderr = run(["pairs", "--out", str(tmp_path / "q.json")])
    assert code == 2 and "exactly one of --coco FILE and --voc DIR" in stderr


def test_console_script_reports_errors_in_one_line(tmp_path):
    factory = os.path.join(os.path.dirname(sys.executable), "factory")
    r = subprocess.run([factory, "generate", "--split", "ade", "--n", "2", "--model", "tiny",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "factory: error: unknown split 'ade': choose one of pascal, coco")
    assert not (tmp_path / "o").exists()


WAITS_ON_RAY = """
import sys, time, click, ray
from factory.command import run_command
from factory.pools import connect_ray

@ray.remote(num_cpus=0)
def never():
    time.sleep(600)

@click.command()
def wait():
    connect_ray(sys.argv[1])
    ref = never.remote()
    print("waiting", flush=True)
    while True:  # where a run's driver spends its time: the shard writer's ray.wait
        ray.wait([ref], timeout=1.0)

run_command(wait, [], prog_name="factory")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_inside_ray_wait_is_one_line(ray_local, sig):
    """Ctrl-C or SIGTERM on a driver waiting in Ray's compiled `ray.wait`: one line and exit
    130, not a traceback (the handler's Interrupted comes out of it as a SystemError caused by
    it) nor Ray's stack dump (its core worker replaces the SIGTERM handler)."""
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", WAITS_ON_RAY, address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting", proc.communicate()
        time.sleep(0.3)  # inside ray.wait: nothing else is left to run
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["factory: interrupted; rerun the same command to finish"]


def test_no_command_module_imports_the_factory_cli():
    """The `factory` CLI imports the jobs and protocols; they must not import it back."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    for path in [*root.glob("eval/*.py"), *root.glob("train/**/*.py"), *root.glob("actors/*.py"),
                 *(p for p in root.glob("factory/*.py") if p.name != "cli.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names]
                assert "factory.cli" not in names, f"{path.relative_to(root)} imports factory.cli"


def test_the_final_line_counts_the_samples_dropped_and_skipped_and_names_both_speeds():
    from factory.options import RunResult

    spans = {"generator": {"a": [1.0, 100.0, 102.0], "b": [1.0, 101.0, 104.0]}}  # 4 s
    line = RunResult(written=6, shards_written=4, shards_skipped=0, seconds=16.0, out="o",
                     dropped=1, failed=1, actor_spans=spans).summary()
    assert line == (
        "wrote 6 samples (4 shards, 1 dropped below --min-quality, 1 skipped after failing "
        "(manifest.json's `failed`)) in 16.0 s, 0.44 images/s wall-clock (Ray's start and "
        "warm-up included), 1.75 images/s steady (the generators' first call to their last), "
        "to o")
    line = RunResult(written=0, shards_written=1, shards_skipped=3, seconds=1.0, out="o",
                     failed=2).summary()  # a shard whose every sample failed is work done too
    assert line.startswith("wrote 0 samples (1 shards, 2 skipped") and "steady" not in line
