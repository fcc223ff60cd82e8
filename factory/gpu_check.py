"""`python -m factory.gpu_check`: whether this node's NVIDIA driver runs the locked torch's CUDA.
cluster.yaml runs it on every GPU node once its environment is installed, so that a node whose
driver is missing or too old stops its setup with one line, instead of joining the cluster and
failing each actor that asks it for a GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys


def problem() -> str | None:
    """None if torch sees a CUDA device, else what is wrong, in one line."""
    import torch

    cuda = torch.version.cuda or "none"
    if shutil.which("nvidia-smi") is None:
        return (f"no NVIDIA driver on this node (no nvidia-smi); torch {torch.__version__} "
                f"needs one that supports CUDA {cuda}: use a GPU image with the driver")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed ({e}): the NVIDIA driver is not working"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {cuda}) sees no GPU with NVIDIA driver "
                f"{driver[0] if driver else 'unknown'}: the driver is too old for CUDA {cuda}; "
                "use a newer driver image")
    return None


def main() -> None:
    why = problem()
    if why:
        print(f"factory gpu check: {why}", file=sys.stderr)
        sys.exit(1)
    import torch

    print(f"factory gpu check: {torch.cuda.device_count()} GPU(s), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda})")


if __name__ == "__main__":
    main()
