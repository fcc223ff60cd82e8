"""`factory generate` and `factory label` as one Ray Data pipeline: sample specs -> SD generator
pool -> labeller pool -> Parquet shards. `generate` labels with Mask R-CNN (training and test
triplets), `label` with a trained grounding head (the synthetic segmentation set). This module
wires stages; the models live in `actors/`.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.names import DEFAULT_MODEL, TINY
from factory.prompts import SamplePlan
from factory.store import ShardStore

log = logging.getLogger(__name__)

UNIFORM_PAIRS_NOTICE = ("notice: no --pairs file, so two-class prompts pair classes uniformly "
                        "(the paper uses co-appearing pairs: make a file with `factory pairs`)")
STAGE_CPUS = 0.25  # CPU reservation per actor/task: GPU stages need little, and a 2-core machine
# must fit two actor pools plus the spec and record tasks without deadlocking.


class FactoryError(Exception):
    """Bad input or an unusable environment, reported to the user in one line."""


@dataclass
class RunOptions:
    """What `factory generate` and `factory label` share: the store, SD and the two pools (see
    the CLI for their help)."""

    out: str
    n: int | None = None  # None: the paper's size for subsets test and label
    seed: int = 0
    shard_size: int = 256
    model: str | None = DEFAULT_MODEL
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


@dataclass
class GenerateOptions(RunOptions):
    """Arguments of `factory generate`."""

    split: str = "pascal"
    fold: str = "1"
    subset: str = "train"
    detector: str | None = None  # None: "tiny" with --model tiny, else "torchvision"
    detector_weights: str | None = None
    pairs: str | None = None
    two_class_ratio: float = 0.5
    oracle: str = "union"
    score_threshold: float = 0.5


@dataclass
class LabelOptions(RunOptions):
    """Arguments of `factory label`."""

    checkpoint: str = ""  # a grounding-head checkpoint or training --out folder (required)
    model: str | None = None  # None: the checkpoint's
    split: str | None = None  # None: the checkpoint's
    fold: str | None = None  # None: the checkpoint's
    classes: str | None = None  # comma-separated open vocabulary, instead of the split's
    vocab: str | None = None  # open-vocabulary file (names, optional pairs)
    pairs: str | None = None
    per_class: int | None = None  # None: the paper's (appendix B.3)
    per_pair: int | None = None
    threshold: float = 0.5
    ignore_band: tuple[float, float] | None = None
    min_quality: float = 0.0


@dataclass(frozen=True)
class RunResult:
    written: int  # samples written by this call
    shards_written: int
    shards_skipped: int  # already done by an earlier run
    seconds: float
    out: str
    dropped: int = 0  # samples left out by --min-quality in this call

    @property
    def images_per_s(self) -> float:
        return (self.written + self.dropped) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Labeller:
    """A run's second actor pool, and how its outputs become rows of the store."""

    cls: type
    kwargs: dict
    to_rows: Callable
    rows_kwargs: dict
    keep: Callable | None = None  # table -> bool mask of rows to write


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_run(o: RunOptions, plan: SamplePlan, model: str) -> int:
    """Check the options both commands share; returns n."""
    from actors.names import check_model_name, check_precision

    n = o.n if o.n is not None else plan.default_n()
    if n is None:
        raise ValueError(f"--n is required for subset {plan.subset!r}")
    for name, value in (("n", n), ("shard size", o.shard_size), ("steps", o.steps),
                        ("batch size", o.batch_size), ("generators", o.generators),
                        ("labellers", o.labellers), ("label batch size", o.label_batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if o.feature_step is not None and not 0 <= o.feature_step < o.steps:
        raise ValueError(f"feature step must lie in [0, {o.steps}), got {o.feature_step}")
    if o.precision is not None:
        check_precision(o.precision)
    check_model_name(model)
    return n


def _sd_run(o: RunOptions) -> dict:
    """The SD arguments that define a run's images."""
    return {"steps": o.steps, "guidance": o.guidance,
            "feature_step": o.steps - 1 if o.feature_step is None else o.feature_step,
            "precision": o.precision or "auto"}


def prepare(o: GenerateOptions) -> tuple[SamplePlan, ShardStore]:
    """Check every argument of `generate`, then create (or reopen for resume) the output folder.
    Raises FactoryError before anything is written."""
    from actors.names import ORACLES, check_detector
    from factory.pairs import read_pairs
    from factory.vocab import get_split

    try:
        split = get_split(o.split, o.fold)
        pairs = read_pairs(o.pairs, split.vocab) if o.pairs else None
        plan = SamplePlan(split, o.subset, o.seed, pairs, o.two_class_ratio)
        n = _check_run(o, plan, o.model)
        if o.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {o.oracle!r}: one of {', '.join(ORACLES)}")
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
            "score_threshold": o.score_threshold, **_sd_run(o),
        }
        store = ShardStore.create_or_resume(
            o.out, run,
            models={"sd": o.model, "detector": detector, "detector_weights": o.detector_weights},
            pairs={"source": "file" if o.pairs else "uniform", "path": o.pairs,
                   "count": len(pairs) if pairs else None},
            seen=list(split.seen), unseen=list(split.unseen), categories=_categories(split),
            arguments=asdict(o),  # as first given; pool and batch sizes may change on resume
        )
    except ValueError as e:
        raise FactoryError(str(e)) from None
    return plan, store


def _categories(split) -> list[dict]:
    return [{"id": i, "name": n} for i, n in zip(split.vocab.ids, split.vocab.names, strict=True)]


def prepare_label(o: LabelOptions) -> tuple[SamplePlan, ShardStore]:
    """Check every argument of `label` and the checkpoint (loading the head once), then create
    (or reopen for resume) the output folder. Raises FactoryError before anything is written."""
    from actors.grounding_labeller import check_band
    from factory.pairs import read_pairs
    from factory.vocab import get_split, open_vocabulary, read_vocabulary_file
    from train.grounding.checkpoint import HEAD_WEIGHTS, load_grounding_head

    try:
        if not o.checkpoint:
            raise ValueError("--checkpoint is required")
        _, info = load_grounding_head(o.checkpoint)
        folder = info["folder"]
        for name, given, trained in (("split", o.split, info["split"]),
                                     ("fold", o.fold, info["fold"]),
                                     ("SD model", o.model, info["model"])):
            if given is not None and str(given) != str(trained):
                raise ValueError(f"the checkpoint {folder!r} was trained for {name} "
                                 f"{trained!r}, not {given!r}")
        if o.classes is not None and o.vocab is not None:
            raise ValueError("give --classes or --vocab, not both")
        if o.classes is not None or o.vocab is not None:
            if o.pairs:
                raise ValueError("--pairs names a split's classes: put pairs of an open "
                                 "vocabulary in the --vocab file ('a, b' lines)")
            names, pairs = (read_vocabulary_file(o.vocab) if o.vocab is not None
                            else (o.classes.split(","), []))
            split = open_vocabulary(names, seen=tuple(info.get("seen", ())))
            pairs = tuple(pairs) or None
        else:
            split = get_split(info["split"], info["fold"])
            pairs = read_pairs(o.pairs, split.vocab) if o.pairs else None
        plan = SamplePlan(split, "label", o.seed, pairs, per_class=o.per_class,
                          per_pair=o.per_pair)
        n = _check_run(o, plan, info["model"])
        low, high = check_band(o.threshold, o.ignore_band)
        if not 0.0 <= o.min_quality < 1.0:
            raise ValueError(f"min quality must lie in [0, 1), got {o.min_quality}")
        run = {
            "kind": "segmentation", "split": split.name, "fold": split.fold, "subset": "label",
            "classes": list(split.vocab.names), "n": n, "seed": o.seed,
            "shard_size": o.shard_size, "model": info["model"],
            "checkpoint": _file_sha256(os.path.join(folder, HEAD_WEIGHTS)),
            "checkpoint_step": info.get("step"),
            "pairs": _pairs_id(o.pairs, pairs, plan),
            "per_class": plan.slot_counts[0], "per_pair": plan.slot_counts[1],
            "threshold": o.threshold, "ignore_band": [low, high] if o.ignore_band else None,
            "min_quality": o.min_quality, **_sd_run(o),
        }
        store = ShardStore.create_or_resume(
            o.out, run,
            models={"sd": info["model"], "checkpoint": folder,
                    "head": {k: info.get(k) for k in ("split", "fold", "step", "seen")}},
            pairs={"source": "file" if pairs else "uniform" if plan.test_pairs else "none",
                   "path": o.pairs or o.vocab, "count": len(plan.test_pairs)},
            seen=list(split.seen), unseen=list(split.unseen), categories=_categories(split),
            arguments=asdict(o),
        )
    except (ValueError, OSError) as e:  # CheckpointError and StoreError are ValueErrors
        raise FactoryError(str(e)) from None
    return plan, store


def _pairs_id(path: str | None, pairs: tuple | None, plan: SamplePlan) -> str | list:
    """What decides a label run's pairs: a pairs file's hash, a vocabulary file's pairs, the
    uniform fallback or none."""
    if path:
        return _file_sha256(path)
    if pairs:
        return [list(p) for p in pairs]
    return "uniform" if plan.test_pairs else "none"


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


def gpu_share(actors: int) -> float:
    """GPUs per actor when `actors` actors split the cluster's GPUs evenly, at most 1."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    return min(1.0, gpus / actors) if gpus else 0.0


def _gpu_shares(o: RunOptions) -> tuple[float, float]:
    share = gpu_share(o.generators + o.labellers)
    return (share if o.gen_gpus is None else o.gen_gpus,
            share if o.label_gpus is None else o.label_gpus)


def build_dataset(o: RunOptions, plan: SamplePlan, store: ShardStore, shards: list[int],
                  labeller: Labeller):
    import ray

    from actors.sd_generator import SDGenerator

    run = store.manifest["run"]
    gen_gpus, label_gpus = _gpu_shares(o)
    return (
        ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=len(shards))
        .map_batches(shard_specs, fn_kwargs={"plan": plan, "store": store}, batch_size=1,
                     num_cpus=STAGE_CPUS)
        .map_batches(
            SDGenerator,
            fn_constructor_kwargs=dict(model=run["model"], steps=o.steps, guidance=o.guidance,
                                       feature_step=run["feature_step"], precision=o.precision,
                                       compile=o.compile),
            batch_size=o.batch_size, num_cpus=STAGE_CPUS, num_gpus=gen_gpus,
            resources={"gen": 1}, compute=ray.data.ActorPoolStrategy(size=o.generators))
        .map_batches(
            labeller.cls, fn_constructor_kwargs=labeller.kwargs,
            batch_size=o.label_batch_size, num_cpus=STAGE_CPUS, num_gpus=label_gpus,
            resources={"label": 1}, compute=ray.data.ActorPoolStrategy(size=o.labellers))
        .map_batches(labeller.to_rows, fn_kwargs=dict(
            split=run["split"], fold=run["fold"], subset=run["subset"], run_seed=o.seed,
            sd_model=run["model"], **labeller.rows_kwargs), batch_size=None, num_cpus=STAGE_CPUS)
    )


def generate(o: GenerateOptions) -> RunResult:
    """Make (or finish) the triplet run described by `o`; a finished run returns at once."""
    from actors.maskrcnn_labeller import MaskRCNNLabeller
    from factory.schema import to_triplets

    plan, store = prepare(o)
    if plan.pairs is None:
        log.warning(UNIFORM_PAIRS_NOTICE)
    run = store.manifest["run"]
    labeller = Labeller(
        MaskRCNNLabeller,
        dict(vocab=o.split, detector=run["detector"], weights=o.detector_weights,
             oracle=o.oracle, score_threshold=o.score_threshold),
        to_triplets, dict(detector=run["detector"]))
    return _run(o, plan, store, labeller)


def label(o: LabelOptions) -> RunResult:
    """Make (or finish) the segmentation run described by `o`: images of every class of the
    split (or of an open vocabulary), labelled by a trained grounding head."""
    from actors.grounding_labeller import GroundingLabeller
    from factory.schema import to_segmentation

    plan, store = prepare_label(o)
    if store.manifest["pairs"]["source"] == "uniform":
        log.warning(UNIFORM_PAIRS_NOTICE)
    elif store.manifest["pairs"]["source"] == "none":
        log.warning("notice: the open vocabulary names no pairs, so every prompt names one "
                    "class (add 'a, b' lines to a --vocab file for two-class prompts)")
    run = store.manifest["run"]
    checkpoint = store.manifest["models"]["checkpoint"]
    labeller = Labeller(
        GroundingLabeller,
        dict(checkpoint=checkpoint, model=run["model"], threshold=o.threshold,
             ignore_band=tuple(run["ignore_band"]) if run["ignore_band"] else None),
        to_segmentation, dict(checkpoint=checkpoint),
        keep=(lambda t: pc.greater_equal(t.column("quality"), run["min_quality"]))
        if run["min_quality"] > 0 else None)
    if store.repair_dropped():
        log.info("recorded the dropped samples of shards an interrupted run finished")
    return _run(o, plan, store, labeller)


def _run(o: RunOptions, plan: SamplePlan, store: ShardStore, labeller: Labeller) -> RunResult:
    if store.remove_partial():
        log.info("removed temporary files of an interrupted run")
    todo = store.todo()
    skipped = store.num_shards - len(todo)
    if skipped:
        log.info("%d of %d shards already done; making the other %d",
                 skipped, store.num_shards, len(todo))
    start = time.perf_counter()
    if not todo:
        return RunResult(0, 0, skipped, 0.0, o.out)
    connect_ray(o.address)
    check_stage_resources()
    ds = build_dataset(o, plan, store, todo, labeller)
    written, dropped = _write_shards(ds, store, len(todo), start, labeller.keep)
    return RunResult(written, len(todo), skipped, time.perf_counter() - start, o.out, dropped)


def check_stage_resources() -> None:
    import ray

    have = ray.cluster_resources()
    missing = [r for r in ("gen", "label") if have.get(r, 0) < 1]
    if missing:
        raise FactoryError(
            f"the Ray cluster has no {' or '.join(repr(r) for r in missing)} resource: start "
            "generator nodes with --resources='{\"gen\": N}' and labeller nodes with "
            "--resources='{\"label\": N}' (N = their GPUs)")


def _write_shards(ds, store: ShardStore, todo: int, start: float,
                  keep: Callable | None = None) -> tuple[int, int]:
    """Collect the pipeline's rows by shard in the driver and write each shard once complete,
    leaving out (and recording) the rows `keep` rejects. Returns (written, dropped)."""
    parts: dict[int, list[pa.Table]] = collections.defaultdict(list)
    rows: collections.Counter = collections.Counter()
    written = dropped = shards_done = 0
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        shard_of = block.column("index").to_numpy() // store.shard_size
        for k in np.unique(shard_of):
            part = block.take(np.flatnonzero(shard_of == k))
            parts[int(k)].append(part)
            rows[int(k)] += part.num_rows
            if rows[int(k)] == len(store.shard_rows(int(k))):
                table = pa.concat_tables(parts.pop(int(k))).cast(store.schema)
                out: list[int] = []
                if keep is not None:
                    mask = keep(table)
                    out = table.filter(pc.invert(mask)).column("index").to_pylist()
                    table = table.filter(mask)
                store.write_shard(int(k), table, out)
                written += table.num_rows
                dropped += len(out)
                shards_done += 1
                log.info("shard %d written (%d/%d this run, %d samples, %d dropped, "
                         "%.2f images/s)", k, shards_done, todo, written, dropped,
                         (written + dropped) / (time.perf_counter() - start))
    if parts:  # every spec row must come back exactly once
        raise RuntimeError(f"pipeline ended with incomplete shards {sorted(parts)}")
    return written, dropped
