"""The one-writer lock of an output folder (`factory.lock`)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid

import pyarrow.fs as pafs

from factory.errors import StoreError

log = logging.getLogger(__name__)

LOCK_FILE = "factory.lock"  # the writing run's host, pid and start time


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
