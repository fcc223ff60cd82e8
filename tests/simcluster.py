"""A multi-node Ray cluster on one machine, for the cluster tests and `benchmarks/scale.py`: a
head with one CPU and no stage resource (as a head started without `CPU: 0`: Ray Data may run
its small tasks there, yet no shard may be written there), `gen` nodes and `label` nodes, one
slot each. Blocks are never inlined into their owner's memory (the driver), as large real
images would not be either."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile


class SimulatedCluster:
    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.gen, self.label = [], []

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, resource: str, slots: int = 1):
        node = self.cluster.add_node(num_cpus=1, resources={resource: slots})
        self.cluster.wait_for_nodes()
        getattr(self, resource).append(node)
        return node

    def remove(self, node) -> None:
        self.cluster.remove_node(node)
        for nodes in (self.gen, self.label):
            if node in nodes:
                nodes.remove(node)


@contextlib.contextmanager
def simulated_cluster(gen_nodes: int = 2, label_nodes: int = 1):
    from ray.cluster_utils import Cluster

    os.makedirs("/tmp/ray", exist_ok=True)  # where Cluster notes the head's address
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Unix socket paths are limited
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=1, temp_dir=temp, include_dashboard=False,
        _system_config={"max_direct_call_object_size": 1024}))
    sim = SimulatedCluster(cluster)
    try:
        for _ in range(gen_nodes):
            sim.add("gen")
        for _ in range(label_nodes):
            sim.add("label")
        yield sim
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def stop_head(head: subprocess.Popen, temp: str) -> None:
    """Stop a head that `ray start --head --block` runs in a session of its own
    (start_new_session) with `temp` as its temp dir, and every process of its cluster: those
    of its session, and those whose command line names `temp`. Nothing else is touched. Ray's
    processes retitle themselves (`ray::DashboardAgent`), so the command line alone misses
    some, and a dashboard agent left behind by a killed raylet spins on a core for a minute."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        head.kill()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                session = int(f.read().rsplit(")", 1)[1].split()[3])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                named = temp.encode() in f.read()
            if session == head.pid or named:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):  # the process ended meanwhile
            continue


def driver(argv: list[str], report: str | None = None, env: dict | None = None,
           **popen) -> subprocess.Popen:
    """`factory ARGV` as its own driver process (as `ray job submit` would run it). With
    `report`, the driver writes to that JSON file when it exits: its peak RSS and every object
    it fetched with ray.get (type, pickled size)."""
    code = f"from factory.cli import main; main({argv!r})"
    if report:
        code = REPORT.replace("REPORT_PATH", repr(report)) + code
    # the environment as it is now: a local Ray started earlier in this process may have
    # turned on token authentication (RAY_AUTH_MODE) for the nodes started after it
    env = {**(os.environ if env is None else env), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


REPORT = """
import atexit, json, pickle, resource, ray
_get, _fetched = ray.get, []
def _spy(refs, *a, **k):
    out = _get(refs, *a, **k)
    for v in (out if isinstance(out, list) else [out]):
        try:
            size = len(pickle.dumps(v))
        except Exception:
            size = -1
        _fetched.append([type(v).__module__ + "." + type(v).__name__, size])
    return out
ray.get = _spy
atexit.register(lambda: json.dump({
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "fetched": _fetched}, open(REPORT_PATH, "w")))
"""
