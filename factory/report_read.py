"""Reading an output folder for `factory report`, one shard at a time: a shard's light columns,
the heavy rows of the picked samples READ_BATCH rows at a time, and the picks themselves (the
K samples of each class whose fixed pseudo-random keys are lowest)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.store import ShardStore

READ_BATCH = 64  # rows decoded at a time when drawing


class ReportError(ValueError):
    """A report that cannot be written as asked (no such folder, an unreadable shard)."""


def pick_keys(indices: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random 64-bit key per sample index (splitmix64's mixer). The picks are the
    samples of lowest key: spread over the whole folder, the same whatever the shard size or
    reading order."""
    z = indices.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # wraps around, as meant
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Picker:
    """Of each class, the `per_class` samples naming it whose `pick_keys` are lowest, fed one
    shard at a time: per_class entries a class in memory."""

    def __init__(self, per_class: int) -> None:
        self.per_class = per_class
        self._heaps: dict[str, list[tuple[int, int]]] = {}  # class -> max-heap of (-key, index)

    def add(self, indices: list[int], classes: list[list[str]]) -> None:
        keys = pick_keys(np.asarray(indices, dtype=np.int64)).tolist()
        for key, index, names in zip(keys, indices, classes, strict=True):
            for name in names:
                heap = self._heaps.setdefault(name, [])
                if len(heap) < self.per_class:
                    heapq.heappush(heap, (-key, index))
                elif key < -heap[0][0]:
                    heapq.heapreplace(heap, (-key, index))

    def indices(self) -> list[int]:
        """Every picked sample once (a sample of two classes may be picked for both)."""
        return sorted({i for heap in self._heaps.values() for _, i in heap})


def read_shard(store: ShardStore, k: int, columns: list[str]) -> pa.Table:
    """The `columns` of shard k, whole."""
    layout = store.layout
    try:
        return pq.read_table(layout.shard_file(k), columns=columns, filesystem=layout.fs)
    except (OSError, pa.ArrowException) as e:
        raise ReportError(_unreadable(store, k, e)) from None


def heavy_rows(store: ShardStore, k: int, wanted: set[int]) -> Iterator[dict]:
    """The rows of shard k whose index is in `wanted`, with what drawing them needs, read
    READ_BATCH rows at a time."""
    columns = ["index", "prompt", "classes", "image", "height", "width", "masks", "scores",
               "areas"] + (["label", "quality"] if store.kind == "segmentation" else [])
    layout = store.layout
    values = pa.array(sorted(wanted), type=pa.int64())
    try:
        with layout.fs.open_input_file(layout.shard_file(k)) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH, columns=columns):
                yield from batch.filter(pc.is_in(batch.column("index"), value_set=values)
                                        ).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ReportError(_unreadable(store, k, e)) from None


def _unreadable(store: ShardStore, k: int, e: Exception) -> str:
    return (f"cannot read shard {store.layout.shard_name(k)} of {store.root!r} "
            f"({str(e).splitlines()[0]}): `factory verify` checks every shard, and a rerun of "
            "the command that made the folder makes a bad one again")
