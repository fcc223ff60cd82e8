"""An output folder: `manifest.json` plus fixed-size Parquet shards in `data/`, each written
atomically. `data/` holds nothing else, so pandas, Ray Data, DuckDB or HF datasets read it as is.

The folder is a local path, a shared mount or a URI that pyarrow's filesystem layer opens
(`s3://`, `gs://`, `file://`): every node of a Ray cluster writes its shards there itself.

Shard k holds samples [k * shard_size, (k + 1) * shard_size) sorted by index. On a filesystem it
is written to a hidden temporary file and renamed into place; on an object store it is one PUT
at its final key, which appears only when complete. Either way a shard file exists only when
whole; a rerun with the same run arguments writes only the missing shards, and the result is the
same files as an uninterrupted run. The manifest's `run` block is what defines the data: a rerun
whose `run` differs is refused rather than mixed in. Its `shards` block records each finished
shard's rows, bytes, SHA-256 and the Ray node that wrote it: a shard counts as done only while
its file matches that record (`damaged` checks size and footer on every resume, `verify` the
checksums), and on a local disk each file is fsynced before its rename. `factory.lock` lets one
run at a time write the folder.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import posixpath
import socket
import uuid
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from factory.schema import SCHEMA_VERSION, SCHEMAS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATA = "data"  # shards live here, apart from the manifest
PACKAGES = ("torch", "diffusers", "transformers", "torchvision", "ray", "pyarrow", "pycocotools")
LOG_FILE = "factory.log"  # Ray's own output during a run (factory/console.py)
LOCK_FILE = "factory.lock"  # the writing run's host, pid and start time
TEMP_PREFIX = ".shard-"  # hidden temporary shard files: `.shard-...parquet.tmp-XXXXXXXX`
LEFT_OUT = ("dropped", "failed")  # what a shard record lists of the samples it lacks
LEFT_OUT_KEY = b"factory.left_out"  # the same lists in a shard file's Parquet metadata


class StoreError(ValueError):
    """An output folder that cannot be used for this run."""


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


def _is_object_store(fs: pafs.FileSystem) -> bool:
    """Object stores have no rename, but a PUT appears whole at its key or not at all."""
    return fs.type_name in ("s3", "gcs")


def put_atomic(fs: pafs.FileSystem, path: str, data) -> None:
    """Write `data` (bytes or a pyarrow Buffer) so that `path` never exists half-written: a
    hidden temporary file renamed into place, or one PUT on an object store. On a local disk
    the file is fsynced before the rename and its folder after it, so that a power loss leaves
    the old state or the whole new file, never a truncated one."""
    if _is_object_store(fs):
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class FolderLock:
    """The one-writer lock of an output folder: `factory.lock` holds the writing run's host, pid
    and start time, from construction until the context closes. A folder locked by a live run,
    or by a run on another host (which cannot be checked from here), is refused with a
    StoreError naming the holder; a lock left by a run that is gone (same host, no such
    process) is taken over with a notice. On a local disk the file is made with O_EXCL, so two
    runs starting at once cannot both win; on an object store the check is best effort."""

    def __init__(self, fs: pafs.FileSystem, path: str, shown: str) -> None:
        self.fs, self.path, self.shown = fs, path, shown
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now(datetime.UTC).isoformat(
                           timespec="seconds"), "token": uuid.uuid4().hex}
        if not self._create():
            held = self._read()
            if held is not None and not self._gone(held):
                raise StoreError(
                    f"{shown!r} is being written by another run: pid {held.get('pid')} on host "
                    f"{held.get('host')}, since {held.get('started')} ({LOCK_FILE}); wait for "
                    f"it, or delete {LOCK_FILE} if that run is gone")
            log.warning("notice: taking over the lock of %s from pid %s on host %s (since %s), "
                        "which is gone", shown, held and held.get("pid"),
                        held and held.get("host"), held and held.get("started"))
            self.fs.delete_file(self.path)
            if not self._create():
                raise StoreError(f"{shown!r} was locked by another run meanwhile ({LOCK_FILE})")

    def _create(self) -> bool:
        data = json.dumps(self.holder).encode("utf-8")
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            return False
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return True

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):  # gone meanwhile, or half-written by a crashed run
            return None

    @staticmethod
    def _gone(held: dict) -> bool:
        """Whether the holder is a process of this host that no longer exists."""
        if held.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError, ValueError):
            return False
        return False

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        if (self._read() or {}).get("token") == self.holder["token"]:
            self.fs.delete_file(self.path)


@dataclass(frozen=True)
class ShardLayout:
    """Where a run's shards go and which samples each holds: all a worker needs to write one."""

    root: str  # location_root form
    n: int
    shard_size: int
    kind: str  # "triplets" | "segmentation"

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))

    @property
    def schema(self) -> pa.Schema:
        return SCHEMAS[self.kind]

    def shard_name(self, k: int) -> str:
        return f"shard-{k:05d}-of-{self.num_shards:05d}.parquet"

    @functools.cached_property
    def _location(self) -> tuple[pafs.FileSystem, str]:
        return open_location(self.root)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._location[0]

    def fs_path(self, *parts: str) -> str:
        """A path inside the output location, as `fs` names it."""
        return posixpath.join(self._location[1], *parts)

    def write(self, k: int, table: pa.Table, dropped: list[int] = (),
              failed: list[dict] = ()) -> dict:
        """Write shard k atomically; its rows, the `dropped` indices and the `failed` samples
        ({"index", "stage", "error"}) must be exactly the shard's sample indices. Returns the
        shard's record: rows, bytes, sha256, dropped, failed."""
        table = table.sort_by("index")
        failed = sorted(failed, key=lambda f: f["index"])
        have = [*table.column("index").to_pylist(), *dropped, *(f["index"] for f in failed)]
        if sorted(have) != list(self.shard_rows(k)):
            raise StoreError(f"shard {k} must hold samples {self.shard_rows(k)}, got "
                             f"{table.num_rows} rows, {len(dropped)} dropped and {len(failed)} "
                             "failed")
        left_out = {"dropped": sorted(dropped), "failed": failed}
        if dropped or failed:  # kept in the file too, for `repair` after a crash
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   LEFT_OUT_KEY: json.dumps(left_out)})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue()
        put_atomic(self.fs, self.fs_path(DATA, self.shard_name(k)), data)
        return {"rows": table.num_rows, "bytes": data.size,
                "sha256": hashlib.sha256(data).hexdigest(), **left_out}


@dataclass(frozen=True)
class ShardStore:
    root: str
    manifest: dict

    @functools.cached_property
    def layout(self) -> ShardLayout:
        """Made once per store, so that its filesystem (for a URI, a client) is opened once."""
        run = self.manifest["run"]
        return ShardLayout(self.root, run["n"], run["shard_size"], run["kind"])

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
    def shards(self) -> dict[int, dict]:
        """The manifest's record of each finished shard: rows, bytes, sha256, node (the Ray node
        that wrote it), generators and labellers (the nodes whose actors made its rows) and
        written_at (unix seconds)."""
        return {int(k): v for k, v in self.manifest.get("shards", {}).items()}

    @property
    def data_dir(self) -> str:
        return self._join(DATA)

    def _join(self, *parts: str) -> str:
        if "://" in self.root:
            return "/".join((self.root, *parts))
        return os.path.join(self.root, *parts)

    def shard_path(self, k: int) -> str:
        return self._join(DATA, self.layout.shard_name(k))

    @property
    def log_path(self) -> str:
        return self._join(LOG_FILE)

    def _data_files(self) -> list[str]:
        layout = self.layout
        infos = layout.fs.get_file_info(pafs.FileSelector(layout.fs_path(DATA),
                                                          allow_not_found=True))
        return [i.base_name for i in infos if i.type == pafs.FileType.File]

    def done(self) -> list[int]:
        names = set(self._data_files())
        return [k for k in range(self.num_shards) if self.layout.shard_name(k) in names]

    def finished(self, allow_partial: bool, command: str) -> list[int]:
        """The finished shards, for a job that trains on them: ValueError if there is none, or
        if the run is unfinished and not `allow_partial` (`command` is the one to run again)."""
        done = self.done()
        if not done:
            raise ValueError(f"{self.root!r} holds no finished shard yet")
        if len(done) < self.num_shards and not allow_partial:
            raise ValueError(f"{self.root!r} is an unfinished run ({len(done)} of "
                             f"{self.num_shards} shards done): finish it by running its "
                             f"`{command}` command again, or pass --allow-partial to train on "
                             "the finished shards")
        return done

    def todo(self) -> list[int]:
        done = set(self.done())
        return [k for k in range(self.num_shards) if k not in done]

    def shard_paths(self) -> list[str]:
        return [self.shard_path(k) for k in self.done()]

    def write_shard(self, k: int, table: pa.Table, dropped: list[int] = ()) -> str:
        """Write shard k atomically from this process and record it (see ShardLayout.write)."""
        self.record_shards({k: self.layout.write(k, table, dropped)})
        return self.shard_path(k)

    def record_shards(self, records: dict[int, dict]) -> None:
        """Enter finished shards in the manifest: their records, and their dropped and failed
        samples under `dropped` and `failed` (by shard, with `dropped_count` and
        `failed_count`)."""
        shards = self.manifest.setdefault("shards", {})
        for k, record in records.items():
            record = dict(record)
            lost = {key: record.pop(key, []) for key in LEFT_OUT}
            self._set_left_out(k, lost)
            shards[str(k)] = record
        self._write_manifest()

    def _set_left_out(self, k: int, lost: dict[str, list]) -> None:
        """Set shard k's dropped and failed samples (none where `lost` has none), and the
        counts."""
        for key in LEFT_OUT:
            per_shard = self.manifest.setdefault(key, {})
            if lost.get(key):
                per_shard[str(k)] = list(lost[key])
            else:
                per_shard.pop(str(k), None)
            self.manifest[f"{key}_count"] = sum(len(v) for v in per_shard.values())

    def record(self, key: str, value) -> None:
        """Set a top-level manifest entry (e.g. the resolved run) and write the manifest."""
        self.manifest[key] = value
        self._write_manifest()

    def repair(self) -> int:
        """Record the finished shards a crash between writing a shard and updating the manifest
        left unrecorded (also the shards of folders made before shards were recorded): rows,
        bytes and checksum from the file, dropped and failed samples from its metadata (files
        without it: every missing index as dropped). Returns how many shards were mended."""
        known = self.shards
        layout = self.layout
        records = {}
        for k in self.done():
            if k in known:
                continue
            with layout.fs.open_input_file(layout.fs_path(DATA, layout.shard_name(k))) as f:
                data = f.read()
            table = pq.read_table(pa.BufferReader(data), columns=["index"])
            left_out = (table.schema.metadata or {}).get(LEFT_OUT_KEY)
            lost = json.loads(left_out) if left_out else {"dropped": sorted(
                set(self.shard_rows(k)) - set(table.column("index").to_pylist()))}
            records[k] = {"rows": table.num_rows, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest(), "node": None, **lost}
        if records:
            self.record_shards(records)
        return len(records)

    def lock(self) -> FolderLock:
        """Take the folder's one-writer lock (see FolderLock); use it as a context."""
        layout = self.layout
        return FolderLock(layout.fs, layout.fs_path(LOCK_FILE), self.root)

    def damaged(self) -> dict[int, str]:
        """Finished shards that do not match what the manifest recorded when they were written,
        checked cheaply: the file's size and its Parquet footer's row count (a truncated or
        empty file has no footer). {shard: what is wrong}. Unrecorded shards are checked for a
        readable footer only (`repair` records them)."""
        layout, known, bad = self.layout, self.shards, {}
        for k in self.done():
            path = layout.fs_path(DATA, layout.shard_name(k))
            size = layout.fs.get_file_info(path).size
            try:
                with layout.fs.open_input_file(path) as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
            except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
                bad[k] = f"unreadable, {size} bytes: {_first_line(e)}"
                continue
            record = known.get(k)
            if record is not None and size != record["bytes"]:
                bad[k] = f"{size} bytes, the manifest recorded {record['bytes']}"
            elif record is not None and rows != record["rows"]:
                bad[k] = f"{rows} rows, the manifest recorded {record['rows']}"
        return bad

    def verify(self) -> dict[int, str]:
        """Every shard checked against the manifest in full: the cheap checks of `damaged`, then
        each file read whole against its recorded SHA-256; recorded shards whose file is gone
        and finished shards never recorded count as bad too. {shard: what is wrong}."""
        layout, known = self.layout, self.shards
        bad = self.damaged()
        done = set(self.done())
        for k in sorted(done - set(bad)):
            if k not in known:
                bad[k] = "not recorded in the manifest"
                continue
            with layout.fs.open_input_file(layout.fs_path(DATA, layout.shard_name(k))) as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != known[k]["sha256"]:
                bad[k] = "its SHA-256 differs from the manifest's"
        for k in sorted(set(known) - done):
            bad[k] = "recorded in the manifest, but its file is missing"
        return dict(sorted(bad.items()))

    def redo(self, shards) -> None:
        """Delete the files and records of `shards` (damaged ones), so the run makes them
        again."""
        layout = self.layout
        for k in shards:
            path = layout.fs_path(DATA, layout.shard_name(k))
            if layout.fs.get_file_info(path).type == pafs.FileType.File:
                layout.fs.delete_file(path)
            self.manifest.get("shards", {}).pop(str(k), None)
            self._set_left_out(k, {})
        self._write_manifest()

    def _write_manifest(self) -> None:
        layout = self.layout
        put_atomic(layout.fs, layout.fs_path(MANIFEST),
                   json.dumps(self.manifest, indent=2).encode("utf-8"))

    def remove_partial(self) -> int:
        """Delete temporary files a crashed run left behind; returns how many."""
        stale = [n for n in self._data_files() if n.startswith(TEMP_PREFIX) and ".tmp-" in n]
        for name in stale:
            self.layout.fs.delete_file(self.layout.fs_path(DATA, name))
        return len(stale)

    @classmethod
    def open(cls, root: str) -> ShardStore:
        """An existing output folder (for reading)."""
        fs, base = open_location(root)
        path = posixpath.join(base, MANIFEST)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise StoreError(f"{root!r} is not a factory output folder (no {MANIFEST})")
        try:
            with fs.open_input_stream(path) as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {root}/{MANIFEST}: {e}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{root!r} has schema version {manifest.get('schema_version')}; "
                             f"this factory reads version {SCHEMA_VERSION}")
        return cls(location_root(root), manifest)

    @classmethod
    def plan(cls, root: str, run: dict, **info) -> ShardStore:
        """The store for `run`, writing nothing yet: an earlier run of the same arguments (to
        resume), or a new one for an empty or absent folder, which `create` makes. `info`
        (models, pairs, ...) is recorded in a new manifest, not compared."""
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
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "run": run,
            **info,
            "packages": package_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        return cls(location_root(root), manifest)

    @property
    def exists(self) -> bool:
        """Whether the folder holds this run's manifest yet."""
        layout = self.layout
        return layout.fs.get_file_info(layout.fs_path(MANIFEST)).type == pafs.FileType.File

    def create(self) -> None:
        """Make the folder of a planned new run: data/ and the manifest."""
        if not self.exists:
            self.layout.fs.create_dir(self.layout.fs_path(DATA), recursive=True)
            self._write_manifest()

    def discard(self) -> None:
        """Remove what `create` made for a run that then wrote no shard: its manifest, log and
        empty data folder, and the folder itself if nothing else is left in it."""
        layout = self.layout
        fs = layout.fs
        if self.done():
            raise StoreError(f"{self.root!r} holds shards: not discarding it")
        for name in (MANIFEST, LOG_FILE):
            if fs.get_file_info(layout.fs_path(name)).type == pafs.FileType.File:
                fs.delete_file(layout.fs_path(name))
        for path in (layout.fs_path(DATA), layout.fs_path()):
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
        done = self.done()
        if not done:
            names = self.schema.names if columns is None else columns
            return pa.schema([self.schema.field(c) for c in names]).empty_table()
        layout = self.layout
        return pa.concat_tables(
            pq.read_table(layout.fs_path(DATA, layout.shard_name(k)), columns=columns,
                          filesystem=layout.fs) for k in done)
