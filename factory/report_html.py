"""The building blocks of `factory report`'s page: escaping, sections, tables, the inline SVG
charts, and the page shell with its Content-Security-Policy. Every string given here reaches
the page escaped (`esc`); the gallery's data as JSON that cannot end its <script> element."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from pathlib import Path

from factory.stats import ClassStats

ASSETS = Path(__file__).with_name("report_assets")
BAR = "#4c78a8"
EMPTY_BAR = "#e45756"


def esc(value) -> str:
    """Any value as escaped HTML text (non-strings as JSON)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return html.escape(text, quote=True)


def section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def svg(width: float, height: float, body: str) -> str:
    return (f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} '
            f'{height:.0f}" role="img">{body}</svg>')  # inline SVG: HTML gives its namespace


def table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    def cells(tag, values):
        return "".join(f'<{tag}{" class=num" if i in numeric else ""}>{esc(v)}</{tag}>'
                       for i, v in enumerate(values))
    return ("<table><thead><tr>" + cells("th", head) + "</tr></thead><tbody>"
            + "".join("<tr>" + cells("td", r) + "</tr>" for r in rows) + "</tbody></table>")


def pairs(d: dict) -> str:
    """A dict as a two-column table, None as a dash."""
    return table(["", ""], [[k, "—" if v is None else v] for k, v in d.items()])


def count_bars(rows: list[tuple[str, ClassStats, bool]]) -> str:
    """One horizontal bar per class: its samples, the part with an empty mask in red."""
    top = max([c.samples for _, c, _ in rows] + [1])
    width, left, h = 360, 150, 16
    out = []
    for y, (name, c, seen) in enumerate(rows):
        full, empty = width * c.samples / top, width * c.empty / top
        share = f"{100 * c.empty / c.samples:.0f}% empty" if c.samples else "no samples"
        label = f"{name}{'' if seen else ' (unseen)'}"
        out.append(
            f'<g transform="translate(0 {y * h})"><title>{esc(label)}: {c.samples} samples, '
            f'{c.empty} with an empty mask</title>'
            f'<text x="{left - 6}" y="12" text-anchor="end">{esc(label)}</text>'
            f'<rect x="{left}" y="2" width="{full - empty:.1f}" height="{h - 4}" fill="{BAR}"/>'
            f'<rect x="{left + full - empty:.1f}" y="2" width="{empty:.1f}" height="{h - 4}" '
            f'fill="{EMPTY_BAR}"/>'
            f'<text x="{left + full + 6:.1f}" y="12" class="muted">{c.samples} · {share}'
            "</text></g>")
    return svg(left + width + 130, len(rows) * h + 4, "".join(out))


def heat(names: list[str], hists: list[list[int]], seen: list[str]) -> str:
    """Histograms as rows of cells over [0, 1], darker for more, the count in each cell."""
    top = max([max(h) for h in hists] + [1])
    left, cw, ch = 150, 34, 16
    bins = len(hists[0])
    out = [f'<text x="{left + b * cw}" y="11" class="muted">{b / bins:.1f}</text>'
           for b in range(0, bins + 1, 2)]
    for y, (name, hist) in enumerate(zip(names, hists, strict=True)):
        label = name if name in seen else f"{name} (unseen)"
        out.append(f'<g transform="translate(0 {16 + y * ch})">'
                   f'<text x="{left - 6}" y="12" text-anchor="end">{esc(label)}</text>')
        for b, v in enumerate(hist):
            shade = round(245 - 190 * v / top)
            out.append(f'<rect x="{left + b * cw}" y="0" width="{cw - 1}" height="{ch - 1}" '
                       f'fill="rgb({shade},{shade},{min(255, shade + 25)})">'
                       f"<title>{esc(label)}, {b / bins:.1f}-{(b + 1) / bins:.1f}: {v}</title>"
                       "</rect>")
            if v:
                out.append(f'<text x="{left + b * cw + cw / 2}" y="12" text-anchor="middle" '
                           f'fill="{"#fff" if shade < 150 else "#1d2129"}">{v}</text>')
        out.append("</g>")
    return svg(left + bins * cw + 4, 20 + len(names) * ch, "".join(out))


def histogram(counts: list[int]) -> str:
    """Vertical bars over [0, 1]."""
    top = max(counts + [1])
    bw, h, bins = 30, 120, len(counts)
    out = []
    for b, v in enumerate(counts):
        bh = h * v / top
        out.append(f'<rect x="{30 + b * bw}" y="{10 + h - bh:.1f}" width="{bw - 2}" '
                   f'height="{bh:.1f}" fill="{BAR}"><title>{b / bins:.1f}-{(b + 1) / bins:.1f}'
                   f": {v}</title></rect>"
                   f'<text x="{30 + b * bw + bw / 2}" y="{6 + h - bh:.1f}" '
                   f'text-anchor="middle" class="muted">{v}</text>')
    out += [f'<text x="{30 + b * bw}" y="{h + 24}" text-anchor="middle" class="muted">'
            f"{b / bins:.1f}</text>" for b in range(0, bins + 1, 2)]
    return svg(40 + bins * bw, h + 30, "".join(out))


def _script_json(data: dict) -> str:
    """JSON that cannot end its <script> element or open a comment in it."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page(root: str, title: str, sections: list[str], data: dict) -> str:
    """The whole page: `sections` in order, a link to each, the gallery's `data` (an empty dict:
    no gallery and no large view) and report_assets' style and script inline."""
    css = (ASSETS / "report.css").read_text(encoding="utf-8")
    js = (ASSETS / "report.js").read_text(encoding="utf-8")
    # nothing but this page's own style, its own script and pictures from its folder
    csp = (f"default-src 'none'; img-src 'self' file:; style-src {_csp_hash(css)}; "
           f"script-src {_csp_hash(js)}; base-uri 'none'; form-action 'none'")
    nav = "".join(f'<a href="#{key}">{key.capitalize()}</a>'
                  for key in ("gallery", "figures", "run", "protocols")
                  if f'<section id="{key}">' in "".join(sections))
    viewer = ('<div id="viewer" hidden role="dialog" aria-modal="true" aria-label="sample">'
              '<div class="box"><button id="v-close" type="button" aria-label="close">×'
              '</button><div id="v-pic"></div><div class="side"><p id="v-prompt"></p>'
              '<p id="v-meta" class="note"></p><fieldset id="v-layers"></fieldset>'
              '<p class="note">← → other samples, Esc closes</p></div></div></div>'
              if data else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>factory report: {esc(os.path.basename(root.rstrip('/')) or root)}</title>
<style>{css}</style></head>
<body><header><h1>factory report: {esc(title)}</h1><p>{esc(root)}</p><nav>{nav}</nav></header>
<main>
{chr(10).join(sections)}
</main>
{viewer}
<script type="application/json" id="report-data">{_script_json(data)}</script>
<script>{js}</script>
</body></html>
"""
