"""What the Ray Train jobs share: finding their checkpoint folders, the placement checks, and
the trainer itself (one DDP worker per GPU or CPU workers, checkpoints under --out, restarts
after worker failures)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

from factory.errors import FactoryError, Interrupted, interruption


def read_info(folder: str, info_file: str) -> dict:
    with open(os.path.join(folder, info_file), encoding="utf-8") as f:
        return json.load(f)


def latest_checkpoint(path: str, info_file: str) -> str | None:
    """`path` itself if it is a checkpoint folder (it holds `info_file`), else the checkpoint
    below it whose info has the highest step, or None."""
    if os.path.isfile(os.path.join(path, info_file)):
        return path
    found = glob.glob(os.path.join(path, "**", info_file), recursive=True)
    if not found:
        return None
    return os.path.dirname(max(found, key=lambda p: read_info(os.path.dirname(p),
                                                               info_file)["step"]))


def worker_dataset(rank: int) -> str:
    """The name of worker `rank`'s own dataset (see `fit`)."""
    return f"train_{rank}"


def worker_batches(cfg: dict, step: int):
    """This worker's batches of its dataset (see `fit`) from the job's step `step` on. A worker
    (re)started by Ray Train reads its dataset from the job's first step, `cfg["start_step"]`,
    so the batches its checkpoint already trained on are skipped."""
    import itertools

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    batches = ray.train.get_dataset_shard(worker_dataset(rank)).iter_batches(
        batch_size=cfg["batch_size"], batch_format="numpy", drop_last=True)
    return itertools.islice(batches, step - cfg["start_step"], None)


def check_placement(num_workers: int, use_gpu: bool, cpus_per_worker: float) -> None:
    """Refuse a worker count the cluster cannot place, even once its autoscaler has added
    every node it may, instead of waiting for it forever."""
    import ray

    from factory.pools import autoscaler_config

    most = autoscaler_config()[0]
    have = {r: max(v, most.get(r, 0)) for r, v in ray.cluster_resources().items()}
    have.update({r: v for r, v in most.items() if r not in have})
    need = {"CPU": num_workers * cpus_per_worker, "GPU": num_workers if use_gpu else 0}
    short = [f"{need[r]:g} {r}s (the cluster has {have.get(r, 0):g})"
             for r in ("CPU", "GPU") if need[r] > have.get(r, 0)]
    if short:
        raise FactoryError(f"{num_workers} workers need {' and '.join(short)}: use fewer "
                           "--num-workers or a bigger cluster")
    check_gpu_workers_fit_one_node(num_workers, use_gpu)


def check_gpu_workers_fit_one_node(num_workers: int, use_gpu: bool) -> None:
    """GPU workers go on one node (`fit`): refuse more than any node, live or that the
    autoscaler may launch, has GPUs, instead of waiting for one forever."""
    from factory.pools import ClusterView

    if not use_gpu:
        return
    most = max((t.get("GPU", 0) for t in ClusterView.current().node_types), default=0)
    if num_workers > most:
        raise FactoryError(f"{num_workers} GPU workers must share one node, but the largest "
                           f"node has {most:g} GPUs: use at most {most:g} --num-workers")


def fit(loop: Callable[[dict], None], cfg: dict, per_worker: list, *, out: str, name: str,
        use_gpu: bool, cpus_per_worker: float, info_file: str | None = None):
    """Run `loop` on Ray Train, one worker per dataset of `per_worker`: worker r reads its own,
    `worker_dataset(r)`, in order (not a split of one dataset, whose rows may reach another worker
    after a restart); returns Ray Train's result. Interrupted (Ctrl-C), it says from which step
    `--resume` continues (the latest checkpoint's, by its `info_file`)."""
    try:
        return _fit(loop, cfg, per_worker, out=out, name=name, use_gpu=use_gpu,
                    cpus_per_worker=cpus_per_worker)
    except (Interrupted, SystemError) as e:
        if interruption(e) is None:
            raise
        done = latest_checkpoint(out, info_file) if info_file else None
        if done is None:
            raise Interrupted("interrupted before the first checkpoint; rerun the same "
                              "command") from None
        raise Interrupted(f"interrupted; the last checkpoint is step "
                          f"{read_info(done, info_file)['step']}: rerun with --resume to "
                          "continue from it") from None


def _fit(loop: Callable[[dict], None], cfg: dict, per_worker: list, *, out: str, name: str,
         use_gpu: bool, cpus_per_worker: float):
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    num_workers = len(per_worker)
    trainer = TorchTrainer(
        loop, train_loop_config=cfg,
        datasets={worker_dataset(r): ds for r, ds in enumerate(per_worker)},
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            # GPU workers on one node (NVLink): with cluster.yaml, one `gen` node
            placement_strategy="STRICT_PACK" if use_gpu else "PACK"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=out,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
            failure_config=ray.train.FailureConfig(max_failures=3)),
    )
    return trainer.fit()
