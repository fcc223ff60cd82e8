"""The Ray side of a run's actor pools: joining the cluster, sizing the pools from it, making
sure they can be placed, and the wrapper that runs a stage class inside a pool.

Each pool asks for its own custom resource besides its GPU share: generator-type pools (the SD
generator, DAAM) `gen`, labeller-type pools (Mask R-CNN, the grounding head) `label`.
`cluster.yaml` gives each node type the matching resource, one unit per GPU; a local Ray gets
both, and its GPUs are shared. `auto` pools start at one actor per slot the cluster has and grow
(Ray Data's autoscaling actor pool) as nodes join, up to what the autoscaler can add.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass

import numpy as np

from factory.errors import FactoryError
from factory.speeds import MeasuredSpeeds

log = logging.getLogger(__name__)

STAGE_RESOURCES = {"generator": "gen", "labeller": "label"}  # custom resource of each pool kind
STAGE_CPUS = 0.25  # CPU reservation per actor/task: GPU stages need little, and a 2-core machine
# must fit two actor pools plus the spec, row and write tasks without deadlocking.
# seconds a pool may wait to be placed: a cold GPU node on an autoscaling cluster boots and
# installs its environment first (10-20 minutes on AWS)
PLACEMENT_TIMEOUT = {"cluster": 1800.0, "local": 10.0}
STAGE_ATTEMPTS = 2  # tries of a work unit in a stage before the run stops
LABEL_SHARE = 0.2  # GPU share of a labeller on a node that also runs generators; they get the rest
# Measured stage speeds (images/s: "sd generator", "grounding head", "mask r-cnn"), whose
# ratios size `auto` labeller pools: read from the benchmark results committed under
# benchmarks/results/ (factory/speeds.py says which file and card; `python -m factory.speeds`).
IMAGES_PER_S = MeasuredSpeeds()
HOW_TO_START = {
    "gen": "start generator nodes with `ray start --address=HEAD:6379 --resources='{\"gen\": N}'`"
           " (N = their GPUs), or give cluster.yaml a node type with resources {gen: N, GPU: N}",
    "label": "start labeller nodes with `ray start --address=HEAD:6379 --resources='{\"label\": "
             "N}'` (N = their GPUs), or give cluster.yaml a node type with resources "
             "{label: N, GPU: N}",
}


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray with one `gen` and one `label` slot
    per GPU (one each on a CPU-only machine). Ray's own logging is left to
    `console.ray_logs_to`; the workers' output stays in Ray's log folder, off the console, and
    Ray Data draws no progress bars (the run's progress lines are its own)."""
    if address:
        check_reachable(address)
    else:
        # Local workers share this interpreter. Ray's `uv run` hook (meant for clusters, read
        # when ray is first imported: so nothing may import ray before this) would instead
        # start every worker through `uv run` again.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        # Every worker imports torch and diffusers: let them cache the bytecode they compile
        # (the first worker's imports take 13 s from source on 2 cores, later ones 6 s), even
        # where the shell asks Python not to write .pyc files.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    if ray.is_initialized():
        return
    quiet = dict(configure_logging=False, log_to_driver=False)
    if address:
        try:
            with signal_handlers_kept():
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise FactoryError(f"cannot join the Ray cluster at {address!r}: "
                               f"{str(e).splitlines()[0]}") from None
        return
    import torch

    slots = max(1, torch.cuda.device_count())
    with signal_handlers_kept():
        ray.init(resources={"gen": slots, "label": slots}, include_dashboard=False, **quiet)


@contextlib.contextmanager
def signal_handlers_kept():
    """Keep the Python handlers of SIGINT and SIGTERM (the entry points' one-line stop,
    factory/command.py) across `ray.init`, whose core worker puts its own SIGTERM handler in
    their place: a stack dump and exit status 1."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            if callable(handler):
                signal.signal(sig, handler)


def check_reachable(address: str) -> None:
    """Ray waits minutes for a head address that does not answer: refuse it in one line."""
    if address == "auto" or "://" in address and not address.startswith("ray://"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise FactoryError(f"cannot reach a Ray cluster at {address!r} ({e}): start one with "
                           "`ray up cluster.yaml` or `ray start --head`, or pass --address auto "
                           "on one of its nodes") from None


@dataclass(frozen=True)
class ClusterView:
    """What the pools can use: stage slots and GPUs now, what an autoscaler may add, and the
    resources of each kind of node (live nodes and the autoscaler's node types, which on a cold
    cluster are all there is to go by)."""

    slots: dict[str, int]  # resource -> units on live nodes now
    max_slots: dict[str, int]  # resource -> units the autoscaler can reach (>= slots)
    autoscaled: bool  # False: a fixed cluster, which only hand-started nodes may join
    gpus: float
    max_gpus: float  # GPUs the autoscaler can reach (>= gpus)
    node_types: tuple[dict[str, float], ...]  # resources of each live node and node type
    # this machine's own Ray (no --address, no RAY_ADDRESS), which no other host joins: the
    # pools keep to the slots it has (an actor waiting for a slot that never comes would be
    # started, to no use, by the slot the last actor frees)
    local: bool = False

    @classmethod
    def current(cls, address: str | None = None) -> ClusterView:
        """The cluster the driver has joined, at `address` (None: this machine's own Ray)."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        slots = {r: int(sum(n.get(r, 0) for n in nodes)) for r in ("gen", "label")}
        gpus = sum(n.get("GPU", 0) for n in nodes)
        most, types = autoscaler_config()
        return cls(slots=slots,
                   max_slots={r: max(slots[r], int(most.get(r, 0))) for r in slots},
                   autoscaled=bool(most),
                   gpus=gpus, max_gpus=max(gpus, most.get("GPU", 0)),
                   node_types=tuple(nodes) + types,
                   local=not address and not os.environ.get("RAY_ADDRESS"))

    def reach(self, resource: str, units: int) -> int:
        """The most actors a pool on `resource` may grow to: what the autoscaler can reach; on a
        fixed cluster, one per work unit (hosts started by hand may join); on this machine's own
        Ray, the slots it has."""
        if self.autoscaled:
            return self.max_slots[resource]
        return self.slots[resource] if self.local else units

    def gpu_share(self, kind: str, both: bool) -> float:
        """GPUs per actor of a pool: what a node offering the pool's resource has per slot
        (0 where no such node has a GPU); where one node offers both stage resources and both
        pools run, the labellers take LABEL_SHARE of a GPU and the generators the rest."""
        res = STAGE_RESOURCES[kind]
        with_gpu = [t for t in self.node_types if t.get(res, 0) > 0 and t.get("GPU", 0) > 0]
        if not with_gpu:
            return 0.0
        if both and any(t.get("gen", 0) and t.get("label", 0) for t in with_gpu):
            return LABEL_SHARE if kind == "labeller" else 1 - LABEL_SHARE
        return min(1.0, min(t["GPU"] / t[res] for t in with_gpu))


# Where `ray up` leaves the autoscaler's config on the head, where jobs' drivers run; Ray's
# default (v1) autoscaler tells the rest of the cluster nothing of it
AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_config() -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
    """The most of each resource the cluster's autoscaler may reach, and the resources of each
    of its worker node types (both empty without an autoscaler): from the GCS where the
    autoscaler publishes its config there (v2, as Ray Train and Ray Data read it), else from
    the config file the head's autoscaler reads ($FACTORY_AUTOSCALING_CONFIG, else
    AUTOSCALING_CONFIG). Neither is public API, so a failure reads as "no autoscaler"."""
    try:
        import ray._private.state

        state = ray._private.state.state
        config = state.get_cluster_config()
        if config and config.node_group_configs:
            types = tuple(dict(g.resources) for g in config.node_group_configs)
            return state.get_max_resources_from_cluster_config() or {}, types
    except Exception:  # noqa: BLE001 - an internal API: no answer means no autoscaler
        pass
    return _autoscaler_config_file(os.path.expanduser(
        os.environ.get("FACTORY_AUTOSCALING_CONFIG", AUTOSCALING_CONFIG)))


def _autoscaler_config_file(path: str) -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
    """What `autoscaler_config` returns, from a cluster config file (cluster.yaml's format)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        node_types = config["available_node_types"]
        head = config.get("head_node_type")
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return {}, ()
    most: dict[str, float] = {}
    types = []
    for name, t in node_types.items():
        res = dict(t.get("resources") or {})
        count = 1 if name == head else int(t.get("max_workers", 0))
        for r, v in res.items():
            most[r] = most.get(r, 0) + v * count
        if name != head and count:
            types.append(res)
    return most, tuple(types)


@dataclass(frozen=True)
class Pool:
    """One actor pool's size and placement."""

    kind: str  # "generator" | "labeller"
    min_size: int
    max_size: int
    gpus: float  # per actor

    @property
    def resource(self) -> str:
        return STAGE_RESOURCES[self.kind]

    def __str__(self) -> str:  # "generators 2-8 (1 GPU each)"
        size = (f"{self.min_size}-{self.max_size}" if self.max_size > self.min_size
                else f"{self.min_size}")
        return f"{self.kind}s {size} ({self.gpus:g} GPU each)"

    def bundle(self) -> dict[str, float]:
        """What one actor reserves."""
        return {"CPU": STAGE_CPUS, self.resource: 1, **({"GPU": self.gpus} if self.gpus else {})}

    def device(self, option: str | None) -> str:
        """Where the pool's stages compute: `--device`, else CUDA where it has GPUs."""
        return option or ("cuda" if self.gpus > 0 else "cpu")

    def ray_args(self) -> dict:
        """`map_batches` arguments that place and size the pool."""
        import ray

        return dict(num_cpus=STAGE_CPUS, num_gpus=self.gpus, resources={self.resource: 1},
                    compute=ray.data.ActorPoolStrategy(min_size=self.min_size,
                                                       max_size=self.max_size))


def parse_pool_size(value: str | int, name: str) -> int | None:
    """`auto` -> None, else a positive int."""
    if value == "auto" or value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'auto' or a number > 0, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{name} must be 'auto' or a number > 0, got {value!r}")
    return n


def size_pools(view: ClusterView, units: int, *, generators: int | None = None,
               labellers: int | None = None, labeller_images_per_s: float | None = None,
               gen_gpus: float | None = None, label_gpus: float | None = None,
               kinds: tuple[str, ...] = ("generator", "labeller")) -> dict[str, Pool]:
    """The pools for `units` work items on the cluster `view`. A None size is `auto`:
    generators one per `gen` slot now, growing to what the autoscaler can add (at most one per
    work unit; on a cluster without autoscaler, as many as there are work units, so that nodes
    started by hand join too; on this machine's own Ray, its slots); labellers as many as the
    measured ratio of the two stages' speeds asks for, at least one. A size the cluster can
    never place is refused in one line."""
    for kind in kinds:
        res = STAGE_RESOURCES[kind]
        if view.max_slots[res] < 1:
            raise FactoryError(f"the Ray cluster has no {res!r} resource, which the {kind} pool "
                               f"needs: {HOW_TO_START[res]}")
    sizes: dict[str, tuple[int, int]] = {}  # kind -> (min, max) actors
    if "generator" in kinds:
        if generators is None:
            low = max(1, min(view.slots["gen"], units))
            reach = view.reach("gen", units)
            sizes["generator"] = (low, max(low, min(reach, units)))
        else:
            sizes["generator"] = (generators, generators)
    if "labeller" in kinds:
        if labellers is None:
            gen_rate = IMAGES_PER_S["sd generator"]
            per = max(1, math.floor((labeller_images_per_s or gen_rate) / gen_rate))
            gens = sizes.get("generator", (1, 1))
            low = min(max(1, math.ceil(gens[0] / per)), max(1, view.slots["label"]))
            reach = view.reach("label", units)
            sizes["labeller"] = (low, max(low, min(math.ceil(gens[1] / per), reach)))
        else:
            sizes["labeller"] = (labellers, labellers)
    both = len(kinds) == 2
    share = {"generator": gen_gpus, "labeller": label_gpus}
    out = {}
    for kind, (low, high) in sizes.items():
        gpus = view.gpu_share(kind, both) if share[kind] is None else share[kind]
        out[kind] = Pool(kind, low, high, gpus)
        res = STAGE_RESOURCES[kind]
        if low > view.max_slots[res]:
            raise FactoryError(f"{low} {kind}s need {low} {res!r} slots, but the cluster has "
                               f"{view.max_slots[res]}: use fewer, or {HOW_TO_START[res]}")
    need = sum(p.min_size * p.gpus for p in out.values())
    if need > view.max_gpus + 1e-9:
        raise FactoryError(f"the pools need {need:g} GPUs, but the cluster has {view.max_gpus:g}: "
                           "use fewer actors or smaller --gen-gpus/--label-gpus")
    return out


@contextlib.contextmanager
def autoscaler_demand(pools: dict[str, Pool], autoscaled: bool):
    """While open, ask an autoscaler for every pool's largest size in bundles that carry the
    stage resource, so that it launches the node types the stages need (Ray Data's own
    requests name only CPUs, GPUs and memory, which any GPU node type meets)."""
    if not autoscaled:
        yield
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[p.bundle() for p in pools.values() for _ in range(p.max_size)])
    try:
        yield
    finally:
        request_resources(bundles=[])


def waiting_for(pools: dict[str, Pool], live: dict[str, float]) -> list[str]:
    """What the pools still wait for on an autoscaling cluster: a line per stage resource short
    of the pool's largest size (`live`: the resources of the live nodes)."""
    out = []
    for p in pools.values():
        short = p.max_size - int(live.get(p.resource, 0))
        if short > 0:
            out.append(f"waiting for {short} more {p.resource!r} slot(s) (autoscaler "
                       "launching nodes)")
    return out


def wait_for_placement(pools: dict[str, Pool], timeout: float) -> None:
    """Reserve every pool's minimum at once (which also asks an autoscaler for the nodes) and
    wait up to `timeout` seconds; refuse in one line, naming what is missing, if it never fits.
    The reservation is released before the pools start."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [p.bundle() for p in pools.values() for _ in range(p.min_size)]
    pg = placement_group(bundles, strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=max(1, int(math.ceil(timeout))))
    finally:
        remove_placement_group(pg)
    if ready:
        return
    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for b in bundles:
        for r, v in b.items():
            need[r] = need.get(r, 0) + v
    short = [f"{need[r]:g} {r!r} (the cluster has {have.get(r, 0):g})" for r in need
             if need[r] > have.get(r, 0)]
    what = ", ".join(f"{p.min_size} {p.kind}s" for p in pools.values())
    raise FactoryError(
        f"{what} could not be placed within {timeout:g} s: "
        + (f"they need {', '.join(short)}" if short else "other jobs hold the resources")
        + "; add nodes, wait for the autoscaler (--placement-timeout) or use fewer actors")


def probe_output(root: str) -> None:
    """Write and delete a probe file in `root`'s data folder from a task on every live node
    that runs stages, before any GPU work: an output the workers cannot write, or cannot see (a
    node-local path on a multi-node cluster), is refused in one line."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and any(
        n["Resources"].get(r, 0) for r in STAGE_RESOURCES.values())]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_task)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(root) for node in nodes]
    for node, error in zip(nodes, ray.get(refs), strict=True):
        if error:
            raise FactoryError(f"the workers cannot use --out {root!r} (node {node[:12]}): "
                               f"{error}; give storage every node reaches (a shared mount or an "
                               "s3:// or gs:// URI)")


def _probe_task(root: str) -> str | None:
    """In a worker: None if `root` is a factory output this node sees and can write to."""
    import uuid

    from factory.store import DATA, MANIFEST, TEMP_PREFIX, open_location, put_atomic

    try:
        fs, base = open_location(root)
        if fs.get_file_info(f"{base}/{MANIFEST}").type.name != "File":
            return "it has no manifest there (a folder local to another node?)"
        # named like a temporary shard, so that a crash here leaves what a resume removes
        path = f"{base}/{DATA}/{TEMP_PREFIX}probe.tmp-{uuid.uuid4().hex[:8]}"
        put_atomic(fs, path, b"probe")
        fs.delete_file(path)
    except Exception as e:  # noqa: BLE001 - any failure means the worker cannot write there
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


class PoolStage:
    """A stage class run by a Ray Data actor pool. Each call is one work unit (one block of a
    few batches), cut into the stage's own batches in order, so that a unit's outputs do not
    depend on how Ray grouped or retried it. Every row is tagged with the actor's node and its
    share of the call's busy time (columns `_<name>_node`, `_<name>_actor`, `_<name>_busy`,
    `_<name>_start`, `_<name>_end`), which the shard writer records and strips. A stage with a
    `warm_up()` method (returning seconds) runs it before its first unit.

    A unit that raises is tried again; if it fails again, the run stops (StageFailure), unless
    `skip_failed`: then each of its samples is tried alone, and those that still raise are left
    out of the output and told to the progress counter (`StageCounter.skip`), which the driver
    reads to record them (`--max-failed-samples`).

    `device` is where the stage computes ("cuda" or "cpu", as the driver resolved it): an
    actor that should compute on CUDA but sees no CUDA device stops the run, naming its node
    and GPUs, rather than fall back to the CPU. `rows` ((function, kwargs)) turns the outputs
    into rows of the store inside the actor, next to the data (the last stage)."""

    def __init__(self, stage: type, kwargs: dict, batch_size: int, name: str,
                 progress=None, skip_failed: bool = False, device: str = "cpu",
                 rows: tuple | None = None) -> None:
        import ray

        ctx = ray.get_runtime_context()
        self.node, self.actor = ctx.get_node_id(), ctx.get_actor_id()
        self.name, self.progress = name, progress
        if progress is not None:
            progress.warming.remote(name)
        if device == "cuda":
            self._check_cuda(ray.get_gpu_ids())
        self.stage = stage(**kwargs, device=device)
        # a compile (or any first-call cost) is paid here, shown as warm-up, not as a slow batch
        warm = self.stage.warm_up() if hasattr(self.stage, "warm_up") else 0.0
        self.batch_size = batch_size
        self.skip_failed = skip_failed
        self.rows = rows
        if progress is not None:
            progress.warmed.remote(name, warm, {
                "node": self.node, "device": device, "gpu_ids": [str(g) for g in
                                                                 ray.get_gpu_ids()],
                "precision": getattr(self.stage, "precision", None)})

    def _check_cuda(self, gpu_ids: list) -> None:
        import torch

        if torch.cuda.is_available():
            return
        error = (f"an actor on node {self.node[:12]} was given GPU(s) "
                 f"{', '.join(map(str, gpu_ids)) or 'none'} but sees no CUDA device (is its "
                 f"NVIDIA driver missing, or older than the locked torch {torch.__version__} "
                 "needs?); pass --device cpu to compute on the CPU on purpose")
        if self.progress is not None:
            import ray

            ray.get(self.progress.fail.remote(self.name, [], error))
        raise RuntimeError(error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        n = len(next(iter(batch.values())))
        out = self._retried(batch, n)
        end = time.time()
        m = len(next(iter(out.values())))
        tags = {"node": self.node, "actor": self.actor, "busy": (end - start) / max(m, 1),
                "start": start, "end": end}
        for key, value in tags.items():
            out[f"_{self.name}_{key}"] = np.full(m, value, dtype=object if isinstance(value, str)
                                                 else np.float64)
        if self.progress is not None:
            self.progress.add.remote(self.name, n)
        if self.rows is not None and m:  # no rows (all skipped): Ray Data drops the block
            to_rows, kwargs = self.rows
            return to_rows(out, **kwargs)
        return out

    def _run(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """The unit's batches through the stage, joined."""
        return join([self.stage({k: v[i:i + self.batch_size] for k, v in batch.items()})
                     for i in range(0, n, self.batch_size)])

    def _retried(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """The unit through the stage; a unit that raises is tried again (a transient fault:
        CUDA out of memory, a preempted read) up to STAGE_ATTEMPTS times, then fails as a
        StageFailure naming its samples, or with `skip_failed` goes sample by sample."""
        for attempt in range(1, STAGE_ATTEMPTS + 1):
            try:
                return self._run(batch, n)
            except Exception as e:  # noqa: BLE001 - any stage error: retried, then reported
                if attempt == STAGE_ATTEMPTS:
                    if self.skip_failed:
                        return self._alone(batch, n)
                    raise self._failure(batch, e) from e
                log.warning("%s failed on a unit (%s: %s); trying it again", self.name,
                            type(e).__name__, e)

    def _alone(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Each sample of a unit that kept failing, alone: the outputs of those that pass,
        joined; those that raise are left out and reported, with their tracebacks, to the
        progress counter before the outputs go on, so the driver knows of them before it can
        see the rest of their shard. A unit whose every sample fails gives no rows (an empty
        `index` column: Ray Data drops such a block's other columns anyway)."""
        import traceback

        parts, skipped = [], []
        for i in range(n):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            try:
                parts.append(self._run(one, 1))
            except Exception as e:  # noqa: BLE001 - the sample is skipped, never silently
                skipped.append({"stage": self.name, "index": int(one["index"][0]),
                                "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()})
        if skipped and self.progress is not None:
            import ray

            ray.get(self.progress.skip.remote(skipped))
        return join(parts) if parts else {"index": batch["index"][:0]}

    def _failure(self, batch: dict[str, np.ndarray], e: Exception) -> StageFailure:
        """The unit's StageFailure, also told to the progress counter: exceptions lose their
        causes on the way to the driver, which reads what failed from the counter."""
        failure = StageFailure(self.name, [int(i) for i in batch.get("index", [])],
                               f"{type(e).__name__}: {e}")
        if self.progress is not None:
            import ray

            ray.get(self.progress.fail.remote(failure.stage, failure.indices, failure.error))
        return failure


class GeneratorStage(PoolStage):
    """The generator pool's PoolStage: a class of its own, so that Ray names its actors
    (`MapWorker(MapBatches(GeneratorStage))`) apart from the labellers' in logs and `ps`."""


class LabellerStage(PoolStage):
    """The labeller pool's PoolStage (see GeneratorStage)."""


class StageFailure(Exception):
    """A pool stage that failed on a unit after its retries: the stage, the unit's sample
    indices and the error (the traceback travels as the cause)."""

    def __init__(self, stage: str, indices: list[int], error: str) -> None:
        super().__init__(stage, indices, error)
        self.stage, self.indices, self.error = stage, indices, error

    def __str__(self) -> str:
        first = self.error.strip().splitlines()[0] if self.error.strip() else "?"
        if not self.indices:  # before its first unit
            return f"the {self.stage} stage could not start: {first}"
        where = (f"samples {self.indices[0]}-{self.indices[-1]}" if len(self.indices) > 1
                 else f"sample {self.indices[0]}")
        return f"the {self.stage} stage failed on {where} ({first})"


def join(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A stage's outputs for consecutive batches -> one output."""
    return {k: concat([out[k] for out in outputs]) for k in outputs[0]}


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """Batches of one column -> one column; object columns stay 1-d object arrays."""
    from actors.batch import object_column

    if parts[0].dtype == object:
        return object_column([x for p in parts for x in p])
    return np.concatenate(parts)
