"""The order in which both Ray Train jobs read their data: an endless stream of items, epoch
after epoch. Epoch e visits the groups (a shard's rows, or a block of image files) in an order
shuffled with (seed, e), and each group's members in a shuffled order, so that a batch reads few
files. Item p is a pure function of (groups, seed, p), and the items are dealt to the workers
by position (`worker_items`): a job resumed at position p, or a worker restarted by Ray Train
after a failure, trains on exactly the items an uninterrupted job would have trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def epoch_items(groups: Sequence[Sequence], seed: int, epoch: int) -> list[tuple[int, object]]:
    """Epoch `epoch`'s (group, member) pairs, shuffled by (seed, epoch); `groups[g]` lists group
    g's members."""
    rng = np.random.default_rng([seed, epoch])
    items = []
    for g in rng.permutation(len(groups)):
        members = groups[g]
        items += [(int(g), members[i]) for i in rng.permutation(len(members))]
    return items


def stream(groups: Sequence[Sequence], seed: int, start: int, count: int) -> list[dict]:
    """Items start .. start + count - 1 of the stream, as rows for Ray Data: position, group,
    member."""
    per_epoch = sum(map(len, groups))
    if per_epoch == 0:
        raise ValueError("no items to stream")
    out, epoch = [], start // per_epoch
    skip = start - epoch * per_epoch
    while len(out) < count:
        for g, member in epoch_items(groups, seed, epoch)[skip:][:count - len(out)]:
            out.append({"position": start + len(out), "group": g, "member": member})
        epoch, skip = epoch + 1, 0
    return out


def worker_items(items: list[dict], batch_size: int, world: int) -> list[list[dict]]:
    """A job's stream `items` dealt to `world` workers, step by step: worker r's batch of step s
    holds items (s * world + r) * batch_size ... + batch_size - 1. Each worker's list depends only
    on its rank, so a restarted worker that skips its first k batches stands exactly at step k."""
    per_step = batch_size * world
    return [[it for s in range(0, len(items) - per_step + 1, per_step)
             for it in items[s + r * batch_size:s + (r + 1) * batch_size]] for r in range(world)]
