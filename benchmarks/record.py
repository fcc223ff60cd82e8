"""Where the benchmarks write their figures, and how: benchmarks/results/NAME-CARD.json, merged
into what the file holds, each write atomic, so that a run cut short (a GPU call's time limit)
keeps every figure it had, and parts run in separate calls add up in one file.
factory/speeds.py reads the stage speeds back from these files.

    python benchmarks/record.py card [DEVICE]     # the card's short name: h100, h200, cpu
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU, else the device ('cpu')."""
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def card(device: str) -> str:
    """The card's short name, as in 'NVIDIA H200' -> h200; 'cpu' on the CPU."""
    return device_name(device).lower().removeprefix("nvidia ").split()[0]


def results_path(name: str, device: str, folder: str = RESULTS) -> str:
    """FOLDER/NAME-CARD.json, e.g. benchmarks/results/generate-h200.json."""
    return os.path.join(folder, f"{name}-{card(device)}.json")


def command() -> str:
    return "python " + " ".join(shlex.quote(x) for x in sys.argv)


def provenance(device: str) -> dict:
    """What every written section carries: the command, the device, torch, and when."""
    import torch

    return {"command": command(), "device": device_name(device), "torch": torch.__version__,
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def read_result(path: str) -> dict:
    """The JSON at `path`, or {} where there is none yet."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_result(result: dict, path: str) -> None:
    """`result` to `path` atomically (a new file, then a rename): a kill mid-write leaves the
    old file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def update_result(path: str, **fields) -> dict:
    """Set top-level `fields` in the JSON at `path`, keeping the rest (what other parts, or
    earlier runs, measured); returns the whole."""
    result = {**read_result(path), **fields}
    write_result(result, path)
    return result


def put_lever(path: str, entry: dict) -> dict:
    """Put `entry` ({"lever": NAME, ...}) in the file's `levers` list, in place of an entry of
    the same name (the list keeps its order; a new lever goes last)."""
    result = read_result(path)
    levers = list(result.get("levers", []))
    same = [i for i, e in enumerate(levers) if e.get("lever") == entry["lever"]]
    if same:
        levers[same[0]] = entry
    else:
        levers.append(entry)
    result["levers"] = levers
    write_result(result, path)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] != ["card"]:
        sys.exit(__doc__)
    print(card(sys.argv[2] if len(sys.argv) > 2 else "cuda"))
