"""`factory generate` and `factory label` as one Ray Data pipeline: sample specs -> SD generator
pool -> labeller pool -> Parquet shards written by the workers. `generate` labels with Mask R-CNN
(training and test triplets), `label` with a trained grounding head (the synthetic segmentation
set). This module runs the steps in order; the options are in factory/options.py, the run's
identity and drift check in factory/identity.py, the failure budget in factory/failures.py, the
Ray Data graph in factory/graph.py, the pools in factory/pools.py and the shard writer in
factory/writer.py.

Work is cut into units smaller than a shard (`factory/units.py`), so that the last wave of a
run leaves no GPU idle for long.
"""

from __future__ import annotations

import logging
import time

import pyarrow.compute as pc

from factory.errors import FactoryError, Interrupted, RunFailure, interruption
from factory.failures import FailureBudget, run_failure
from factory.graph import Labeller, build_dataset
from factory.identity import check_drift, prepare, prepare_label, resolved_run
from factory.options import GenerateOptions, LabelOptions, RunOptions, RunResult
from factory.pools import IMAGES_PER_S, PLACEMENT_TIMEOUT, parse_pool_size
from factory.prompts import SamplePlan
from factory.store import ShardStore

log = logging.getLogger(__name__)

UNIFORM_PAIRS_NOTICE = ("notice: no --pairs file, so two-class prompts pair classes uniformly "
                        "(the paper uses co-appearing pairs: make a file with `factory pairs`)")


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
    mend what an earlier run left (factory/integrity.py), join the cluster, size and place the
    pools, check the workers can write the output, then run the pipeline with a quiet console.
    A new folder whose run is refused before any work (bad cluster or output) is removed
    again."""
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
        if new and not isinstance(e, RunFailure) and not store.finished():
            store.discard()  # refused before any work: leave nothing behind
        raise


def _finish(o: RunOptions, plan: SamplePlan, store: ShardStore, labeller: Labeller, new: bool,
            start: float) -> RunResult:
    """The run, and on Ctrl-C or SIGTERM the one line of how far it got."""
    try:
        return _finish_shards(o, plan, store, labeller, new, start)
    except (Interrupted, SystemError) as e:
        if interruption(e) is None:
            raise
        raise Interrupted(f"interrupted after {len(store.finished())} of {store.num_shards} "
                          "shards; rerun the same command to finish") from None


def _finish_shards(o: RunOptions, plan: SamplePlan, store: ShardStore, labeller: Labeller,
                   new: bool, start: float) -> RunResult:
    from factory.console import ray_logs_to
    from factory.integrity import check_on_resume
    from factory.pools import connect_ray

    if not new:
        check_on_resume(store)
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


def _pipeline(o: RunOptions, plan: SamplePlan, store: ShardStore, todo: list[int],
              labeller: Labeller, console):
    """Size and place the pools (asking an autoscaler for their nodes), then run them."""
    from factory.pools import (
        ClusterView,
        autoscaler_demand,
        probe_output,
        size_pools,
        wait_for_placement,
    )
    from factory.units import work_units

    unit = max(o.batch_size, o.label_batch_size)
    spans = work_units(store.layout, todo, unit)
    units = int((spans[:, 1] - spans[:, 0]).sum())
    view = ClusterView.current(o.address)
    pools = size_pools(view, units,
                       generators=parse_pool_size(o.generators, "generators"),
                       labellers=parse_pool_size(o.labellers, "labellers"),
                       labeller_images_per_s=labeller.images_per_s,
                       gen_gpus=o.gen_gpus, label_gpus=o.label_gpus)
    check_drift(store, resolved_run(o, store, pools), o.allow_drift)
    with autoscaler_demand(pools, view.autoscaled):
        wait_for_placement(pools, o.placement_timeout
                           or PLACEMENT_TIMEOUT["cluster" if o.address else "local"])
        probe_output(store.root)
        return _run_pools(o, plan, store, todo, labeller, console, spans, unit, pools,
                          view.autoscaled)


def _run_pools(o: RunOptions, plan: SamplePlan, store: ShardStore, todo: list[int],
               labeller: Labeller, console, spans, unit: int, pools: dict, autoscaled: bool):
    """Run the pipeline through the shard writer, with the progress lines, the failure budget
    and what the pools got recorded in the manifest."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from factory.console import Progress, StageCounter
    from factory.pools import StageFailure, waiting_for
    from factory.writer import ShardWriter

    units = int((spans[:, 1] - spans[:, 0]).sum())
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
            notes = waiting_for(pools, ray.cluster_resources()) if autoscaled else []
            progress.show({**counts, "written": w.written + w.dropped + w.failed}, warming,
                          warm_up_s, notes)

    taken = 0  # skipped samples the counter has handed over so far

    def skipped() -> list[dict]:
        nonlocal taken
        new = ray.get(counter.skipped.remote(taken))
        taken += len(new)
        return new

    # samples skipped by earlier runs: those of the finished shards (a resume has dropped the
    # records of shards deleted to be made again)
    budget = FailureBudget(o.max_failed_samples, len(store.failed), store.log_path)
    skip_failed = budget.left > 0
    ds = build_dataset(o, plan, store, spans, unit, labeller, pools, counter,
                       skip_failed=skip_failed)
    try:  # without skipping, the stages report no skipped samples: no need to ask the counter
        w = ShardWriter(store, todo, labeller.keep, on_progress=show,
                        skipped=skipped if skip_failed else None,
                        on_skipped=budget.spend).run(ds)
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
    store.record("pools", pools_got(pools, ray.get(counter.ready_actors.remote())))
    ray.kill(counter)
    return w, pools, warm_up_s


def pools_got(pools: dict, actors: dict[str, list[dict]]) -> dict:
    """What each pool really got, as its actors reported it: for the manifest."""
    out = {}
    for kind, p in pools.items():
        got = actors.get(kind, [])
        out[kind] = {"actors": len(got), "gpus_each": p.gpus,
                     "devices": sorted({a["device"] for a in got}),
                     "precisions": sorted({a["precision"] for a in got if a["precision"]}),
                     "nodes": sorted({a["node"] for a in got})}
    return out
