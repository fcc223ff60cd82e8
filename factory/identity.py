"""A run's identity: the arguments that define its samples (the manifest's `run` block, which a
resume must match), what else a new folder records, and the drift check, which refuses a resume
whose precision, weights or libraries resolve differently from the folder's first run."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict

from actors.names import TINY
from factory.errors import FactoryError
from factory.options import GenerateOptions, LabelOptions, RunOptions, check_run, guidance
from factory.prompts import SamplePlan
from factory.store import ShardStore

log = logging.getLogger(__name__)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _sd_run(o: RunOptions, subset: str) -> dict:
    """The SD arguments that define a run's images."""
    return {"steps": o.steps, "guidance": guidance(o, subset),
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
        n = check_run(o, plan, o.model)
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
            "score_threshold": score_threshold, **_sd_run(o, o.subset),
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
        n = check_run(o, plan, info["model"])
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
            "min_quality": o.min_quality, **_sd_run(o, "label"),
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


DRIFT_PACKAGES = ("torch", "diffusers", "transformers")


def resolved_run(o: RunOptions, store: ShardStore, pools: dict) -> dict:
    """What the samples depend on beyond the arguments, as this run resolves it: where the
    generators compute (`--device`, else CUDA where their pool has GPUs: on a cold cluster,
    the GPUs of the node types that will be launched) and in which precision (`auto`:
    bfloat16 on CUDA, float32 on the CPU), the SD weights (`actors.names.weights_id`) and the
    versions of the model libraries. Each actor then computes where this says, or stops."""
    from actors.names import weights_id
    from factory.store import package_versions

    versions = package_versions()
    device = pools["generator"].device(o.device)
    return {"device": device,
            "precision": o.precision or ("bfloat16" if device == "cuda" else "float32"),
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
    differ = [k for k in now if k in before and before[k] != now[k]]
    if not differ:
        if set(now) - set(before):  # a folder made before the value was recorded
            store.record("resolved", {**now, **before})
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
