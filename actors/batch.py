"""Helpers shared by the stages for the batches Ray Data hands them (dicts of numpy arrays)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def check_columns(batch: dict[str, np.ndarray], names: Iterable[str]) -> None:
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"batch lacks column(s) {', '.join(missing)}; it has {', '.join(batch)}")


def as_lists(column: np.ndarray) -> list[list]:
    """A list-valued column (object array of arrays or lists, as Ray Data gives it) as lists."""
    return [list(v) for v in column]


def object_column(values: list) -> np.ndarray:
    """A 1-d object array of per-sample values (lists of varying length), which numpy would
    otherwise turn into a 2-d array when the lengths happen to agree."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def default_device() -> str:
    import torch  # here, so that spec tasks using this module need not load torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def with_lists(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` with its list-valued columns (object arrays of arrays, as Ray Data hands them in)
    turned into object arrays of lists, which convert back to Arrow lists instead of pickles."""
    return {k: object_column([x.tolist() for x in v])
            if v.dtype == object and len(v) and isinstance(v[0], np.ndarray) else v
            for k, v in batch.items()}
