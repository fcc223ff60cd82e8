"""Training batches for the grounding head from `factory generate` triplets.

The job reads the finished shards as a stream (`train.stream`): every epoch the shards in an
order shuffled with (seed, epoch), each shard's rows shuffled; item p is a pure function of
(shards, seed, p), so a resumed or restarted job continues where its checkpoint left off. Rows
are decoded on CPU workers (Ray Data): the stored latent, and one oracle mask per class padded
to `MAX_CLASSES`. Only the split's seen classes count; the rest are masked out of the loss like
padding. Features are not here: the trainer recomputes them on its GPU from x_t.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from actors.batch import object_column
from factory.schema import decode_latents, decode_masks
from factory.store import ShardStore

MAX_CLASSES = 2  # prompts name one or two classes
COLUMNS = ["prompt", "classes", "masks", "height", "width", "x_t", "x_t_shape", "x_t_dtype", "t"]


def check_training_data(root: str, allow_partial: bool = False) -> ShardStore:
    """A finished `factory generate --subset train` folder, or with `allow_partial` one with at
    least one finished shard (ValueError says what is wrong)."""
    store = ShardStore.open(root)
    run = store.manifest["run"]
    if run.get("kind") != "triplets":
        raise ValueError(f"{root!r} holds {run.get('kind')!r}, not generate's triplets")
    if run["subset"] != "train":
        raise ValueError(f"{root!r} is a {run['subset']!r} set: train on --subset train data")
    store.check_finished(allow_partial, "factory generate")
    return store


def shard_groups(store: ShardStore) -> tuple[list[str], list[range]]:
    """The finished shards' paths and row indices: the stream's groups."""
    done = store.finished()
    return [store.shard_path(k) for k in done], [range(store.records[k]["rows"]) for k in done]


def load_batch(batch: dict[str, np.ndarray], *, shards: list[str], seen: list[str]
               ) -> dict[str, np.ndarray]:
    """Stream rows (position, group = shard, member = row) -> their `training_batch`, with the
    position column; each shard is read once per batch."""
    tables: dict[int, dict] = {}
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for g, member in zip(batch["group"], batch["member"], strict=True):
        g = int(g)
        if g not in tables:
            tables[g] = pq.read_table(shards[g], columns=COLUMNS).to_pydict()
        for c in COLUMNS:
            rows[c].append(tables[g][c][int(member)])
    out = training_batch({c: object_column(v) for c, v in rows.items()}, seen=seen)
    return {"position": np.asarray(batch["position"], dtype=np.int64), **out}


def training_batch(batch: dict[str, np.ndarray], *, seen: list[str]) -> dict[str, np.ndarray]:
    """Triplet rows -> x_t (B, 4, h, w) float32, t (B,), prompt (B,), classes (B,) lists of K
    names ("" = padding), masks (B, K, H, W) uint8, valid (B, K) bool (a real, seen class)."""
    n = len(batch["prompt"])
    h, w = int(batch["height"][0]), int(batch["width"][0])
    classes = [[""] * MAX_CLASSES for _ in range(n)]
    masks = np.zeros((n, MAX_CLASSES, h, w), dtype=np.uint8)
    valid = np.zeros((n, MAX_CLASSES), dtype=bool)
    seen_set = set(seen)
    for i in range(n):
        names = list(batch["classes"][i])
        classes[i][:len(names)] = names
        masks[i, :len(names)] = decode_masks(list(batch["masks"][i]), h, w)
        valid[i, :len(names)] = [c in seen_set for c in names]
    return {"x_t": decode_latents(batch), "t": np.asarray(batch["t"], dtype=np.int64),
            "prompt": np.asarray(batch["prompt"], dtype=object), "classes": object_column(classes),
            "masks": masks, "valid": valid}
