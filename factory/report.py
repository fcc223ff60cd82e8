"""`factory report`: an output folder as one offline HTML page. A gallery of samples with each
class mask over its image (at most K a class), the per-class figures of `factory stats`, the run
as its manifest tells it (arguments, what the run resolved, when its shards were written, the
samples it left out and why, any drift accepted) and the Protocol I/II results in the folder.

The page needs nothing outside its folder: styles, script and figures (inline SVG) are in it,
the pictures are files beside it (`index_files/` for `index.html`), and its Content-Security-
Policy allows no other resource. Every string from the data reaches the page escaped: HTML
through `html.escape`, the gallery's data as JSON (with <, > and & as \\u escapes) that the
script puts into text nodes only.

Shards are read one at a time, twice: the light columns of every shard (the `factory stats`
numbers, through `StatsCounter`, and the picks), then the images and masks of the picked
samples, READ_BATCH rows at a time. Memory holds one shard's light columns (or READ_BATCH rows),
K picks a class and the manifest, however large the folder.

This module reads the folder in those two passes and publishes the page; the reading and the
picks are in `report_read`, the pictures in `report_draw`, the page's building blocks and shell
in `report_html`, the folder's sections in `report_sections`, the Protocols' in
`report_protocols`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from factory.console import Progress
from factory.report_draw import class_colours, draw, hex_colour
from factory.report_html import page
from factory.report_protocols import protocol_section
from factory.report_read import Picker, ReportError, heavy_rows, pick_keys, read_shard
from factory.report_sections import (
    RATE_BINS,
    figures_section,
    gallery_section,
    run_line,
    run_section,
)
from factory.stats import ClassStats, StatsCounter, stats_columns
from factory.store import MANIFEST, ShardStore, open_location

__all__ = ["PER_CLASS", "RATE_BINS", "REPORT_DIR", "Picker", "ReportError", "ReportResult",
           "make_report", "pick_keys"]

REPORT_DIR = "report"  # the page's folder in the output folder, by default
PAGE = "index.html"
PER_CLASS = 24  # samples picked per class
PROTOCOLS = ("protocol1.json", "protocol2.json")


@dataclass
class ReportResult:
    page: str  # the HTML file written
    shown: int  # samples in the gallery
    samples: int | None  # samples in the folder's finished shards (None: no factory folder)
    per_class: int
    protocols: list[str]  # the Protocol result files shown

    def summary(self) -> str:
        what = ([f"{self.shown} of {self.samples} samples (at most {self.per_class} a class)"]
                if self.samples is not None else [])
        return f"report of {', '.join(what + self.protocols)}: {self.page}"


def make_report(root: str, out: str | None = None, per_class: int = PER_CLASS) -> ReportResult:
    """Write the report page of the output folder `root` (a `generate` or `label` folder, or
    one holding protocol1.json / protocol2.json) to `out` [default: ROOT/report/index.html],
    its pictures to a folder beside it. The page and its pictures are made in a temporary
    folder and moved into place at the end: a refused or failed report writes nothing.
    Raises ReportError for a folder with nothing to report, an unreadable shard or result,
    `out` in a missing folder or bad `per_class`; StoreError for an unusable manifest."""
    if per_class < 1:
        raise ReportError(f"--per-class must be at least 1, got {per_class}")
    fs, base = open_location(root)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise ReportError(f"no folder {root!r}")
    protocols = [name for name in PROTOCOLS
                 if fs.get_file_info(f"{base}/{name}").type == pafs.FileType.File]
    if fs.get_file_info(f"{base}/{MANIFEST}").type == pafs.FileType.File:
        store = ShardStore.open(root)
    elif protocols:
        store = None
    else:
        raise ReportError(f"{root!r} is not a factory output folder (no {MANIFEST}) and holds "
                          f"no Protocol I/II results ({', '.join(PROTOCOLS)})")
    out = _page_path(root, out)
    folder, files = os.path.dirname(os.path.abspath(out)), Path(out).stem + "_files"
    made = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".report-", dir=folder)
    except OSError as e:
        raise ReportError(f"cannot write the report {out!r}: {e}") from None
    try:
        sections, data, shown, samples = [], {}, 0, None
        if store is not None:
            sections, data, shown, samples = _folder_sections(
                store, per_class, os.path.join(stage, files), urllib.parse.quote(files))
        if protocols:
            sections.append(protocol_section(fs, base, protocols))
        title = (f"{store.kind} · {run_line(store.manifest['run'])}" if store is not None
                 else "Protocol results")
        with open(os.path.join(stage, PAGE), "w", encoding="utf-8") as f:
            f.write(page(root, title, sections, data))
        _publish(stage, out, files)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, no permission: reading errors are named
            raise ReportError(f"cannot write the report {out!r}: {e}") from None
        raise
    return ReportResult(out, shown, samples, per_class, protocols)


def _page_path(root: str, out: str | None) -> str:
    """The page's file: `out`, whose folder must exist, or ROOT/report/index.html."""
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ReportError(f"no folder {parent!r} to write {out!r} in")
        return out
    if "://" in root:
        raise ReportError(f"{root!r} is not on this machine's disk: give the page's file with "
                          "--out")
    return os.path.join(root, REPORT_DIR, PAGE)


def _publish(stage: str, out: str, files: str) -> None:
    """Move the staged page and pictures to `out` and its `files` folder, replacing an older
    report's (kept in the stage until the new one is in place), then remove the stage."""
    target = os.path.join(os.path.dirname(os.path.abspath(out)), files)
    if os.path.isdir(target):
        os.replace(target, os.path.join(stage, "older"))
    if os.path.isdir(os.path.join(stage, files)):
        os.replace(os.path.join(stage, files), target)
    os.replace(os.path.join(stage, PAGE), out)
    shutil.rmtree(stage)


# ---------------------------------------------------------------- the two passes


class _Pass:
    """The progress line of one pass over the folder (factory.console.Progress): drawn only
    once the pass has taken a while (1 s on a terminal, 30 s in a log), then once more at its
    end."""

    def __init__(self, label: str, total: int) -> None:
        self.progress = Progress({"n": total}, {"n": label})
        self.done = 0
        self.shown = False

    def add(self, n: int) -> None:
        self.done += n
        if self.progress.due():
            self.progress.show({"n": self.done})
            self.shown = True

    def end(self) -> None:
        if self.shown:
            self.progress.show({"n": self.done})


def _folder_sections(store: ShardStore, per_class: int, files: str, href: str
                     ) -> tuple[list[str], dict, int, int]:
    """The gallery, figures and run sections of a store, its pictures written to `files`
    (`href` from the page); also the gallery's data, the samples shown and those read."""
    done = store.finished()
    records = store.records
    reading = _Pass("samples read", sum(records.get(k, {}).get("rows", len(store.shard_rows(k)))
                                         for k in done))
    counter, picker = StatsCounter(store.kind), Picker(per_class)
    for k in done:
        table = read_shard(store, k, ["index"] + stats_columns(store.kind))
        counter.add(table)
        picker.add(table.column("index").to_pylist(), table.column("classes").to_pylist())
        reading.add(table.num_rows)
    reading.end()
    stats = counter.stats(store, len(done))
    picks = picker.indices()
    drawing = _Pass("samples drawn", len(picks))
    colours = class_colours(store, stats)
    samples = []
    os.makedirs(files, exist_ok=True)
    by_shard: dict[int, set[int]] = {}
    for i in picks:
        by_shard.setdefault(store.layout.shard_of(i), set()).add(i)
    for k in sorted(by_shard):
        for row in heavy_rows(store, k, by_shard[k]):
            samples.append(draw(row, colours, files, href, store.layout.shard_name(k)))
            drawing.add(1)
    drawing.end()
    seen = set(store.manifest["seen"])
    names = [n for n in stats.listed() if stats.per_class.get(n, ClassStats()).samples]
    data = {"classes": {n: {"colour": hex_colour(colours[n]), "seen": n in seen} for n in colours},
            "order": names, "samples": samples,
            "value_name": "quality" if store.kind == "segmentation" else "mean detector score"}
    sections = [gallery_section(store, stats, per_class, len(samples)),
                figures_section(stats), run_section(store, stats)]
    return sections, data, len(samples), stats.samples
