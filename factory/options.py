"""The options of `factory generate` and `factory label`, their checks, and what a run returns.
Checked before Ray starts: a bad value is one line, and nothing is written."""

from __future__ import annotations

from dataclasses import dataclass

from actors.names import DEFAULT_MODEL
from factory.pools import parse_pool_size
from factory.prompts import SamplePlan

# Classifier-free guidance by subset, as the official code generates (the paper gives no value):
# train.py makes the head's training images at --scale 5.0, test.py its test images at 7.5.
GUIDANCE = {"train": 5.0, "test": 7.5, "label": 7.5}


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
    guidance: float | None = None  # None: by subset, see GUIDANCE
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
    device: str | None = None  # None: cuda where a pool has GPUs, else cpu
    address: str | None = None
    placement_timeout: float | None = None  # None: 1800 s on a cluster, 10 s on a local Ray
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
        """The run's wall-clock rate: Ray's start and the actors' warm-up included."""
        return (self.written + self.dropped) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float | None:
        """The generator stage's rate once warm: its images over the span from its actors'
        first call to their last (None without calls to time)."""
        spans = (self.actor_spans or {}).get("generator")
        if not spans:
            return None
        span = max(e for _, _, e in spans.values()) - min(s for _, s, _ in spans.values())
        return (self.written + self.dropped) / span if span > 0 else None

    def summary(self) -> str:
        """The run's last console line."""
        if self.written == 0 and self.dropped == 0 and self.failed == 0:
            return f"nothing to do: all {self.shards_skipped} shards of {self.out} are done"
        dropped = f", {self.dropped} dropped below --min-quality" if self.dropped else ""
        if self.failed:
            dropped += f", {self.failed} skipped after failing (manifest.json's `failed`)"
        busy = "".join(f"; {stage} actors busy {share:.0%}"
                       for stage, share in (self.busy or {}).items() if share is not None)
        steady = self.steady_images_per_s
        steady = (f", {steady:.2f} images/s steady (the generators' first call to their last)"
                  if steady else "")
        return (f"wrote {self.written} samples ({self.shards_written} shards{dropped}) in "
                f"{self.seconds:.1f} s, {self.images_per_s:.2f} images/s wall-clock (Ray's "
                f"start and warm-up included){steady}, to {self.out}{busy}")


def guidance(o: RunOptions, subset: str) -> float:
    """The run's guidance scale: the option, or the subset's default."""
    return GUIDANCE[subset] if o.guidance is None else o.guidance


def check_cuda_here(device: str | None, address: str | None) -> None:
    """Refuse `--device cuda` on a local Ray (no --address) where torch sees no CUDA device."""
    if device == "cuda" and not address:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but this machine has no CUDA device torch can "
                             "use (or its driver is too old for the locked torch)")


def check_run(o: RunOptions, plan: SamplePlan, model: str) -> int:
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
    if o.device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {o.device!r}")
    check_cuda_here(o.device, o.address)
    if o.precision is not None:
        check_precision(o.precision)
    if o.fp8:
        check_fp8(local=not o.address)
    check_model_name(model)
    return n


def check_fp8(local: bool) -> None:
    """--fp8 needs torchao everywhere and, on a local run, a GPU with float8 matrix units."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--fp8 needs torchao: `uv sync --extra fp8`")
    if local:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise ValueError("--fp8 needs an Ada or Hopper GPU (compute capability 8.9 or "
                             "newer)")
