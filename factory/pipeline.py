"""`factory generate` and `factory label` as one Ray Data pipeline: sample specs -> SD generator
pool -> labeller pool -> Parquet shards written by the workers. `generate` labels with Mask R-CNN
(training and test triplets), `label` with a trained grounding head (the synthetic segmentation
set). This module checks the options and wires stages; the models live in `actors/`, the pools'
sizing and placement in `factory/pools.py`, the shard writer in `factory/writer.py`.

Work is cut into units smaller than a shard (`factory/units.py`), so that the last wave of a
run leaves no GPU idle for long.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc

from actors.names import DEFAULT_MODEL, TINY
from factory.errors import FactoryError, RunFailure
from factory.pools import IMAGES_PER_S, PLACEMENT_TIMEOUT, STAGE_CPUS, parse_pool_size
from factory.prompts import SamplePlan
from factory.store import ShardStore

log = logging.getLogger(__name__)

UNIFORM_PAIRS_NOTICE = ("notice: no --pairs file, so two-class prompts pair classes uniformly "
                        "(the paper uses co-appearing pairs: make a file with `factory pairs`)")


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
    precision: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    compile: bool | None = None  # None: on a GPU only
    compile_cache: str | None = None  # None: $TORCHINDUCTOR_CACHE_DIR or ~/.cache/factory/...
    fp8: bool = False  # float8 Linear layers in the UNet (lossy; Ada/Hopper GPUs)
    batch_size: int = 16
    label_batch_size: int = 8
    generators: str | int = "auto"  # auto: one per `gen` slot, growing as gen nodes join
    labellers: str | int = "auto"  # auto: from the measured ratio of the stages' speeds
    gen_gpus: float | None = None  # None: 1, or a share where labellers run on the same nodes
    label_gpus: float | None = None
    address: str | None = None
    placement_timeout: float | None = None  # None: 600 s on a cluster, 10 s on a local Ray
    allow_drift: bool = False  # resume even where precision, weights or libraries now differ
    max_failed_samples: int = 0  # samples the folder may lack because a stage kept failing


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
    score_threshold: float | None = None  # None: the oracle's own, 0.5 (union) or 0.05 (top1)


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
    failed: int = 0  # samples skipped in this call because a stage kept failing on them
    busy: dict[str, float | None] | None = None  # stage -> busy fraction of its actors' time
    pools: dict[str, tuple[int, int]] | None = None  # stage -> (min, max) actors
    warm_up_s: dict[str, list[float]] | None = None  # stage -> each actor's warm-up seconds
    # stage -> actor -> [busy seconds, first call's start, last call's end] (unix seconds)
    actor_spans: dict[str, dict[str, list[float]]] | None = None

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
    images_per_s: float  # measured speed, for sizing `auto` pools against the generators
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
                        ("batch size", o.batch_size), ("label batch size", o.label_batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    parse_pool_size(o.generators, "generators")
    parse_pool_size(o.labellers, "labellers")
    if o.max_failed_samples < 0:
        raise ValueError(f"max failed samples must be >= 0, got {o.max_failed_samples}")
    if o.placement_timeout is not None and o.placement_timeout <= 0:
        raise ValueError(f"placement timeout must be > 0 seconds, got {o.placement_timeout}")
    if o.feature_step is not None and not 0 <= o.feature_step < o.steps:
        raise ValueError(f"feature step must lie in [0, {o.steps}), got {o.feature_step}")
    if o.precision is not None:
        check_precision(o.precision)
    if o.fp8:
        _check_fp8(local=not o.address)
    check_model_name(model)
    return n


def _check_fp8(local: bool) -> None:
    """--fp8 needs torchao everywhere and, on a local run, a GPU with float8 matrix units."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--fp8 needs torchao: `uv sync --extra fp8`")
    if local:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise ValueError("--fp8 needs an Ada or Hopper GPU (compute capability 8.9 or "
                             "newer)")


def _sd_run(o: RunOptions) -> dict:
    """The SD arguments that define a run's images."""
    return {"steps": o.steps, "guidance": o.guidance,
            "feature_step": o.steps - 1 if o.feature_step is None else o.feature_step,
            "precision": o.precision or "auto", "fp8": o.fp8}


def prepare(o: GenerateOptions) -> tuple[SamplePlan, ShardStore]:
    """Check every argument of `generate` and plan its output folder (new, or an earlier run of
    the same arguments to resume); nothing is written yet. Raises FactoryError."""
    from actors.names import check_detector, oracle_score_threshold
    from factory.pairs import read_pairs
    from factory.vocab import get_split

    try:
        split = get_split(o.split, o.fold)
        pairs = read_pairs(o.pairs, split.vocab) if o.pairs else None
        plan = SamplePlan(split, o.subset, o.seed, pairs, o.two_class_ratio)
        n = _check_run(o, plan, o.model)
        detector = o.detector or (TINY if o.model == TINY else "torchvision")
        check_detector(detector, o.detector_weights)
        score_threshold = oracle_score_threshold(o.oracle, o.score_threshold)
        run = {
            "kind": "triplets", "split": o.split, "fold": split.fold, "subset": o.subset,
            "n": n, "seed": o.seed, "shard_size": o.shard_size, "model": o.model,
            "detector": detector,
            "detector_weights": (_file_sha256(o.detector_weights) if o.detector_weights
                                 else None),
            "pairs": _file_sha256(o.pairs) if o.pairs else "uniform",
            "two_class_ratio": o.two_class_ratio, "oracle": o.oracle,
            "score_threshold": score_threshold, **_sd_run(o),
        }
        store = ShardStore.plan(
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
    """Check every argument of `label` and the checkpoint (loading the head once), and plan its
    output folder (see `prepare`); nothing is written yet. Raises FactoryError."""
    from actors.grounding_labeller import check_band
    from actors.tokenizer import clip_tokenizer
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
            tokenizer = clip_tokenizer()  # names must fit SD's prompts whole
            names, pairs = (read_vocabulary_file(o.vocab, tokenizer) if o.vocab is not None
                            else (o.classes.split(","), []))
            split = open_vocabulary(names, seen=tuple(info.get("seen", ())),
                                    tokenizer=tokenizer)
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
        store = ShardStore.plan(
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


def build_dataset(o: RunOptions, plan: SamplePlan, store: ShardStore, spans: np.ndarray,
                  unit: int, labeller: Labeller, pools: dict, counter=None,
                  skip_failed: bool = False):
    """The run's Ray Data graph: work units (sample specs) -> generator pool -> labeller pool
    -> rows (with the stages' tags for the writer). With `skip_failed` the stages leave out
    the samples they keep failing on (see PoolStage)."""
    import ray

    from actors.sd_generator import SDGenerator
    from factory.pools import GeneratorStage, LabellerStage
    from factory.units import work_unit_source
    from factory.writer import tagged_rows

    run = store.manifest["run"]
    units = int((spans[:, 1] - spans[:, 0]).sum())
    gen, lab = pools["generator"], pools["labeller"]
    return (
        ray.data.read_datasource(work_unit_source(plan, spans, unit), num_cpus=STAGE_CPUS,
                                 override_num_blocks=units)
        .map_batches(
            GeneratorStage, batch_size=unit, **gen.ray_args(), fn_constructor_kwargs=dict(
                stage=SDGenerator, batch_size=o.batch_size, name="generator", progress=counter,
                skip_failed=skip_failed,
                kwargs=dict(model=run["model"], steps=o.steps, guidance=o.guidance,
                            feature_step=run["feature_step"], precision=o.precision,
                            compile=o.compile, compile_cache=o.compile_cache,
                            batch_size=o.batch_size, fp8=o.fp8)))
        .map_batches(
            LabellerStage, batch_size=unit, **lab.ray_args(), fn_constructor_kwargs=dict(
                stage=labeller.cls, kwargs=labeller.kwargs, batch_size=o.label_batch_size,
                name="labeller", progress=counter, skip_failed=skip_failed))
        .map_batches(tagged_rows, fn_kwargs=dict(
            to_rows=labeller.to_rows, split=run["split"], fold=run["fold"],
            subset=run["subset"], run_seed=o.seed, sd_model=run["model"],
            **labeller.rows_kwargs), batch_size=None, num_cpus=STAGE_CPUS)
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
             oracle=o.oracle, score_threshold=run["score_threshold"]),
        to_triplets, dict(detector=run["detector"]), IMAGES_PER_S["mask r-cnn"])
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
        to_segmentation, dict(checkpoint=checkpoint), IMAGES_PER_S["grounding head"],
        keep=(lambda t: pc.greater_equal(t.column("quality"), run["min_quality"]))
        if run["min_quality"] > 0 else None)
    return _run(o, plan, store, labeller)


def _run(o: RunOptions, plan: SamplePlan, store: ShardStore, labeller: Labeller) -> RunResult:
    """Finish what the folder lacks: make the folder and take its lock (one writer at a time),
    redo damaged shards, join the cluster, size and place the pools, check the workers can
    write the output, then run the pipeline with a quiet console. A new folder whose run is
    refused before any work (bad cluster or output) is removed again."""
    from factory.store import StoreError

    new = not store.exists
    start = time.perf_counter()
    try:
        store.create()
        lock = store.lock()
    except OSError as e:
        raise FactoryError(f"cannot write --out {o.out!r}: {e}") from None
    except StoreError as e:  # another run holds the folder: leave it alone
        raise FactoryError(str(e)) from None
    try:
        with lock:
            return _finish(o, plan, store, labeller, new, start)
    except FactoryError as e:
        if new and not isinstance(e, RunFailure) and not store.done():
            store.discard()  # refused before any work: leave nothing behind
        raise


def _finish(o: RunOptions, plan: SamplePlan, store: ShardStore, labeller: Labeller, new: bool,
            start: float) -> RunResult:
    from factory.console import ray_logs_to
    from factory.pools import connect_ray

    if not new:
        if store.remove_partial():
            log.info("removed temporary files of an interrupted run")
        damaged = store.damaged()
        for k, why in damaged.items():
            log.warning("shard %d is damaged (%s): making it again", k, why)
        if damaged:
            store.redo(damaged)
        if store.repair():
            log.info("recorded the shards an interrupted run finished")
    todo = store.todo()
    skipped = store.num_shards - len(todo)
    if skipped:
        log.info("%d of %d shards already done; making the other %d",
                 skipped, store.num_shards, len(todo))
    if not todo:
        return RunResult(0, 0, skipped, 0.0, o.out)
    try:
        with ray_logs_to(store.log_path) as console:
            connect_ray(o.address)
            w, pools, warm_up_s = _pipeline(o, plan, store, todo, labeller, console)
    except Exception as e:
        failure = run_failure(e, store.log_path)
        if failure is None:
            raise
        raise failure from None
    return RunResult(w.written, w.shards, skipped, time.perf_counter() - start, o.out,
                     w.dropped, w.failed, busy={s: w.busy_fraction(s) for s in w.busy},
                     pools={p.kind: (p.min_size, p.max_size) for p in pools.values()},
                     warm_up_s=warm_up_s, actor_spans=w.busy)


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def run_failure(e: BaseException, log_path: str) -> RunFailure | None:
    """The one line for a run whose output cannot be written (a full disk, no permission: its
    full traceback is in the log), or None."""
    seen, todo = set(), [e]
    while todo:  # Ray wraps a worker's exception: follow every link
        cause = todo.pop()
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRORS:
            where = f" {cause.filename}" if cause.filename else ""
            return RunFailure(f"cannot write the output{where}: {os.strerror(cause.errno)}; "
                              f"the full traceback is in {log_path}")
        todo += [cause.__cause__, cause.__context__, getattr(cause, "cause", None)]
    return None


class FailureBudget:
    """`--max-failed-samples`: how many samples the folder may lack because a stage kept
    failing on them, counting those its finished shards already lack (`already`). Each skipped
    sample is named on the console, its traceback goes to the run's log, and one more than the
    budget stops the run."""

    def __init__(self, limit: int, already: int, log_path: str) -> None:
        self.limit, self.already, self.log_path = limit, already, log_path
        self.skipped: list[dict] = []

    @property
    def left(self) -> int:
        return self.limit - self.already - len(self.skipped)

    def spend(self, samples: list[dict]) -> None:
        from factory.console import RUN_LOG
        from factory.pools import StageFailure

        self.skipped += samples
        for f in samples:
            log.warning("skipped sample %d: the %s stage kept failing on it (%s)", f["index"],
                        f["stage"], f["error"])
            RUN_LOG.error("sample %d skipped; the %s stage's traceback:\n%s", f["index"],
                          f["stage"], f["traceback"])
        if self.left >= 0:
            return
        first = self.skipped[0]
        earlier = f", with {self.already} skipped by earlier runs" if self.already else ""
        more = len(self.skipped) - 1
        raise RunFailure(
            f"more than {self.limit} samples failed (--max-failed-samples {self.limit}{earlier})"
            f": {StageFailure(first['stage'], [first['index']], first['error'])}"
            + (f" and {more} more" if more else "")
            + f"; their tracebacks are in {self.log_path}")


DRIFT_PACKAGES = ("torch", "diffusers", "transformers")


def resolved_run(o: RunOptions, store: ShardStore, pools: dict) -> dict:
    """What the samples depend on beyond the arguments, as this run resolves it: the precision
    the generators compute in (`auto`: bfloat16 on GPUs, float32 on CPUs), the SD weights
    (`actors.names.weights_id`) and the versions of the model libraries."""
    from actors.names import weights_id
    from factory.store import package_versions

    versions = package_versions()
    gpu = pools["generator"].gpus > 0
    return {"precision": o.precision or ("bfloat16" if gpu else "float32"),
            "sd_weights": weights_id(store.manifest["run"]["model"]),
            **{name: versions[name] for name in DRIFT_PACKAGES}}


def check_drift(store: ShardStore, now: dict, allow: bool) -> None:
    """Record the resolved run in a new folder's manifest; refuse a resume that resolves
    differently (its samples would mix, say, float32 and bfloat16 images), naming the values,
    unless `allow`, which is recorded under `drift`."""
    before = store.manifest.get("resolved")
    if before is None:
        store.record("resolved", now)
        return
    differ = [k for k in now if before.get(k) != now[k]]
    if not differ:
        return
    text = "; ".join(f"{k} {before.get(k)} then, {now[k]} now" for k in differ)
    if not allow:
        raise FactoryError(f"{store.root!r} was made by a run that resolved differently ({text}):"
                           " resume it where it resolves the same, or pass --allow-drift to mix"
                           " them on purpose")
    log.warning("notice: --allow-drift: %s", text)
    store.record("drift", [*store.manifest.get("drift", []), {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from": {k: before.get(k) for k in differ}, "to": {k: now[k] for k in differ}}])


def _pipeline(o: RunOptions, plan: SamplePlan, store: ShardStore, todo: list[int],
              labeller: Labeller, console):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from factory.console import Progress, StageCounter
    from factory.pools import (
        ClusterView,
        StageFailure,
        probe_output,
        size_pools,
        wait_for_placement,
    )
    from factory.units import work_units
    from factory.writer import write_shards

    unit = max(o.batch_size, o.label_batch_size)
    spans = work_units(store.layout, todo, unit)
    units = int((spans[:, 1] - spans[:, 0]).sum())
    pools = size_pools(ClusterView.current(), units,
                       generators=parse_pool_size(o.generators, "generators"),
                       labellers=parse_pool_size(o.labellers, "labellers"),
                       labeller_images_per_s=labeller.images_per_s,
                       gen_gpus=o.gen_gpus, label_gpus=o.label_gpus)
    check_drift(store, resolved_run(o, store, pools), o.allow_drift)
    wait_for_placement(pools, o.placement_timeout
                       or PLACEMENT_TIMEOUT["cluster" if o.address else "local"])
    probe_output(store.root)
    log.info("%d shards in %d work units of %d; pools: %s; Ray's log: %s", len(todo), units,
             unit, ", ".join(map(str, pools.values())), store.log_path)
    # on the driver's own node: a lost worker node must not take the progress counts with it
    counter = ray.remote(num_cpus=0)(StageCounter).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
    planned = sum(len(store.shard_rows(k)) for k in todo)
    progress = Progress({"generator": units * unit, "labeller": units * unit,
                         "written": planned},
                        {"generator": "SD generator", "labeller": labeller.cls.__name__,
                         "written": "shards written"}, stream=console)

    def show(w, force=False):
        if force or progress.due():
            counts, (warming, warm_up_s) = ray.get([counter.counts.remote(),
                                                    counter.warm_ups.remote()])
            progress.show({**counts, "written": w.written + w.dropped + w.failed}, warming,
                          warm_up_s)

    taken = 0  # skipped samples the counter has handed over so far

    def skipped() -> list[dict]:
        nonlocal taken
        new = ray.get(counter.skipped.remote(taken))
        taken += len(new)
        return new

    # samples skipped by earlier runs count, except those of shards deleted to be made again
    redo = set(todo)
    already = sum(f["index"] // store.shard_size not in redo for f in store.failed)
    budget = FailureBudget(o.max_failed_samples, already, store.log_path)
    skip_failed = budget.left > 0
    ds = build_dataset(o, plan, store, spans, unit, labeller, pools, counter,
                       skip_failed=skip_failed)
    try:  # without skipping, the stages report no skipped samples: no need to ask the counter
        w = write_shards(ds, store, todo, labeller.keep, on_progress=show,
                         skipped=skipped if skip_failed else None, on_skipped=budget.spend)
    except Exception as e:
        failed = ray.get(counter.failed.remote())
        if not failed:
            raise
        spent = (f" (--max-failed-samples {budget.limit}: used up by the {budget.already} "
                 "samples earlier runs skipped)" if budget.limit and budget.left <= 0 else "")
        raise RunFailure(f"{StageFailure(*failed[0])}{spent}; its full traceback is in "
                         f"{store.log_path}") from e
    show(w, force=True)
    warm_up_s = ray.get(counter.warm_ups.remote())[1]
    ray.kill(counter)
    return w, pools, warm_up_s
