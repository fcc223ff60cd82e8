"""An output folder: fixed-size Parquet shards in `data/`, each written atomically with its record
beside it in `records/`, and `manifest.json`, which defines the run and holds every record,
compacted (factory/manifest.py). `data/` holds nothing but shards, so pandas, Ray Data, DuckDB
or HF datasets read it as is.

The folder is a local path, a shared mount or a URI that pyarrow's filesystem layer opens
(`s3://`, `gs://`, `file://`): every node of a Ray cluster writes its shards there itself.

Shard k holds samples [k * shard_size, (k + 1) * shard_size) sorted by index. On a filesystem it
is written to a hidden temporary file and renamed into place; on an object store it is one PUT
at its final key, which appears only when complete. Either way a shard file exists only when
whole; a rerun with the same run arguments writes only the missing shards, and the result is the
same files as an uninterrupted run. The manifest's `run` block is what defines the data: a rerun
whose `run` differs is refused rather than mixed in. A shard's record (rows, bytes, SHA-256, the
samples it lacks and why, the Ray nodes that made and wrote it) is what the shard is checked
against (factory/integrity.py); on a local disk each file is fsynced before its rename.
`factory.lock` lets one run at a time write the folder.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from factory.errors import StoreError
from factory.lock import LOCK_FILE, FolderLock
from factory.schema import SCHEMA_VERSION, SCHEMAS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATA = "data"  # shards live here, apart from the manifest
RECORDS = "records"  # one small JSON record per shard, written right after the shard
PACKAGES = ("torch", "diffusers", "transformers", "torchvision", "ray", "pyarrow", "pycocotools")
LOG_FILE = "factory.log"  # Ray's own output during a run (factory/console.py)
TEMP_PREFIX = ".shard-"  # hidden temporary files: `.shard-...parquet.tmp-XXXXXXXX`
LEFT_OUT = ("dropped", "failed")  # what a shard record lists of the samples it lacks
LEFT_OUT_KEY = b"factory.left_out"  # the same lists in a shard file's Parquet metadata
IO_THREADS = 16  # parallel reads of small files (footers, records): an object store's latency


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def open_location(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of an output location: a URI pyarrow opens (s3://, gs://,
    file://) or a local path (made absolute: workers on other nodes have other working dirs)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


def location_root(root: str) -> str:
    """`root` as every process should name it: URIs as given, local paths absolute."""
    return root.rstrip("/") if "://" in root else os.path.abspath(root)


def is_object_store(fs: pafs.FileSystem) -> bool:
    """Object stores have no rename, but a PUT appears whole at its key or not at all."""
    return fs.type_name in ("s3", "gcs")


def put_atomic(fs: pafs.FileSystem, path: str, data) -> None:
    """Write `data` (bytes or a pyarrow Buffer) so that `path` never exists half-written: a
    hidden temporary file renamed into place, or one PUT on an object store. On a local disk
    the file is fsynced before the rename and its folder after it, so that a power loss leaves
    the old state or the whole new file, never a truncated one."""
    if is_object_store(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder, name = posixpath.split(path)
    tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            _write_synced(tmp, path, data)
        else:  # a filesystem pyarrow opens but Python cannot fsync (hdfs, ...)
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def _write_synced(tmp: str, path: str, data) -> None:
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parallel_map(fn, items) -> list:
    """`fn` over `items` in threads: many small reads, each mostly waiting on storage."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def list_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The names of the files in `folder` (none if it is missing)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.File]


def is_temporary(name: str) -> bool:
    """A hidden temporary file of `put_atomic`, left by a run that died while writing."""
    return name.startswith(".") and ".tmp-" in name


@dataclass(frozen=True)
class ShardLayout:
    """Where a run's shards and records go and which samples each holds: all a worker needs to
    write one."""

    root: str  # location_root form
    n: int
    shard_size: int
    kind: str  # "triplets" | "segmentation"

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))

    def shard_of(self, index: int) -> int | None:
        """The shard of sample `index`, or None past n."""
        return index // self.shard_size if 0 <= index < self.n else None

    @property
    def schema(self) -> pa.Schema:
        return SCHEMAS[self.kind]

    def shard_name(self, k: int) -> str:
        return f"shard-{k:05d}-of-{self.num_shards:05d}.parquet"

    def record_name(self, k: int) -> str:
        return f"shard-{k:05d}-of-{self.num_shards:05d}.json"

    def shard_of_name(self, name: str) -> int | None:
        """The shard a file of `data/` or `records/` belongs to (None: not one of this run's)."""
        stem, _, ext = name.partition(".")
        parts = stem.split("-")
        if (ext not in ("parquet", "json") or len(parts) != 4 or parts[0] != "shard"
                or not parts[1].isdigit() or parts[3] != f"{self.num_shards:05d}"):
            return None
        k = int(parts[1])
        return k if k < self.num_shards else None

    @functools.cached_property
    def _location(self) -> tuple[pafs.FileSystem, str]:
        return open_location(self.root)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._location[0]

    def path(self, *parts: str) -> str:
        """A path inside the output location, as `fs` names it."""
        return posixpath.join(self._location[1], *parts)

    def uri(self, path: str) -> str:
        """A `path` of `fs` as users and readers without `fs` name it (a URI on an object
        store, an absolute path on a disk)."""
        return self.root + path[len(self._location[1]):]

    def shard_file(self, k: int) -> str:
        return self.path(DATA, self.shard_name(k))

    def record_file(self, k: int) -> str:
        return self.path(RECORDS, self.record_name(k))

    def write(self, k: int, table: pa.Table, dropped: list[int] = (),
              failed: list[dict] = (), **info) -> dict:
        """Write shard k atomically, then its record file; its rows, the `dropped` indices and
        the `failed` samples ({"index", "stage", "error"}) must be exactly the shard's sample
        indices. Returns the record: rows, bytes, sha256, dropped, failed and `info` (node,
        written_at, the nodes that made its rows)."""
        table = table.sort_by("index")
        failed = sorted(failed, key=lambda f: f["index"])
        have = [*table.column("index").to_pylist(), *dropped, *(f["index"] for f in failed)]
        if sorted(have) != list(self.shard_rows(k)):
            raise StoreError(f"shard {k} must hold samples {self.shard_rows(k)}, got "
                             f"{table.num_rows} rows, {len(dropped)} dropped and {len(failed)} "
                             "failed")
        left_out = {"dropped": sorted(dropped), "failed": failed}
        if dropped or failed:  # kept in the file too, for a record lost with its writer
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   LEFT_OUT_KEY: json.dumps(left_out)})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue()
        put_atomic(self.fs, self.shard_file(k), data)
        record = {"rows": table.num_rows, "bytes": data.size,
                  "sha256": hashlib.sha256(data).hexdigest(), **left_out, **info}
        self.write_record(k, record)
        return record

    def write_record(self, k: int, record: dict) -> None:
        put_atomic(self.fs, self.record_file(k), json.dumps(record).encode("utf-8"))

    def read_record(self, k: int) -> dict | None:
        """Shard k's record file, or None if it is missing or unreadable (a resume rebuilds it
        from the shard)."""
        try:
            with self.fs.open_input_stream(self.record_file(k)) as f:
                return json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            return None

    def record_files(self) -> list[int]:
        """The shards that have a record file."""
        names = (self.shard_of_name(n) for n in list_files(self.fs, self.path(RECORDS)))
        return sorted(k for k in names if k is not None)


class ShardStore:
    """An output folder: its layout, its manifest and records, and the shards finished."""

    def __init__(self, layout: ShardLayout, manifest) -> None:
        self.layout = layout  # one per store, so that a URI's filesystem client is opened once
        self.root = layout.root
        self._manifest = manifest  # factory.manifest.Manifest

    @property
    def manifest(self) -> dict:
        """The manifest as JSON data, with the records written since its last compaction."""
        return self._manifest.data

    @property
    def n(self) -> int:
        return self.manifest["run"]["n"]

    @property
    def shard_size(self) -> int:
        return self.manifest["run"]["shard_size"]

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def shard_rows(self, k: int) -> range:
        return self.layout.shard_rows(k)

    @property
    def kind(self) -> str:
        """What the rows are: "triplets" (`factory generate`) or "segmentation" (`factory
        label`)."""
        return self.manifest["run"]["kind"]

    @property
    def schema(self) -> pa.Schema:
        return SCHEMAS[self.kind]

    @property
    def categories(self) -> list[dict]:
        """[{"id", "name"}] of every class the data may name: the manifest's (label runs, open
        vocabularies), else the split's vocabulary."""
        if "categories" in self.manifest:
            return self.manifest["categories"]
        from factory.vocab import VOCABULARIES

        vocab = VOCABULARIES[self.manifest["run"]["split"]]
        return [{"id": i, "name": n} for i, n in zip(vocab.ids, vocab.names, strict=True)]

    @property
    def records(self) -> dict[int, dict]:
        """Each recorded shard's record: rows, bytes, sha256, node (the Ray node that wrote it),
        generators and labellers (the nodes whose actors made its rows) and written_at (unix
        seconds). The samples it lacks are under `dropped` and `failed`."""
        return self._manifest.records

    @property
    def dropped(self) -> list[int]:
        """Indices of samples left out of finished shards on purpose (`label --min-quality`)."""
        return sorted(i for v in self.manifest.get("dropped", {}).values() for i in v)

    @property
    def failed(self) -> list[dict]:
        """Samples left out of finished shards because a stage kept failing on them
        (`--max-failed-samples`): {"index", "stage", "error"} each, by index."""
        return sorted((f for v in self.manifest.get("failed", {}).values() for f in v),
                      key=lambda f: f["index"])

    @property
    def data_dir(self) -> str:
        return self.layout.uri(self.layout.path(DATA))

    def shard_path(self, k: int) -> str:
        return self.layout.uri(self.layout.shard_file(k))

    @property
    def log_path(self) -> str:
        return self.layout.uri(self.layout.path(LOG_FILE))

    def finished(self) -> list[int]:
        """The finished shards: those whose file is in `data/` (a shard file exists only
        whole)."""
        layout = self.layout
        names = (layout.shard_of_name(n) for n in list_files(layout.fs, layout.path(DATA)))
        return sorted(k for k in names if k is not None)

    def todo(self) -> list[int]:
        done = set(self.finished())
        return [k for k in range(self.num_shards) if k not in done]

    def check_finished(self, allow_partial: bool, command: str) -> list[int]:
        """The finished shards, for a job that trains on them: ValueError if there is none, or
        if the run is unfinished and not `allow_partial` (`command` is the one to run again)."""
        done = self.finished()
        if not done:
            raise ValueError(f"{self.root!r} holds no finished shard yet")
        if len(done) < self.num_shards and not allow_partial:
            raise ValueError(f"{self.root!r} is an unfinished run ({len(done)} of "
                             f"{self.num_shards} shards done): finish it by running its "
                             f"`{command}` command again, or pass --allow-partial to train on "
                             "the finished shards")
        return done

    def shard_paths(self) -> list[str]:
        return [self.shard_path(k) for k in self.finished()]

    def write_shard(self, k: int, table: pa.Table, dropped: list[int] = ()) -> str:
        """Write shard k atomically from this process and record it (see ShardLayout.write)."""
        self.add_records({k: self.layout.write(k, table, dropped)})
        self.compact()
        return self.shard_path(k)

    def add_records(self, records: dict[int, dict]) -> None:
        """Enter shard records (their files are written) in the manifest, to be compacted."""
        self._manifest.add(records)

    def forget(self, shards) -> None:
        """Remove the records of `shards` (file and manifest entry): they are to be made
        again."""
        layout = self.layout
        for k in shards:
            if layout.fs.get_file_info(layout.record_file(k)).type == pafs.FileType.File:
                layout.fs.delete_file(layout.record_file(k))
        self._manifest.remove(shards)

    def compact(self, force: bool = True) -> bool:
        """Write manifest.json with every record (unless not `force` and not yet due: see
        Manifest.due). Returns whether it was written."""
        return self._manifest.compact(force)

    def record(self, key: str, value) -> None:
        """Set a top-level manifest entry (e.g. the resolved run) and write the manifest."""
        self.manifest[key] = value
        self.compact()

    def lock(self) -> FolderLock:
        """Take the folder's one-writer lock (see FolderLock); use it as a context."""
        return FolderLock(self.layout.fs, self.layout.path(LOCK_FILE), self.root)

    @classmethod
    def open(cls, root: str) -> ShardStore:
        """An existing output folder, with the records written since its manifest was last
        compacted."""
        from factory.manifest import Manifest

        fs, base = open_location(root)
        path = posixpath.join(base, MANIFEST)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise StoreError(f"{root!r} is not a factory output folder (no {MANIFEST})")
        try:
            with fs.open_input_stream(path) as f:
                data = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {root}/{MANIFEST}: {e}") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{root!r} has schema version {data.get('schema_version')}; "
                             f"this factory reads version {SCHEMA_VERSION}")
        run = data["run"]
        layout = ShardLayout(location_root(root), run["n"], run["shard_size"], run["kind"])
        store = cls(layout, Manifest(layout, data))
        store._manifest.load_records()
        return store

    @classmethod
    def plan(cls, root: str, run: dict, **info) -> ShardStore:
        """The store for `run`, writing nothing yet: an earlier run of the same arguments (to
        resume), or a new one for an empty or absent folder, which `create` makes. `info`
        (models, pairs, ...) is recorded in a new manifest, not compared."""
        from factory.manifest import Manifest

        fs, base = open_location(root)
        if fs.get_file_info(posixpath.join(base, MANIFEST)).type == pafs.FileType.File:
            store = cls.open(root)
            differ = sorted(k for k in set(run) | set(store.manifest["run"])
                            if run.get(k) != store.manifest["run"].get(k))
            if differ:
                shown = ", ".join(f"{k}={store.manifest['run'].get(k)!r} (now {run.get(k)!r})"
                                  for k in differ)
                raise StoreError(f"{root!r} holds another run ({shown}): use a new --out folder")
            return store
        kind = fs.get_file_info(base).type
        if kind == pafs.FileType.File or (
                kind == pafs.FileType.Directory
                and fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))):
            raise StoreError(f"{root!r} exists and is not an empty folder or a factory output")
        data = {
            "schema_version": SCHEMA_VERSION,
            "run": run,
            **info,
            "packages": package_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        layout = ShardLayout(location_root(root), run["n"], run["shard_size"], run["kind"])
        return cls(layout, Manifest(layout, data))

    @property
    def exists(self) -> bool:
        """Whether the folder holds this run's manifest yet."""
        layout = self.layout
        return layout.fs.get_file_info(layout.path(MANIFEST)).type == pafs.FileType.File

    def create(self) -> None:
        """Make the folder of a planned new run: data/, records/ and the manifest."""
        if not self.exists:
            for folder in (DATA, RECORDS):
                self.layout.fs.create_dir(self.layout.path(folder), recursive=True)
            self.compact()

    def discard(self) -> None:
        """Remove what `create` made for a run that then wrote no shard: its manifest, log and
        empty folders, and the folder itself if nothing else is left in it."""
        layout = self.layout
        fs = layout.fs
        if self.finished():
            raise StoreError(f"{self.root!r} holds shards: not discarding it")
        for name in (MANIFEST, LOG_FILE):
            if fs.get_file_info(layout.path(name)).type == pafs.FileType.File:
                fs.delete_file(layout.path(name))
        for path in (layout.path(DATA), layout.path(RECORDS), layout.path()):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory and not fs.get_file_info(
                    pafs.FileSelector(path)):
                fs.delete_dir(path)

    @classmethod
    def create_or_resume(cls, root: str, run: dict, **info) -> ShardStore:
        """`plan`, then `create`."""
        store = cls.plan(root, run, **info)
        store.create()
        return store

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All finished shards as one table (only `columns`, if given)."""
        done = self.finished()
        if not done:
            names = self.schema.names if columns is None else columns
            return pa.schema([self.schema.field(c) for c in names]).empty_table()
        layout = self.layout
        return pa.concat_tables(pq.read_table(layout.shard_file(k), columns=columns,
                                              filesystem=layout.fs) for k in done)
