"""cluster.yaml and cluster.local.yaml: valid for Ray's autoscaler, and each node type offers
the stage resources the pipeline asks for. Offline: Ray's own schema and config preparation,
no cloud API, no credentials."""

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster.local.yaml"
# Resources Ray defines itself; everything else a node type carries is a custom resource.
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def validated(config: dict) -> dict:
    """What `ray up` does to the file before it launches anything."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def custom(resources: dict) -> set:
    return {r for r in resources if r not in BUILTIN and not r.startswith("accelerator_type:")}


def stage_types(config: dict) -> dict[str, list[str]]:
    """Stage resource -> names of the node types that offer it."""
    from factory.pools import STAGE_RESOURCES

    types = config["available_node_types"]
    return {res: [name for name, t in types.items() if t["resources"].get(res)]
            for res in STAGE_RESOURCES.values()}


def test_cluster_file_passes_rays_validator():
    prepared = validated(load(CLUSTER))
    assert prepared["cluster_name"] == "factory"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "gen", "label"}


@pytest.mark.parametrize("break_it", [
    pytest.param(lambda c: c["available_node_types"]["gen"]["resources"].update(gen=0.5),
                 id="fractional resource"),
    pytest.param(lambda c: c["available_node_types"]["label"].pop("node_config"),
                 id="node type without node_config"),
    pytest.param(lambda c: c.update(max_worker=c.pop("max_workers")), id="misspelt key"),
])
def test_the_validator_refuses_a_broken_file(break_it):
    config = load(CLUSTER)
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        validated(config)


def test_head_runs_no_gpu_stage():
    from factory.pools import STAGE_RESOURCES

    config = load(CLUSTER)
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0
    assert not set(STAGE_RESOURCES.values()) & set(head)
    assert head.get("CPU") == 0  # no task, so no sample byte, lands on the head


def test_the_pools_read_gpu_shares_and_limits_from_the_file_on_a_cold_cluster(tmp_path):
    """What the driver reads of a cold cluster (v1 autoscaler: `ray up` leaves this file on
    the head): the GPUs each pool's actors get, and how far the stage slots may grow."""
    from factory.pools import ClusterView, _autoscaler_config_file, size_pools

    most, types = _autoscaler_config_file(str(CLUSTER))
    assert (most["gen"], most["label"], most["GPU"]) == (64, 16, 80)
    cold = ClusterView(slots={"gen": 0, "label": 0}, max_slots={"gen": 64, "label": 16},
                       autoscaled=True, gpus=0.0, max_gpus=most["GPU"], node_types=types)
    pools = size_pools(cold, units=10_000, labeller_images_per_s=17.0)
    assert pools["generator"].gpus == 1.0 and pools["labeller"].gpus == 1.0
    assert (pools["generator"].min_size, pools["generator"].max_size) == (1, 64)
    assert _autoscaler_config_file(str(tmp_path / "absent.yaml")) == ({}, ())


def test_workers_launch_with_the_head_profile_that_resolves_their_images():
    """Worker ImageIds are public SSM parameters, which EC2 resolves with the launcher's (the
    head's) rights: the head needs a profile of its own (README "IAM")."""
    types = load(CLUSTER)["available_node_types"]
    ssm = [n for n, t in types.items() if str(t["node_config"]["ImageId"]).startswith(
        "resolve:ssm:")]
    assert ssm
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "factory-head"}
    readme = (ROOT / "README.md").read_text()
    for needed in ("ssm:GetParameters", "iam:PassRole", "factory-head", "factory-worker"):
        assert needed in readme


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a driver")
def test_a_gpu_node_without_a_working_driver_stops_its_setup_in_one_line():
    config = load(CLUSTER)
    (check,) = config["worker_setup_commands"]
    assert check.endswith("python -m factory.gpu_check")
    run = subprocess.run([sys.executable, "-m", "factory.gpu_check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("factory gpu check: no NVIDIA driver on this node")


def test_stage_resources_sit_on_the_node_types_meant_for_them():
    from factory.pools import STAGE_RESOURCES

    config = load(CLUSTER)
    types = config["available_node_types"]
    gen, label = STAGE_RESOURCES["generator"], STAGE_RESOURCES["labeller"]
    offered = stage_types(config)
    assert offered[gen] and offered[label]
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    # The custom resources of the GPU node types are exactly the pipeline's stage resources,
    # one per type: generator types carry only `gen`, labeller types only `label`.
    assert set().union(*(custom(types[n]["resources"]) for n in gpu_types)) == {gen, label}
    for name in gpu_types:
        assert len(custom(types[name]["resources"])) == 1, name
    for name in offered[gen]:
        res = types[name]["resources"]
        assert custom(res) == {gen}
        assert res[gen] == res["GPU"], f"{name}: one generator actor per GPU"
        assert types[name]["min_workers"] == 0, f"{name}: no idle 8-GPU node by default"
    for name in offered[label]:
        res = types[name]["resources"]
        assert custom(res) == {label}
        assert 1 <= res[label] <= res["GPU"]


def test_resources_are_whole_numbers():
    for name, node_type in load(CLUSTER)["available_node_types"].items():
        for resource, amount in node_type["resources"].items():
            assert type(amount) is int and amount >= 0, (name, resource, amount)


def test_the_global_limit_admits_every_node_type_at_its_own_limit():
    config = load(CLUSTER)
    types = config["available_node_types"]
    workers = [t["max_workers"] for n, t in types.items() if n != config["head_node_type"]]
    assert sum(workers) <= config["max_workers"]


def test_start_commands_leave_the_resources_to_the_autoscaler():
    config = load(CLUSTER)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--resources" not in head + workers
    assert "--head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in workers


@pytest.mark.parametrize("path", [CLUSTER, LOCAL], ids=lambda p: p.name)
def test_nodes_run_the_ray_and_python_of_the_lock(path):
    with open(ROOT / "uv.lock", "rb") as f:
        lock = tomllib.load(f)
    ray_version = next(p["version"] for p in lock["package"] if p["name"] == "ray")
    commands = "\n".join(load(path)["setup_commands"])
    assert f'"ray[default]=={ray_version}"' in commands
    pinned = re.search(r"UV_PYTHON=(\d+)\.(\d+)\.(\d+)", commands)
    assert pinned, "one exact Python for `ray start` and the jobs"
    low = re.match(r">=\s*(\d+)\.(\d+)", lock["requires-python"])
    assert tuple(map(int, pinned.groups()[:2])) >= tuple(map(int, low.groups()))
    assert "uv sync --locked" in commands


def efs_command(config: dict) -> str:
    (command,) = [c for c in config["setup_commands"] if "/mnt/factory" in c]
    return command


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("efs_id", "mounted", "expect_mount"), [
    (None, True, False),  # `ray up` again: already mounted, left alone
    (None, False, False),  # placeholder left in: nothing mounted, a note printed
    ("fs-0123abcd", True, False),
    ("fs-0123abcd", False, True),
])
def test_the_efs_mount_runs_again_without_harm(efs_id, mounted, expect_mount):
    command = efs_command(load(CLUSTER))
    assert "fs-XXXXXXXX" in command
    if efs_id:
        command = command.replace("fs-XXXXXXXX", efs_id)
    stubs = (f"mountpoint() {{ return {0 if mounted else 1}; }}; dpkg() {{ return 0; }}; "
             "sudo() { echo \"sudo $*\"; }; ")
    run = subprocess.run(["bash", "-c", stubs + command], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    mounts = [line for line in run.stdout.splitlines() if line.startswith("sudo mount")]
    if expect_mount:
        assert len(mounts) == 1
        assert f"{efs_id}.efs.us-west-2.amazonaws.com:/ /mnt/factory" in mounts[0]
    else:
        assert not mounts and run.stdout.strip()


def test_local_cluster_file_passes_rays_validator():
    config = load(LOCAL)
    assert config["provider"]["type"] == "local"
    assert "available_node_types" not in config  # the local provider makes its single type
    prepared = validated(config)
    assert prepared["max_workers"] == len(config["provider"]["worker_ips"])


def test_local_hosts_take_their_stage_resources_from_their_own_file():
    from factory.pools import STAGE_RESOURCES

    config = load(LOCAL)
    assert "--resources" not in " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--resources=" in worker and "~/factory-resources.json" in worker
    text = LOCAL.read_text()
    for resource in STAGE_RESOURCES.values():
        assert f"--resources='{{\"{resource}\": " in text  # the by-hand `ray start`
        assert f"echo '{{\"{resource}\": " in text  # the per-host file
