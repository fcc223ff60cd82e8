"""The README's `ray job submit` commands, through Ray's real Jobs CLI, against a head started
here with `ray start --head` (free ports, the stage resources on it): a tiny `factory generate`
and a short `python -m train.grounding`, each `uv run` with `--working-dir .`, so that Ray's uv
integration starts every worker through `uv run` too.

One shortcut, for the suite's time: the jobs' `uv run` uses this checkout's synced environment
(UV_PROJECT_ENVIRONMENT, UV_NO_SYNC) instead of building one from uv.lock in the job's working
folder, which takes minutes on 2 cores (uv's own work, which `uv sync --locked` checks). Only
the processes started here are stopped."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from simcluster import stop_head

from factory.store import ShardStore
from train.grounding.checkpoint import latest_checkpoint, read_info

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uv() -> str:
    return os.environ.get("UV") or shutil.which("uv")


def job_env() -> dict:
    """The environment of a user's shell: no test-only Ray settings (conftest turns Ray's uv
    hook off for the session's local Ray; its ray.init may have turned token auth on), and
    uv on the PATH for the job's entrypoint."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{os.path.dirname(uv())}:{env['PATH']}",
               UV_PROJECT_ENVIRONMENT=os.path.join(ROOT, ".venv"), UV_NO_SYNC="1")
    return env


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths are limited
    port, dashboard = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
         '--resources={"gen": 1, "label": 1}', f"--temp-dir={temp}", "--block",
         # free ports for the rest too: the session's own Ray holds the defaults
         *(f"--{name}={free_port()}" for name in (
             "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
             "node-manager-port", "object-manager-port"))],
        env=job_env(), stdout=open(os.path.join(temp, "head.log"), "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:  # jobs are taken once the dashboard and the head's job agent are up
            probe = subprocess.run([uv(), "run", "ray", "job", "submit", "--address", address,
                                    "--no-wait", "--", "true"],
                                   env=job_env(), cwd=ROOT, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert proc.poll() is None and time.time() < deadline, (
                probe.stderr[-2000:] + open(os.path.join(temp, "head.log")).read()[-3000:])
            time.sleep(2)
        yield address
    finally:
        stop_head(proc, temp)  # its raylets, workers started through `uv run`, the jobs' drivers
        shutil.rmtree(temp, ignore_errors=True)


def submit(address: str, *entrypoint: str) -> subprocess.CompletedProcess:
    """`uv run ray job submit --address ADDRESS --working-dir . -- uv run ENTRYPOINT`, from the
    repository root, as the README writes it; waits for the job to end."""
    return subprocess.run(
        [uv(), "run", "ray", "job", "submit", "--address", address, "--working-dir", ".",
         "--", "uv", "run", *entrypoint], env=job_env(), cwd=ROOT, capture_output=True,
        text=True, timeout=600)


def test_the_readmes_job_commands_run_through_the_jobs_api(head, tmp_path):
    data, trained = str(tmp_path / "train"), str(tmp_path / "head")
    job = submit(head, "factory", "generate", "--address", "auto", "--split", "pascal",
                 "--n", "6", "--model", "tiny", "--steps", "2", "--shard-size", "4",
                 "--batch-size", "2", "--label-batch-size", "2", "--out", data)
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stderr[-3000:]
    assert "wrote 6 samples (2 shards)" in job.stdout
    store = ShardStore.open(data)
    assert store.read(["index"]).column("index").to_pylist() == list(range(6))
    job = submit(head, "python", "-m", "train.grounding", "--address", "auto", "--data", data,
                 "--out", trained, "--steps", "2", "--batch-size", "2", "--report-every", "2",
                 "--cpus-per-worker", "0.5")
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stderr[-3000:]
    assert read_info(latest_checkpoint(trained))["step"] == 2
