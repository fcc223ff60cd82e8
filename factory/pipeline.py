"""`factory generate` as a Ray Data pipeline: sample specs -> SD generator pool -> Mask R-CNN
labeller pool -> Parquet shards. This module wires stages; the models live in `actors/`.

Each stage asks for its own custom resource (`gen`, `label`) besides its GPU share, so that on a
cluster the pools land on their own node groups; on one machine a local Ray gets both resources
and the GPUs are shared.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from actors.names import DEFAULT_MODEL, TINY
from factory.prompts import SamplePlan
from factory.store import ShardStore

log = logging.getLogger(__name__)

STAGE_CPUS = 0.25  # CPU reservation per actor/task: GPU stages need little, and a 2-core machine
# must fit two actor pools plus the spec and record tasks without deadlocking.


class FactoryError(Exception):
    """Bad input or an unusable environment, reported to the user in one line."""


@dataclass
class GenerateOptions:
    """Arguments of `factory generate` (see the CLI for their help)."""

    out: str
    split: str = "pascal"
    fold: str = "1"
    subset: str = "train"
    n: int | None = None  # None: the test subset's paper size; required for train
    seed: int = 0
    shard_size: int = 256
    model: str = DEFAULT_MODEL
    detector: str | None = None  # None: "tiny" with --model tiny, else "torchvision"
    detector_weights: str | None = None
    pairs: str | None = None
    two_class_ratio: float = 0.5
    oracle: str = "union"
    score_threshold: float = 0.5
    steps: int = 50
    guidance: float = 7.5
    feature_step: int | None = None  # None: the last denoising step
    precision: str | None = None  # None: float16 on a GPU, float32 on the CPU
    compile: bool = False
    batch_size: int = 8
    label_batch_size: int = 8
    generators: int = 1
    labellers: int = 1
    gen_gpus: float | None = None  # None: a share of the cluster's GPUs, at most 1
    label_gpus: float | None = None
    address: str | None = None


@dataclass(frozen=True)
class GenerateResult:
    written: int  # samples written by this call
    shards_written: int
    shards_skipped: int  # already done by an earlier run
    seconds: float
    out: str

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare(o: GenerateOptions) -> tuple[SamplePlan, ShardStore]:
    """Check every argument, then create (or reopen for resume) the output folder. Raises
    FactoryError before anything is written."""
    from actors.names import ORACLES, check_detector, check_model_name, check_precision
    from factory.pairs import read_pairs
    from factory.vocab import get_split

    try:
        split = get_split(o.split, o.fold)
        pairs = read_pairs(o.pairs, split.vocab) if o.pairs else None
        plan = SamplePlan(split, o.subset, o.seed, pairs, o.two_class_ratio)
        n = o.n if o.n is not None else plan.default_n()
        if n is None:
            raise ValueError(f"--n is required for subset {o.subset!r}")
        for name, value in (("n", n), ("shard size", o.shard_size), ("steps", o.steps),
                            ("batch size", o.batch_size), ("generators", o.generators),
                            ("labellers", o.labellers), ("label batch size", o.label_batch_size)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if o.feature_step is not None and not 0 <= o.feature_step < o.steps:
            raise ValueError(f"feature step must lie in [0, {o.steps}), got {o.feature_step}")
        if o.precision is not None:
            check_precision(o.precision)
        if o.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {o.oracle!r}: one of {', '.join(ORACLES)}")
        check_model_name(o.model)
        detector = o.detector or (TINY if o.model == TINY else "torchvision")
        check_detector(detector, o.detector_weights)
        run = {
            "kind": "triplets", "split": o.split, "fold": split.fold, "subset": o.subset,
            "n": n, "seed": o.seed, "shard_size": o.shard_size, "model": o.model,
            "detector": detector,
            "detector_weights": (_file_sha256(o.detector_weights) if o.detector_weights
                                 else None),
            "pairs": _file_sha256(o.pairs) if o.pairs else "uniform",
            "two_class_ratio": o.two_class_ratio, "oracle": o.oracle,
            "score_threshold": o.score_threshold, "steps": o.steps, "guidance": o.guidance,
            "feature_step": o.steps - 1 if o.feature_step is None else o.feature_step,
            "precision": o.precision or "auto",
        }
        store = ShardStore.create_or_resume(
            o.out, run,
            models={"sd": o.model, "detector": detector, "detector_weights": o.detector_weights},
            pairs={"source": "file" if o.pairs else "uniform", "path": o.pairs,
                   "count": len(pairs) if pairs else None},
            seen=list(split.seen), unseen=list(split.unseen),
            arguments=asdict(o),  # as first given; pool and batch sizes may change on resume
        )
    except ValueError as e:
        raise FactoryError(str(e)) from None
    return plan, store


def shard_specs(batch: dict[str, np.ndarray], *, plan: SamplePlan, store: ShardStore
                ) -> dict[str, np.ndarray]:
    """Shard ids -> one row per sample of those shards: index, prompt, classes, noise seed."""
    from actors.batch import object_column

    vocab = plan.split.vocab
    specs = [plan.sample(i) for k in batch["shard"] for i in store.shard_rows(int(k))]
    return {
        "index": np.array([s.index for s in specs], dtype=np.int64),
        "prompt": np.array([s.prompt for s in specs], dtype=object),
        "classes": object_column([list(s.classes) for s in specs]),
        "class_ids": object_column([[vocab.id_of(c) for c in s.classes] for s in specs]),
        "noise_seed": np.array([s.noise_seed for s in specs], dtype=np.int64),
    }


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray with both stage resources."""
    if address is None:
        # Local workers share this interpreter. Ray's `uv run` hook (meant for clusters, read
        # when ray is first imported) would instead copy the working folder, outputs and all,
        # and build a virtual environment from it for every session.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(resources={"gen": 1024, "label": 1024}, include_dashboard=False)


def _gpu_shares(o: GenerateOptions) -> tuple[float, float]:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    share = min(1.0, gpus / (o.generators + o.labellers)) if gpus else 0.0
    return (share if o.gen_gpus is None else o.gen_gpus,
            share if o.label_gpus is None else o.label_gpus)


def build_dataset(o: GenerateOptions, plan: SamplePlan, store: ShardStore, shards: list[int]):
    import ray

    from actors.maskrcnn_labeller import MaskRCNNLabeller
    from actors.sd_generator import SDGenerator
    from factory.schema import to_triplets

    run = store.manifest["run"]
    gen_gpus, label_gpus = _gpu_shares(o)
    return (
        ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=len(shards))
        .map_batches(shard_specs, fn_kwargs={"plan": plan, "store": store}, batch_size=1,
                     num_cpus=STAGE_CPUS)
        .map_batches(
            SDGenerator,
            fn_constructor_kwargs=dict(model=o.model, steps=o.steps, guidance=o.guidance,
                                       feature_step=run["feature_step"], precision=o.precision,
                                       compile=o.compile),
            batch_size=o.batch_size, num_cpus=STAGE_CPUS, num_gpus=gen_gpus,
            resources={"gen": 1}, compute=ray.data.ActorPoolStrategy(size=o.generators))
        .map_batches(
            MaskRCNNLabeller,
            fn_constructor_kwargs=dict(vocab=o.split, detector=run["detector"],
                                       weights=o.detector_weights, oracle=o.oracle,
                                       score_threshold=o.score_threshold),
            batch_size=o.label_batch_size, num_cpus=STAGE_CPUS, num_gpus=label_gpus,
            resources={"label": 1}, compute=ray.data.ActorPoolStrategy(size=o.labellers))
        .map_batches(to_triplets, fn_kwargs=dict(
            split=o.split, fold=run["fold"], subset=o.subset, run_seed=o.seed, sd_model=o.model,
            detector=run["detector"]), batch_size=None, num_cpus=STAGE_CPUS)
    )


def generate(o: GenerateOptions) -> GenerateResult:
    """Make (or finish) the run described by `o`; a finished run returns at once."""
    plan, store = prepare(o)
    if plan.pairs is None:
        log.warning("notice: no --pairs file, so two-class prompts pair classes uniformly (the "
                    "paper uses co-appearing pairs: make a file with `factory pairs`)")
    if store.remove_partial():
        log.info("removed temporary files of an interrupted run")
    todo = store.todo()
    skipped = store.num_shards - len(todo)
    if skipped:
        log.info("%d of %d shards already done; generating the other %d",
                 skipped, store.num_shards, len(todo))
    start = time.perf_counter()
    if not todo:
        return GenerateResult(0, 0, skipped, 0.0, o.out)
    connect_ray(o.address)
    _check_stage_resources()
    written = _write_shards(build_dataset(o, plan, store, todo), store, len(todo), start)
    return GenerateResult(written, len(todo), skipped, time.perf_counter() - start, o.out)


def _check_stage_resources() -> None:
    import ray

    have = ray.cluster_resources()
    missing = [r for r in ("gen", "label") if have.get(r, 0) < 1]
    if missing:
        raise FactoryError(
            f"the Ray cluster has no {' or '.join(repr(r) for r in missing)} resource: start "
            "generator nodes with --resources='{\"gen\": N}' and labeller nodes with "
            "--resources='{\"label\": N}' (N = their GPUs)")


def _write_shards(ds, store: ShardStore, todo: int, start: float) -> int:
    """Collect the pipeline's rows by shard in the driver and write each shard once complete."""
    from factory.schema import TRIPLET_SCHEMA

    parts: dict[int, list[pa.Table]] = collections.defaultdict(list)
    rows: collections.Counter = collections.Counter()
    written = shards_done = 0
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        shard_of = block.column("index").to_numpy() // store.shard_size
        for k in np.unique(shard_of):
            part = block.take(np.flatnonzero(shard_of == k))
            parts[int(k)].append(part)
            rows[int(k)] += part.num_rows
            if rows[int(k)] == len(store.shard_rows(int(k))):
                table = pa.concat_tables(parts.pop(int(k))).cast(TRIPLET_SCHEMA)
                store.write_shard(int(k), table)
                written += table.num_rows
                shards_done += 1
                log.info("shard %d written (%d/%d this run, %d samples, %.2f images/s)",
                         k, shards_done, todo, written, written / (time.perf_counter() - start))
    if parts:  # every spec row must come back exactly once
        raise RuntimeError(f"pipeline ended with incomplete shards {sorted(parts)}")
    return written

