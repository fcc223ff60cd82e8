"""An output folder: `manifest.json` plus fixed-size Parquet shards in `data/`, each written
atomically. `data/` holds nothing else, so pandas, Ray Data, DuckDB or HF datasets read it as is.

Shard k holds samples [k * shard_size, (k + 1) * shard_size) sorted by index. It is written to a
hidden temporary file and renamed into place, so a shard file exists only when complete; a rerun
with the same run arguments writes only the missing shards, and the result is the same files as
an uninterrupted run. The manifest's `run` block is what defines the data: a rerun whose `run`
differs is refused rather than mixed in.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import uuid
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.parquet as pq

from factory.schema import SCHEMA_VERSION, SCHEMAS

MANIFEST = "manifest.json"
DATA = "data"  # shards live here, apart from the manifest
PACKAGES = ("torch", "diffusers", "transformers", "torchvision", "ray", "pyarrow", "pycocotools")


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


@dataclass(frozen=True)
class ShardStore:
    root: str
    manifest: dict

    @property
    def n(self) -> int:
        return self.manifest["run"]["n"]

    @property
    def shard_size(self) -> int:
        return self.manifest["run"]["shard_size"]

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_rows(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))

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
    def data_dir(self) -> str:
        return os.path.join(self.root, DATA)

    def shard_path(self, k: int) -> str:
        return os.path.join(self.data_dir, f"shard-{k:05d}-of-{self.num_shards:05d}.parquet")

    def done(self) -> list[int]:
        return [k for k in range(self.num_shards) if os.path.exists(self.shard_path(k))]

    def todo(self) -> list[int]:
        done = set(self.done())
        return [k for k in range(self.num_shards) if k not in done]

    def shard_paths(self) -> list[str]:
        return [self.shard_path(k) for k in self.done()]

    def write_shard(self, k: int, table: pa.Table, dropped: list[int] = ()) -> str:
        """Write shard k atomically; its rows and the `dropped` indices must be exactly the
        shard's sample indices. Dropped indices are recorded in the manifest."""
        table = table.sort_by("index")
        if sorted([*table.column("index").to_pylist(), *dropped]) != list(self.shard_rows(k)):
            raise StoreError(f"shard {k} must hold samples {self.shard_rows(k)}, "
                             f"got {table.num_rows} rows and {len(dropped)} dropped")
        path = self.shard_path(k)
        tmp = os.path.join(self.data_dir, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if dropped:
            self._record_dropped({k: sorted(dropped)})
        return path

    def _record_dropped(self, per_shard: dict[int, list[int]]) -> None:
        dropped = self.manifest.setdefault("dropped", {})
        dropped.update({str(k): [int(i) for i in v] for k, v in per_shard.items()})
        self.manifest["dropped_count"] = sum(len(v) for v in dropped.values())
        self._write_manifest()

    def repair_dropped(self) -> int:
        """Record the dropped samples of finished shards that a crash between writing a shard and
        updating the manifest left unrecorded (a shard's missing indices are its dropped ones);
        returns how many shards were mended."""
        known = self.manifest.get("dropped", {})
        missing = {}
        for k in self.done():
            if str(k) not in known:
                have = pq.read_table(self.shard_path(k), columns=["index"]).column("index")
                lost = sorted(set(self.shard_rows(k)) - set(have.to_pylist()))
                if lost:
                    missing[k] = lost
        if missing:
            self._record_dropped(missing)
        return len(missing)

    def _write_manifest(self) -> None:
        tmp = os.path.join(self.root, f".{MANIFEST}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=2)
        os.replace(tmp, os.path.join(self.root, MANIFEST))

    def remove_partial(self) -> int:
        """Delete temporary files a crashed run left behind; returns how many."""
        stale = glob.glob(os.path.join(self.data_dir, ".shard-*.tmp-*"))
        for p in stale:
            os.remove(p)
        return len(stale)

    @classmethod
    def open(cls, root: str) -> ShardStore:
        """An existing output folder (for reading)."""
        path = os.path.join(root, MANIFEST)
        if not os.path.isfile(path):
            raise StoreError(f"{root!r} is not a factory output folder (no {MANIFEST})")
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {path!r}: {e}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{root!r} has schema version {manifest.get('schema_version')}; "
                             f"this factory reads version {SCHEMA_VERSION}")
        return cls(root, manifest)

    @classmethod
    def create_or_resume(cls, root: str, run: dict, **info) -> ShardStore:
        """The folder for `run`: new (empty or absent folder) or an earlier run of the same
        arguments. `info` (models, pairs, ...) is recorded in a new manifest, not compared."""
        if os.path.isfile(os.path.join(root, MANIFEST)):
            store = cls.open(root)
            differ = sorted(k for k in set(run) | set(store.manifest["run"])
                            if run.get(k) != store.manifest["run"].get(k))
            if differ:
                shown = ", ".join(f"{k}={store.manifest['run'].get(k)!r} (now {run.get(k)!r})"
                                  for k in differ)
                raise StoreError(f"{root!r} holds another run ({shown}): use a new --out folder")
            return store
        if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
            raise StoreError(f"{root!r} exists and is not an empty folder or a factory output")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "run": run,
            **info,
            "packages": package_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.makedirs(os.path.join(root, DATA), exist_ok=True)
        store = cls(root, manifest)
        store._write_manifest()
        return store

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All finished shards as one table (only `columns`, if given)."""
        paths = self.shard_paths()
        if not paths:
            names = self.schema.names if columns is None else columns
            return pa.schema([self.schema.field(c) for c in names]).empty_table()
        return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)
