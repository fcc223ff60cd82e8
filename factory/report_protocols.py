"""The Protocols section of `factory report`: the Protocol I/II result files of a folder, laid out
by eval/ as their reports' Markdown is, then turned into HTML tables."""

from __future__ import annotations

import json
import math

import pyarrow.fs as pafs

from eval.protocol2 import markdown as protocol2_markdown
from eval.table import ProtocolTable
from factory.report_html import esc, section
from factory.report_read import ReportError


def protocol_section(fs: pafs.FileSystem, base: str, names: list[str]) -> str:
    """Protocol I and II tables, formatted by eval/ as their reports' Markdown is."""
    parts = []
    for name in names:
        try:
            with fs.open_input_stream(f"{base}/{name}") as f:
                r = json.loads(f.read().decode("utf-8"))
            if name == "protocol1.json":
                title = (f"Protocol I: {r['split']} fold {r['fold']}, {r['kept']} of "
                         f"{r['samples']} test samples, mIoU (%)")
                md = (_StoredTable(r).to_markdown(r.get("paper_reference"))
                      + f"\nMask rule: {r['mask_rule']}.")
            else:
                title = (f"Protocol II: {r['dataset'].upper()} fold {r['fold']}, "
                         f"{r['images']} val images, mIoU (%)")
                md = protocol2_markdown(r)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReportError(f"cannot read {name} in {base!r}: {e!r}") from None
        parts.append(f"<h3>{esc(title)}</h3>" + _markdown_tables(md))
    parts.append("<p class=note>Rows marked (paper) are the paper's figures, for comparison; "
                 "they were not measured here.</p>")
    return section("protocols", "Protocols", "\n".join(parts))


class _StoredTable(ProtocolTable):
    """A Protocol I table as its JSON report holds it, laid out by ProtocolTable's own
    `to_markdown`: the rows and counts are given, so there are no accumulators to set up."""

    def __init__(self, report: dict) -> None:  # not ProtocolTable's: nothing to accumulate
        self.methods = tuple(report["rows"])
        self._rows = {m: {c: math.nan if v is None else v for c, v in r.items()}
                      for m, r in report["rows"].items()}
        self._counts = report["counts"]

    def rows(self) -> dict[str, dict[str, float]]:
        return self._rows

    def counts(self) -> dict[str, dict[str, int]]:
        return self._counts


def _markdown_tables(md: str) -> str:
    """The pipe tables and lines of a report's Markdown as HTML; rows naming the paper are
    marked."""
    out, table = [], []

    def flush() -> None:
        if not table:
            return
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
        rule = next((i for i, r in enumerate(rows) if all(c and set(c) <= set(":-") for c in r)),
                    None)
        head, body = ([], rows) if rule is None else (rows[:rule], rows[rule + 1:])
        html_rows = ["<tr>" + "".join(f"<th>{esc(c)}</th>" for c in r) + "</tr>" for r in head]
        html_rows += [f'<tr{" class=paper" if "(paper" in r[0] else ""}>'
                      + "".join(f'<td{" class=num" if i else ""}>{esc(c)}</td>'
                                for i, c in enumerate(r)) + "</tr>" for r in body]
        out.append(f"<table>{''.join(html_rows)}</table>")
        table.clear()

    for line in md.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{esc(line.strip())}</p>")
    flush()
    return "\n".join(out)
