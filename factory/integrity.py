"""Whether a folder's shards are what their records say, and mending what a crash or a failing
disk left behind: on every resume (`check_on_resume`) and in `factory verify` (`verify`).

A shard's record is its record file (`records/`, written right after the shard) and its entry in
manifest.json (compacted from the record files); where both exist they must agree. The cheap
checks read each shard's size and Parquet footer (a truncated or empty file has none); `verify`
also reads every file whole against its SHA-256. Files and records are read by a thread pool, so
that a resume on an object store costs a few round trips, not one per shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from factory.store import (
    DATA,
    LEFT_OUT,
    LEFT_OUT_KEY,
    RECORDS,
    ShardLayout,
    ShardStore,
    is_temporary,
    list_files,
    parallel_map,
)

log = logging.getLogger(__name__)

CHECKED = ("rows", "bytes", "sha256", *LEFT_OUT)  # what a record says of its shard's file


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def remove_partial(store: ShardStore) -> int:
    """Delete the temporary files a crashed run left in data/ and records/; returns how many."""
    layout = store.layout
    stale = [layout.path(folder, name) for folder in (DATA, RECORDS)
             for name in list_files(layout.fs, layout.path(folder)) if is_temporary(name)]
    for path in stale:
        layout.fs.delete_file(path)
    return len(stale)


def _footer(layout: ShardLayout, k: int) -> tuple[int, int] | str:
    """(bytes, rows) of shard k's file, from its size and Parquet footer, or what is wrong."""
    path = layout.shard_file(k)
    size = layout.fs.get_file_info(path).size
    try:
        with layout.fs.open_input_file(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        return f"unreadable, {size} bytes: {_first_line(e)}"
    return size, rows


def _sha256(layout: ShardLayout, k: int) -> str:
    with layout.fs.open_input_file(layout.shard_file(k)) as f:
        return hashlib.sha256(f.read()).hexdigest()


def manifest_entry(store: ShardStore, k: int) -> dict | None:
    """Shard k's record as the manifest holds it, with the samples it lacks."""
    record = store.records.get(k)
    if record is None:
        return None
    return {**record, **{key: store.manifest.get(key, {}).get(str(k), []) for key in LEFT_OUT}}


def record_from_file(layout: ShardLayout, k: int, known: dict | None = None) -> dict:
    """Shard k's record rebuilt from its file: rows, bytes and SHA-256, the samples it lacks
    from its Parquet metadata (files written before the metadata: every missing index as
    dropped); the facts no file holds (node, written_at, ...) are kept from `known`."""
    with layout.fs.open_input_file(layout.shard_file(k)) as f:
        data = f.read()
    table = pq.read_table(pa.BufferReader(data), columns=["index"])
    left_out = (table.schema.metadata or {}).get(LEFT_OUT_KEY)
    lost = json.loads(left_out) if left_out else {"dropped": sorted(
        set(layout.shard_rows(k)) - set(table.column("index").to_pylist())), "failed": []}
    return {**(known or {"node": None}), "rows": table.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **lost}


@dataclass
class Findings:
    """What the checks found, by shard."""

    damaged: dict[int, str] = field(default_factory=dict)  # the file is not what it should be
    disagree: dict[int, str] = field(default_factory=dict)  # record file and manifest differ
    unrecorded: list[int] = field(default_factory=list)  # a shard file without any record
    orphaned: list[int] = field(default_factory=list)  # a record without its shard file
    files: dict[int, dict] = field(default_factory=dict)  # the record files read


def inspect(store: ShardStore, checksums: bool = False) -> Findings:
    """Check every finished shard against its records, cheaply (size and footer rows), or also
    by `checksums`."""
    layout = store.layout
    done = store.finished()
    on_disk = layout.record_files()
    found = Findings(files={k: r for k, r in zip(on_disk, parallel_map(
        layout.read_record, on_disk), strict=True) if r is not None})
    footers = dict(zip(done, parallel_map(lambda k: _footer(layout, k), done), strict=True))
    for k in done:
        kept, listed = found.files.get(k), manifest_entry(store, k)
        if isinstance(footers[k], str):
            found.damaged[k] = footers[k]
            continue
        if kept is not None and listed is not None:
            differ = [key for key in CHECKED if kept.get(key, []) != listed.get(key, [])]
            if differ:
                found.disagree[k] = (f"its record file and the manifest differ in "
                                     f"{', '.join(differ)}")
                continue
        record = kept or listed
        size, rows = footers[k]
        if record is None:
            found.unrecorded.append(k)
        elif size != record["bytes"]:
            found.damaged[k] = f"{size} bytes, its record says {record['bytes']}"
        elif rows != record["rows"]:
            found.damaged[k] = f"{rows} rows, its record says {record['rows']}"
    if checksums:
        whole = [k for k in done if k not in found.damaged and k not in found.disagree
                 and k not in found.unrecorded]
        for k, digest in zip(whole, parallel_map(lambda k: _sha256(layout, k), whole),
                             strict=True):
            if digest != (found.files.get(k) or manifest_entry(store, k))["sha256"]:
                found.damaged[k] = "its SHA-256 differs from its record's"
    found.orphaned = sorted((set(found.files) | set(store.records)) - set(done))
    return found


def redo(store: ShardStore, shards) -> None:
    """Delete the files and records of `shards`, so that the run makes them again."""
    layout = store.layout
    shards = list(shards)
    if not shards:
        return
    for k in shards:
        if layout.fs.get_file_info(layout.shard_file(k)).type == pafs.FileType.File:
            layout.fs.delete_file(layout.shard_file(k))
    store.forget(shards)


def check_on_resume(store: ShardStore) -> Findings:
    """Mend a folder before a run finishes it: damaged shards are deleted to be made again,
    records of shards whose file is gone are dropped, and shards without a record (a crash
    between the shard and its record) or whose record file and manifest disagree are recorded
    again from their files; each is named in the log. The manifest is then compacted."""
    if remove_partial(store):
        log.info("removed temporary files of an interrupted run")
    found = inspect(store)
    for k, why in found.damaged.items():
        log.warning("shard %d is damaged (%s): making it again", k, why)
    for k in found.orphaned:
        log.info("shard %d has a record but no file: making it again", k)
    redo(store, [*found.damaged, *found.orphaned])
    for k, why in found.disagree.items():
        log.warning("shard %d: %s; recorded again from the shard", k, why)
    if found.unrecorded:
        log.info("recorded the shards an interrupted run finished: %s",
                 ", ".join(map(str, found.unrecorded)))
    mend = [*found.disagree, *found.unrecorded]
    records = parallel_map(lambda k: record_from_file(store.layout, k, found.files.get(k)), mend)
    for k, record in zip(mend, records, strict=True):
        store.layout.write_record(k, record)
    store.add_records(dict(zip(mend, records, strict=True)))
    if mend:
        store.compact()
    return found


def verify(store: ShardStore) -> dict[int, str]:
    """Every shard checked against its records in full: the cheap checks, then each file read
    whole against its SHA-256; shards without a record, records without a shard and records
    that disagree count as bad too. {shard: what is wrong}; nothing is changed."""
    found = inspect(store, checksums=True)
    bad = {**found.damaged, **found.disagree,
           **{k: "not recorded: no record file and no manifest entry" for k in found.unrecorded},
           **{k: "recorded, but its file is missing" for k in found.orphaned}}
    return dict(sorted(bad.items()))
