"""`manifest.json`: what defines a run, and the record of every finished shard, compacted from
the record files that the write tasks leave beside the shards (`records/`, see
factory/store.py).

A write task writes its shard, then the shard's record; the driver enters the record in memory
and compacts the manifest now and then: at most every COMPACT_EVERY_S seconds, and only once the
new records are at least 1/COMPACT_GROWTH of those already compacted, so that the manifest bytes
written per shard stay constant however long the run (a fixed interval would rewrite a growing
file a growing number of times). A crash between compactions loses no record: readers merge the
record files the manifest lacks (`load_records`), and a resume checks both
(factory/integrity.py).
"""

from __future__ import annotations

import json
import time

from factory.store import LEFT_OUT, MANIFEST, ShardLayout, parallel_map, put_atomic

COMPACT_EVERY_S = 30.0
COMPACT_GROWTH = 2  # so the bytes written come to at most ~3x the final manifest


class Manifest:
    """The manifest's JSON data (`data`), the records entered since it was last written, and
    when to write it again."""

    def __init__(self, layout: ShardLayout, data: dict) -> None:
        self.layout, self.data = layout, data
        self.pending = 0  # records entered since the last compaction
        self.compacted = len(data.get("shards", {}))  # records in manifest.json
        self.last = time.monotonic()
        self.bytes_written = 0  # by this process, for benchmarks/scale.py

    @property
    def records(self) -> dict[int, dict]:
        """{shard: record} without the lists of samples left out (under `dropped`, `failed`)."""
        return {int(k): v for k, v in self.data.get("shards", {}).items()}

    def add(self, records: dict[int, dict]) -> None:
        """Enter shard records: each under `shards`, and the samples it lacks under `dropped`
        and `failed` (by shard, with `dropped_count` and `failed_count`)."""
        shards = self.data.setdefault("shards", {})
        for k, record in records.items():
            record = dict(record)
            self._set_left_out(k, {key: record.pop(key, []) for key in LEFT_OUT})
            shards[str(k)] = record
        self.pending += len(records)

    def remove(self, shards) -> None:
        """Forget the records of `shards`, and write the manifest."""
        for k in shards:
            self.data.get("shards", {}).pop(str(k), None)
            self._set_left_out(k, {})
        self.compact()

    def _set_left_out(self, k: int, lost: dict[str, list]) -> None:
        for key in LEFT_OUT:
            per_shard = self.data.setdefault(key, {})
            per_shard.pop(str(k), None)
            if lost.get(key):
                per_shard[str(k)] = list(lost[key])

    def due(self) -> bool:
        return (self.pending > 0 and time.monotonic() - self.last >= COMPACT_EVERY_S
                and self.pending * COMPACT_GROWTH >= self.compacted)

    def compact(self, force: bool = True) -> bool:
        """Write manifest.json atomically, if `force` or due. Returns whether it was written."""
        if not force and not self.due():
            return False
        for key in LEFT_OUT:  # counted from the lists, so that no edit can leave them apart
            self.data[f"{key}_count"] = sum(map(len, self.data.get(key, {}).values()))
        data = json.dumps(self.data, indent=2).encode("utf-8")
        put_atomic(self.layout.fs, self.layout.path(MANIFEST), data)
        self.bytes_written += len(data)
        self.compacted, self.pending = len(self.data.get("shards", {})), 0
        self.last = time.monotonic()
        return True

    def load_records(self) -> int:
        """Enter the record files of shards the manifest lacks (written since its last
        compaction); returns how many."""
        known = self.data.get("shards", {})
        missing = [k for k in self.layout.record_files() if str(k) not in known]
        found = {k: r for k, r in zip(missing, parallel_map(self.layout.read_record, missing),
                                      strict=True) if r is not None}
        self.add(found)
        return len(found)
