"""Protocol I (paper sec. 5.1, Table 1): open-vocabulary grounding on a synthetic test set.

The test set is `factory generate --subset test`: every class of the split, seen and unseen,
with Mask R-CNN's oracle masks. The grounding head (via `GroundingLabeller`, from the stored
x_t) and/or the DAAM baseline (regenerating each image from its seed while recording
cross-attention) predict a mask per prompt class; `ProtocolTable` scores them against the
oracle by the paper's mIoU, in columns One/Seen, One/Unseen, Two/Seen, Two/Seen+Unseen,
Two/Unseen. The paper checked its test images by hand; here samples whose oracle masks are not
all at least `min_area` of the image are left out, and the report says how many were kept.

Both methods' masks follow one rule (`mask_rule`, named in the report): by default
"independent", as the paper's inference (`test.py`) thresholds each class's sigmoid on its own:
the head's mask of a class is its probability > `threshold` (test.py's `> 0.5`), DAAM's its
heat >= `daam_threshold`, and a prompt's two masks may overlap; or "exclusive": each pixel goes
to the prompt's class of highest probability (heat) if that is above the method's threshold
(the same comparison), else to none.

    python -m eval.protocol1 --data TESTDIR --checkpoint CKPT --baseline daam --out report.json
    factory eval grounding ...                                              (the same command)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import click
import numpy as np

from factory.console import ray_logs_to
from factory.errors import FactoryError
from factory.pools import IMAGES_PER_S, STAGE_CPUS, parse_pool_size

log = logging.getLogger(__name__)

HEAD, DAAM = "grounding head", "DAAM"
BASELINES = {"daam": DAAM}
COLUMNS = ["index", "prompt", "classes", "class_ids", "masks", "height", "width", "x_t",
           "x_t_shape", "x_t_dtype", "t", "noise_seed", "image"]


def kept_samples(areas: list[list[int]], height: int, width: int, min_area: float) -> np.ndarray:
    """Which samples enter the test: every oracle mask covers at least `min_area` of the image
    and is not empty; `min_area` 0 keeps every sample, empty masks included."""
    if min_area <= 0:
        return np.ones(len(areas), dtype=bool)
    need = max(1.0, min_area * height * width)
    return np.array([all(a >= need for a in row) for row in areas], dtype=bool)


def eval_rows(batch: dict[str, np.ndarray], *, stored: bool) -> dict[str, np.ndarray]:
    """Kept test triplets -> the stages' inputs: x_t decoded, the oracle masks renamed `oracle`;
    with `stored`, the stored image decoded for DAAM's regeneration check."""
    from actors.batch import with_lists
    from factory.schema import decode_latents, decode_png

    batch = with_lists(batch)
    out = {k: v for k, v in batch.items()
           if k not in ("masks", "image", "x_t", "x_t_shape", "x_t_dtype")}
    out["oracle"] = batch["masks"]
    out["x_t"] = decode_latents(batch)                                      # (B, 4, h, w)
    if stored:
        out["stored"] = np.stack([decode_png(p) for p in batch["image"]])    # (B, H, W, 3)
    return out


def renamed(batch: dict[str, np.ndarray], *, masks_to: str) -> dict[str, np.ndarray]:
    """A stage's predicted `masks` kept as `masks_to`, out of the next stage's way; DAAM's
    regenerated `image` compared with the stored one (max |difference| in uint8 levels)."""
    drop = ("masks", "label") + (("image", "stored") if "image" in batch else ())
    out = {k: v for k, v in batch.items() if k not in drop}
    out[masks_to] = batch["masks"]
    if "image" in batch:
        diff = np.abs(batch["image"].astype(np.int16) - batch["stored"].astype(np.int16))
        out["regenerated_diff"] = diff.reshape(len(diff), -1).max(1)          # (B,)
    return out


def check_inputs(data: str, checkpoint: str | None, baseline: str | None, mask_rule: str):
    """The test store and the checkpoint's info, or FactoryError."""
    from actors.grounding_labeller import check_mask_rule
    from factory.store import ShardStore
    from train.grounding.checkpoint import TRAINED_FOR, load_grounding_head

    if checkpoint is None and baseline is None:
        raise FactoryError("nothing to evaluate: give --checkpoint, --baseline or both")
    if baseline is not None and baseline not in BASELINES:
        raise FactoryError(f"unknown baseline {baseline!r}: one of {', '.join(BASELINES)}")
    try:
        check_mask_rule(mask_rule)
        store = ShardStore.open(data)
        run = store.manifest["run"]
        if run.get("kind") != "triplets" or run.get("subset") != "test":
            raise ValueError(f"{data!r} is not a test set: make one with `factory generate "
                             "--subset test`")
        if not store.finished():
            raise ValueError(f"{data!r} holds no finished shard")
        info = None
        if checkpoint is not None:
            _, info = load_grounding_head(checkpoint)
            for key in TRAINED_FOR:
                if str(info[key]) != str(run[key]):
                    raise ValueError(f"the checkpoint was trained for {key} {info[key]!r}; "
                                     f"the test set is {key} {run[key]!r}")
    except (ValueError, OSError) as e:
        raise FactoryError(str(e)) from None
    return store, info


def evaluate(data: str, checkpoint: str | None = None, baseline: str | None = None, *,
             min_area: float = 0.01, threshold: float = 0.5, daam_threshold: float = 0.4,
             mask_rule: str = "independent", batch_size: int = 8,
             head_actors: str | int = "auto", daam_actors: str | int = "auto",
             head_gpus: float | None = None, daam_gpus: float | None = None,
             device: str | None = None, address: str | None = None,
             placement_timeout: float | None = None, ray_log: str | None = None) -> dict:
    """Run the methods over the test set; returns the report (table, counts, settings). Ray's
    own output goes to the file `ray_log` (default: a new temporary file, named in the log)."""
    from actors.grounding_labeller import MASK_RULES
    from eval.table import PAPER_TABLE1_AVERAGES, ProtocolTable
    from factory.options import check_cuda_here
    from factory.schema import decode_masks

    store, info = check_inputs(data, checkpoint, baseline, mask_rule)
    run = store.manifest["run"]
    if batch_size <= 0:
        raise FactoryError(f"batch size must be > 0, got {batch_size}")
    if not 0 <= min_area < 1:
        raise FactoryError(f"min area must lie in [0, 1), got {min_area}")
    # the actors check these too, but only once Ray has started
    if not 0 < threshold < 1:
        raise FactoryError(f"threshold must lie in (0, 1), got {threshold}")
    if not 0 <= daam_threshold <= 1:
        raise FactoryError(f"DAAM threshold must lie in [0, 1], got {daam_threshold}")
    try:
        pool_sizes = {"labeller": parse_pool_size(head_actors, "head actors"),
                      "generator": parse_pool_size(daam_actors, "DAAM actors")}
        check_cuda_here(device, address)
    except ValueError as e:
        raise FactoryError(str(e)) from None
    meta = store.read(columns=["index", "areas", "height", "width"])
    if meta.num_rows == 0:
        raise FactoryError(f"{data!r} is empty")
    h, w = meta.column("height")[0].as_py(), meta.column("width")[0].as_py()
    keep = kept_samples(meta.column("areas").to_pylist(), h, w, min_area)
    kept = frozenset(np.asarray(meta.column("index"))[keep].tolist())
    if not kept:
        raise FactoryError(f"no sample of {data!r} has every oracle mask >= {min_area:g} of the "
                           "image: lower --min-area (0 keeps all)")
    log.info("%d of %d test samples kept (%s)", len(kept), meta.num_rows,
             f"every oracle mask >= {min_area:g} of the image" if min_area > 0 else
             "--min-area 0: all, empty masks included")
    methods = ([HEAD] if info is not None else []) + ([BASELINES[baseline]] if baseline else [])
    table = ProtocolTable(methods, store.manifest["seen"], store.manifest["unseen"])
    start = time.perf_counter()
    if ray_log is None:
        ray_log = tempfile.mkstemp(prefix="protocol1-", suffix=".log")[1]
    log.info("Ray's log: %s", ray_log)
    diffs: list[int] = []
    with ray_logs_to(ray_log):
        ds = _dataset(store, info, baseline, kept, threshold, daam_threshold, mask_rule,
                      batch_size, pool_sizes, {"labeller": head_gpus, "generator": daam_gpus},
                      device, address, placement_timeout)
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in block.to_pylist():
                gt = decode_masks(row["oracle"], row["height"], row["width"])
                for method, column in ((HEAD, "head_masks"), (DAAM, "daam_masks")):
                    if method in methods:
                        pred = decode_masks(row[column], row["height"], row["width"])
                        table.update(method, row["classes"], pred, gt)
                if "regenerated_diff" in row:
                    diffs.append(row["regenerated_diff"])
    report = {
        "data": os.path.abspath(data), "split": run["split"], "fold": run["fold"],
        "model": run["model"], "checkpoint": info["folder"] if info else None,
        "checkpoint_step": info.get("step") if info else None,
        "samples": meta.num_rows, "kept": len(kept), "min_area": min_area,
        "threshold": threshold, "daam_threshold": daam_threshold if baseline else None,
        "mask_rule": mask_rule, "seconds": time.perf_counter() - start,
        **json.loads(table.to_json()),
        "paper_reference": PAPER_TABLE1_AVERAGES.get(run["split"]),
        "markdown": table.to_markdown(PAPER_TABLE1_AVERAGES.get(run["split"]))
        + f"\nMask rule: {mask_rule}, {MASK_RULES[mask_rule]}.\n",
    }
    if diffs:  # DAAM regenerates each image: it must be the stored sample
        report["daam_regenerated"] = {"equal": int(sum(d == 0 for d in diffs)),
                                      "max_uint8_diff": int(max(diffs)), "of": len(diffs)}
    return report


def _dataset(store, info, baseline, kept, threshold, daam_threshold, mask_rule, batch_size,
             sizes, gpus, device, address, placement_timeout):
    """Test rows in blocks of `batch_size` -> the head's pool (on `label` slots) and/or DAAM's
    (on `gen` slots, as it regenerates images), sized like `factory generate`'s pools."""
    import ray
    from ray.data.expressions import col

    from factory.pools import (
        PLACEMENT_TIMEOUT,
        ClusterView,
        connect_ray,
        size_pools,
        wait_for_placement,
    )

    connect_ray(address)
    run = store.manifest["run"]
    kinds = (("labeller",) if info is not None else ()) + (("generator",) if baseline else ())
    units = -(-len(kept) // batch_size)
    pools = size_pools(ClusterView.current(address), units, generators=sizes["generator"],
                       labellers=sizes["labeller"],
                       labeller_images_per_s=IMAGES_PER_S["grounding head"],
                       gen_gpus=gpus["generator"], label_gpus=gpus["labeller"], kinds=kinds)
    wait_for_placement(pools, placement_timeout
                       or PLACEMENT_TIMEOUT["cluster" if address else "local"])
    # the kept rows first, in blocks of the stages' batch size: a file may keep none of its
    # rows, and an empty block is nothing to decode
    ds = (ray.data.read_parquet(store.data_dir).select_columns(COLUMNS)
          .filter(expr=col("index").is_in(sorted(kept)))
          .repartition(target_num_rows_per_block=batch_size)
          .map_batches(eval_rows, fn_kwargs={"stored": baseline is not None}, batch_size=None,
                       num_cpus=STAGE_CPUS))
    if info is not None:
        from actors.grounding_labeller import GroundingLabeller

        ds = (ds.map_batches(GroundingLabeller,
                             fn_constructor_kwargs=dict(
                                 checkpoint=info["folder"], threshold=threshold,
                                 mask_rule=mask_rule, device=pools["labeller"].device(device)),
                             batch_size=batch_size, **pools["labeller"].ray_args())
              .map_batches(renamed, fn_kwargs={"masks_to": "head_masks"}, num_cpus=STAGE_CPUS))
    if baseline is not None:
        from eval.daam import DAAMLabeller

        precision = None if run["precision"] == "auto" else run["precision"]
        ds = (ds.map_batches(DAAMLabeller,
                             fn_constructor_kwargs=dict(model=run["model"], steps=run["steps"],
                                                        guidance=run["guidance"],
                                                        threshold=daam_threshold,
                                                        mask_rule=mask_rule,
                                                        precision=precision,
                                                        device=pools["generator"].device(device)),
                             batch_size=batch_size, **pools["generator"].ray_args())
              .map_batches(renamed, fn_kwargs={"masks_to": "daam_masks"}, num_cpus=STAGE_CPUS))
    return ds.select_columns(["classes", "oracle", "height", "width"]
                             + (["head_masks"] if info is not None else [])
                             + (["daam_masks", "regenerated_diff"] if baseline else []))


def write_report(report: dict, out: str) -> tuple[str, str]:
    """The report as JSON at `out` and Markdown beside it (same name, .md)."""
    md = os.path.splitext(out)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    body = {k: v for k, v in report.items() if k != "markdown"}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, allow_nan=False, default=lambda v: None)
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# Protocol I: {report['split']} fold {report['fold']}, {report['kept']} of "
                f"{report['samples']} test samples\n\n{report['markdown']}\n\nRows marked "
                "(paper) are the paper's Table 1 averages, not measured here.\n")
    return out, md


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", required=True, help="`factory generate --subset test` output folder.")
@click.option("--checkpoint", default=None,
              help="Grounding-head checkpoint (or training --out) of the data's split and fold.")
@click.option("--baseline", default=None, help="Baseline to run beside the head: daam.")
@click.option("--out", default=None, help="Report JSON (and .md beside it) [default: print].")
@click.option("--min-area", type=float, default=0.01,
              help="Keep samples whose oracle masks all cover this share of the image (0: all).")
@click.option("--threshold", type=float, default=0.5,
              help="Grounding-head mask: probability > this (the official test.py's rule).")
@click.option("--daam-threshold", type=float, default=0.4,
              help="DAAM: threshold on the normalised heat map.")
@click.option("--mask-rule", default="independent",
              help="independent: each class's mask on its own, probability > the threshold "
                   "(DAAM: heat >= its threshold), so masks may overlap (the paper's test.py); "
                   "exclusive: each pixel to the prompt's class of highest probability (heat) "
                   "if it passes the threshold. Both methods follow it.")
@click.option("--batch-size", type=int, default=8)
@click.option("--head-actors", default="auto",
              help="Grounding-head actors (on `label` slots): a number, or auto (sized like "
                   "`factory label`'s labellers).")
@click.option("--daam-actors", default="auto",
              help="DAAM actors (on `gen` slots: it regenerates each image): a number, or auto "
                   "(one per gen slot, growing as gen nodes join).")
@click.option("--head-gpus", type=float, default=None, help="GPUs per head actor.")
@click.option("--daam-gpus", type=float, default=None, help="GPUs per DAAM actor.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the actors compute; cpu even where Ray gave them GPUs (tests, "
                   "GPU-less clusters) [default: cuda for a pool with GPUs, else cpu].")
@click.option("--address", default=None, help="Ray cluster [default: start a local Ray].")
@click.option("--placement-timeout", type=float, default=None,
              help="Seconds the pools may wait for nodes [default: 1800 on a cluster, 10 "
                   "locally].")
def cli(out: str | None, **kwargs) -> None:
    """Protocol I: the grounding head and/or DAAM against the oracle masks of a test set."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = evaluate(**kwargs, ray_log=os.path.splitext(out)[0] + ".log" if out else None)
    click.echo(f"Protocol I, {report['split']} fold {report['fold']}: {report['kept']} of "
               f"{report['samples']} test samples, mIoU (%)")
    click.echo(report["markdown"])
    if report.get("daam_regenerated"):
        r = report["daam_regenerated"]
        click.echo(f"DAAM regenerated {r['equal']} of {r['of']} images exactly (max difference "
                   f"{r['max_uint8_diff']} uint8 levels)")
    if out:
        click.echo("report: " + ", ".join(write_report(report, out)))


def main(argv: list[str] | None = None) -> None:
    from factory.command import run_command

    run_command(cli, argv, prog_name="python -m eval.protocol1")


if __name__ == "__main__":
    main()
