"""`factory generate` on a cluster that starts cold, as `ray up cluster.yaml` makes it: Ray's
autoscaler with its `fake_multinode` provider (the one `ray.cluster_utils.AutoscalingCluster`
drives, which launches each node as local processes; the default, v1, autoscaler, which
`ray up` starts) and a config written here, as
cluster.yaml's shape: a head with no CPU, `gen` nodes {CPU 1, GPU 2, gen 2} and `label` nodes
{CPU 1, GPU 1, label 1}, both from zero. The GPUs are Ray's bookkeeping only, so the run passes
`--device cpu`. Only the processes started here are stopped."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from simcluster import driver, stop_head

from factory.store import ShardStore

pytestmark = pytest.mark.slow

GEN = {"resources": {"CPU": 1, "GPU": 2, "gen": 2}, "node_config": {}, "min_workers": 0,
       "max_workers": 2}
LABEL = {"resources": {"CPU": 1, "GPU": 1, "label": 1}, "node_config": {}, "min_workers": 0,
         "max_workers": 1}
RUN = ["generate", "--split", "pascal", "--n", "16", "--shard-size", "4", "--model", "tiny",
       "--steps", "2", "--batch-size", "2", "--label-batch-size", "2", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    return env


class FakeCluster:
    """A head with `ray start --head --autoscaling-config` on free ports; its autoscaler
    launches the worker node types as processes of this machine."""

    def __init__(self, worker_types: dict) -> None:
        from ray._private.services import get_node_ip_address

        self.temp = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: socket path limits
        port = free_port()
        self.address = f"{get_node_ip_address()}:{port}"
        config = {
            "cluster_name": "fake", "max_workers": 8, "upscaling_speed": 10.0,
            "idle_timeout_minutes": 5, "head_node_type": "ray.head.default", "docker": {},
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": self.address},
            "auth": {}, "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                     "max_workers": 0}, **worker_types},
            **{k: [] for k in ("initialization_commands", "setup_commands",
                               "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }
        # the autoscaler's config file, which its driver reads too (`ray up` leaves it on the
        # head as ~/ray_bootstrap_config.yaml)
        self.config = path = os.path.join(self.temp, "autoscaling.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        ports = [f"--{name}={free_port()}" for name in (
            "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
            "object-manager-port")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
             f"--autoscaling-config={path}", "--num-cpus=0", "--include-dashboard=false",
             f"--temp-dir={self.temp}", "--block", *ports],
            env=head_env(), stdout=open(os.path.join(self.temp, "head.log"), "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while "--block" not in open(os.path.join(self.temp, "head.log")).read():
            assert self.proc.poll() is None and time.time() < deadline, open(
                os.path.join(self.temp, "head.log")).read()[-3000:]
            time.sleep(1)

    def nodes(self) -> dict[str, set[str]]:
        """Node ids of the live nodes by what they offer: "gen", "label", "head"."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print('nodes:', json.dumps([[n['NodeID'], n['Resources']] for n in ray.nodes() "
                "if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code], env=head_env(), capture_output=True,
                             text=True, check=True).stdout
        # the autoscaler's events ("(autoscaler +0s) Resized to 0 CPUs.") may come after it
        found = [line for line in out.splitlines() if line.startswith("nodes: ")]
        assert len(found) == 1, out
        kinds: dict[str, set[str]] = {"gen": set(), "label": set(), "head": set()}
        for node, res in json.loads(found[0].removeprefix("nodes: ")):
            kind = "gen" if res.get("gen") else "label" if res.get("label") else "head"
            kinds[kind].add(node)
        return kinds

    def stop(self) -> None:
        stop_head(self.proc, self.temp)  # the nodes and their workers too
        shutil.rmtree(self.temp, ignore_errors=True)


def run(cluster: FakeCluster, out: str, timeout: float = 600):
    proc = driver([*RUN, "--address", cluster.address, "--out", out],
                  env={**head_env(), "FACTORY_AUTOSCALING_CONFIG": cluster.config})
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def test_a_cold_cluster_scales_up_and_every_index_lands_once(tmp_path):
    cluster = FakeCluster({"gen": GEN, "label": LABEL})
    try:
        assert cluster.nodes()["gen"] == set()  # cold: the head alone
        out = str(tmp_path / "out")
        code, stdout, err = run(cluster, out)
        assert code == 0, err[-3000:]
        assert "wrote 16 samples (4 shards)" in stdout
        nodes = cluster.nodes()
    finally:
        cluster.stop()
    store = ShardStore.open(out)
    assert store.read(["index"]).column("index").to_pylist() == list(range(16))
    pools = store.manifest["pools"]
    assert pools["generator"]["gpus_each"] == 1.0 and pools["labeller"]["gpus_each"] == 1.0
    assert pools["generator"]["devices"] == ["cpu"] == pools["labeller"]["devices"]
    assert nodes["gen"] and nodes["label"]  # launched by the autoscaler
    assert set(pools["generator"]["nodes"]) <= nodes["gen"]
    assert set(pools["labeller"]["nodes"]) <= nodes["label"]
    for record in store.records.values():
        assert record["node"] not in nodes["head"]


def test_a_config_without_the_labeller_node_type_is_refused_at_once(tmp_path):
    cluster = FakeCluster({"gen": GEN})
    try:
        start = time.perf_counter()
        out = str(tmp_path / "out")
        code, _, err = run(cluster, out, timeout=120)
        seconds = time.perf_counter() - start
    finally:
        cluster.stop()
    lines = [line for line in err.strip().splitlines() if not line.startswith("notice:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("factory: error: the Ray cluster has no 'label' resource")
    assert seconds < 60 and not os.path.exists(out)
