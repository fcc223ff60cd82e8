"""Model names, and checks that a model can be loaded here, made before any model library is
imported so that bad input is refused at once (and without loading torch in light tasks)."""

from __future__ import annotations

import hashlib
import os
import warnings

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.5, the paper's SD
TINY = "tiny"  # random-weight SD at 64x64 built from configs in code: tests and the offline demo
SD15_RANDOM = "sd15-random"  # random weights in SD 1.5's sizes: GPU benchmarks, no download
RANDOM_MODELS = (TINY, SD15_RANDOM)
PRECISIONS = ("float32", "float16", "bfloat16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")


class ModelNotFoundError(ValueError):
    """A model name that is neither "tiny", a local folder nor a cached or reachable hub id."""


class ModelStructureError(ValueError):
    """A UNet whose blocks are not SD 1.x's, so its features do not form the paper's pyramid."""


def check_unet_config(config: dict) -> None:
    """SD 1.x's block structure: four down blocks, a mid block, four up blocks (so features come
    at four resolutions)."""
    down, up = config.get("down_block_types") or (), config.get("up_block_types") or ()
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if len(down) != 4 or len(up) != 4 or mid is None:
        raise ModelStructureError(
            "expected SD 1.x's UNet (4 down blocks, a mid block, 4 up blocks), got "
            f"{len(down)} down blocks, mid block {mid}, {len(up)} up blocks")


def check_model_name(model: str) -> None:
    """Fail early, in one line, if `model` cannot be loaded here or is not SD 1.x-shaped (reads
    model_index.json and the UNet's config.json only)."""
    if model in RANDOM_MODELS:
        return
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hf_hub_download argument
            warnings.simplefilter("ignore")
            from diffusers import StableDiffusionPipeline, UNet2DConditionModel

            StableDiffusionPipeline.load_config(model, local_files_only=True)
            unet = UNet2DConditionModel.load_config(model, subfolder="unet", local_files_only=True)
    except (OSError, ValueError):
        unet = None
    if unet is not None:
        check_unet_config(unet)
        return
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"no diffusers model folder (with model_index.json) at {model!r}: "
                                 "pass --model tiny, a hub id (owner/name) or such a folder")
    from huggingface_hub import model_info

    try:  # one request: a hub id is fine if the hub has it (each worker downloads it then)
        model_info(model, timeout=10)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all mean "cannot load"
        raise ModelNotFoundError(model_not_found(model, e)) from None


def weights_id(model: str) -> str:
    """What identifies an SD's weights in a run's signature: a random-weight variant's name
    (built in code, seeded), a local folder's SHA-256 over its files, or a hub id with the
    revision in the local cache (else the hub's current one, which is what workers download)."""
    if model in RANDOM_MODELS:
        return f"{model} (random weights built in code)"
    if os.path.isdir(model):
        digest = hashlib.sha256()
        for root, dirs, files in sorted(os.walk(model)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, model).encode("utf-8") + b"\0")
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 23):
                        digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    from huggingface_hub import model_info, snapshot_download

    try:
        return f"{model}@{os.path.basename(snapshot_download(model, local_files_only=True))}"
    except Exception:  # noqa: BLE001 - not cached: ask the hub
        try:
            return f"{model}@{model_info(model, timeout=10).sha}"
        except Exception:  # noqa: BLE001 - offline as well
            return f"{model}@unresolved"


def model_not_found(model: str, e: Exception) -> str:
    return (f"model {model!r} is not in the local Hugging Face cache and the hub cannot serve it "
            f"({str(e).splitlines()[0][:120]}); with no network, download it elsewhere "
            "(`hf download MODEL --local-dir DIR`) and pass --model DIR")


TEST_DETECTOR = "test-bright-pixels"  # a test fixture (maskrcnn_labeller.BrightPixelsTestDetector)
DETECTORS = ("torchvision", "tiny", "detectron2", TEST_DETECTOR)
ORACLES = ("union", "top1")
# score an instance needs to enter a mask when none is given, per oracle
ORACLE_SCORE_THRESHOLDS = {"union": 0.5, "top1": 0.05}


def oracle_score_threshold(oracle: str, score_threshold: float | None = None) -> float:
    """`score_threshold`, or `oracle`'s own default when it is None."""
    if oracle not in ORACLES:
        raise ValueError(f"unknown oracle {oracle!r}: one of {', '.join(ORACLES)}")
    return ORACLE_SCORE_THRESHOLDS[oracle] if score_threshold is None else score_threshold


TORCHVISION_WEIGHTS = "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"  # torchvision's COCO_V1 file
DETECTRON2_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


class DetectorNotFoundError(ValueError):
    """Detector weights or library that this machine does not have."""


def torchvision_weights_path(weights: str | None) -> str:
    """The Mask R-CNN v2 state-dict file: `weights`, or torchvision's cached download."""
    if weights is None:
        import torch

        weights = os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_WEIGHTS)
        hint = (f"pass --detector-weights FILE ({TORCHVISION_WEIGHTS}, torchvision's COCO "
                "weights) or put that file in torchvision's cache")
    else:
        hint = "pass an existing file with --detector-weights"
    if not os.path.isfile(weights):
        raise DetectorNotFoundError(f"no Mask R-CNN weights at {weights!r}: {hint}")
    return weights


def check_detector(detector: str, weights: str | None) -> None:
    """Fail early, in one line, if `detector` cannot be built here."""
    if detector not in DETECTORS:
        raise DetectorNotFoundError(f"unknown detector {detector!r}: one of {', '.join(DETECTORS)}")
    if detector == "torchvision":
        torchvision_weights_path(weights)
    elif detector == "detectron2":
        try:
            import detectron2  # noqa: F401
        except ImportError:
            raise DetectorNotFoundError(
                "detector 'detectron2' needs detectron2, which has no wheel: build it from "
                "source (README, 'detectron2 backend') or use --detector torchvision") from None
        if weights is None or not os.path.isfile(weights):
            raise DetectorNotFoundError("detector 'detectron2' needs --detector-weights FILE "
                                        "(model_final_f10217.pkl of mask_rcnn_R_50_FPN_3x)")
