"""The sections of `factory report`'s page about an output folder: the gallery (its frame; the
script fills it from the page's data), the per-class figures of `factory stats`, and the run as
its manifest and shard records tell it."""

from __future__ import annotations

import datetime

import numpy as np

from factory.report_html import BAR, count_bars, esc, heat, histogram, pairs, section, svg, table
from factory.stats import SCORE_MEANING, ClassStats, Stats, format_stats
from factory.store import ShardStore

LISTED = 200  # left-out samples listed one by one; the rest are counted
RATE_BINS = 30  # bars of the images/s chart


def run_line(run: dict) -> str:
    """A run in a few words: split, fold, subset and size."""
    return (f"{run.get('split')} fold {run.get('fold')}, subset {run.get('subset')}, "
            f"{run.get('n')} samples")


def gallery_section(store: ShardStore, s: Stats, per_class: int, shown: int) -> str:
    value = ("image quality" if store.kind == "segmentation"
             else "mean detector score over its classes")
    return section("gallery", "Gallery", f"""
<p class="note">{shown} of {s.samples} samples: at most {per_class} of each class, the same on
every run (picked by a fixed hash of the sample index, so spread over the whole folder); a
sample of two classes shows under both. Each mask is tinted in its class colour; click a
sample for its large view, where each mask can be switched off.</p>
<form id="filters" autocomplete="off">
<label>class <select id="f-class"><option value="">all classes</option></select></label>
<label>classes <select id="f-split"><option value="">seen and unseen</option>
<option value="seen">seen only</option><option value="unseen">with an unseen class</option>
</select></label>
<label>{esc(value)} from <input id="f-min" type="number" min="0" max="1" step="0.05"
 value="0"> to <input id="f-max" type="number" min="0" max="1" step="0.05" value="1"></label>
<span id="shown"></span>
</form>
<div id="tiles"></div>
<noscript><p>The gallery needs JavaScript.</p></noscript>""")


def figures_section(s: Stats) -> str:
    names = [n for n in s.listed() if s.per_class.get(n, ClassStats()).samples]
    if not names:
        body = "<p>No samples yet: nothing to count.</p>"
    else:
        rows = [(n, s.per_class.get(n, ClassStats()), n in s.seen) for n in s.listed()]
        body = ("<h3>Samples per class, and the share with an empty mask</h3>"
                + count_bars(rows)
                + '<div class="cols"><div><h3>Mask area, as a share of the image (empty '
                  'masks in the first bin); masks per bin</h3>'
                + heat(names, [s.per_class[n].area_hist for n in names], s.seen)
                + f"</div><div><h3>Score ({esc(SCORE_MEANING[s.kind])}); masks per "
                  "bin</h3>"
                + heat(names, [s.per_class[n].score_hist for n in names], s.seen) + "</div>")
        if s.quality_hist is not None:
            body += ("<div><h3>Image quality (mean score over its classes); images per bin"
                     "</h3>" + histogram(s.quality_hist) + "</div>")
        body += "</div>"
    return section("figures", "Figures", body + (
        "<details><summary>These numbers as <code>factory stats</code> prints them</summary>"
        f"<pre>{esc(format_stats(s))}</pre></details>"))


def run_section(store: ShardStore, s: Stats) -> str:
    m = store.manifest
    done = s.shards_done
    parts = [f"<p>{esc(store.kind)} folder <code>{esc(store.root)}</code>, made "
             f"{esc(m.get('created', 'at an unrecorded time'))}: {done} of {store.num_shards} "
             f"shards done, {s.samples} of {m['run']['n']} samples.</p>",
             '<div class="cols"><div><h3>Arguments</h3>',
             pairs(m["arguments"]) if m.get("arguments") else
             "<p>Not recorded (a folder written by hand or by an older version).</p>",
             '</div><div><h3>Run (what defines the data)</h3>', pairs(m["run"]),
             '</div><div><h3>Resolved (precision, weights, libraries)</h3>',
             pairs(m["resolved"]) if m.get("resolved") else "<p>Not recorded.</p>",
             "<h3>Packages</h3>",
             pairs(m["packages"]) if m.get("packages") else "<p>Not recorded.</p>",
             "</div></div>",
             "<h3>Pools</h3>", _pools(m.get("pools")),
             "<h3>Images per second</h3>", _rate(store),
             "<h3>Left out</h3>", _left_out(store),
             "<h3>Drift accepted</h3>", _drift(m.get("drift", []))]
    return section("run", "Run", "\n".join(parts))


def _pools(pools: dict | None) -> str:
    """The actor pools of the folder's last run, as the manifest records them."""
    if not pools:
        return ("<p>Not recorded: the manifest keeps no pools (a folder written by hand or by an "
                "older version).</p>")
    keys = list(dict.fromkeys(k for p in pools.values() for k in p))
    rows = [[kind, *((", ".join(map(str, v)) or "—") if isinstance(v, list)
                     else "—" if v is None else v for v in (p.get(k) for k in keys))]
            for kind, p in pools.items()]
    busy = any("busy" in p for p in pools.values())
    return ("<p class=note>As the folder's last run got them.</p>"
            + table(["pool", *(k.replace("_", " ") for k in keys)], rows)
            + ("" if busy else "<p>The busy share of each pool's actors is not recorded in the "
               "manifest (the run's last console line gives it).</p>"))


def _rate(store: ShardStore) -> str:
    """Images/s over time from the shard records' write times, and the writing nodes."""
    records = [r for r in store.records.values() if "written_at" in r]
    if not records:
        return ("<p>Not recorded: the shard records hold no write times (a folder written by "
                "hand).</p>")
    records.sort(key=lambda r: r["written_at"])
    times = np.array([r["written_at"] for r in records])
    rows = np.array([r["rows"] for r in records])
    start = times[0]
    created = store.manifest.get("created")
    if created:
        start = min(start, datetime.datetime.fromisoformat(created).timestamp())
    span = times[-1] - start
    note = ("<p class=note>Each shard's record holds the time it was written, after both "
            "stages made its rows: the rate below is the pipeline's (generator and labeller "
            "together); the stages' own rates are on the run's console only. A resumed run "
            f"shows its pause. First write {_clock(times[0])}, last {_clock(times[-1])}, "
            f"{rows.sum()} images in {len(records)} shards"
            + (f", {rows.sum() / span:.2f} images/s since the folder was made" if span > 0
               else "") + ".</p>")
    chart = ""
    if span > 0:
        counts, edges = np.histogram(times, bins=RATE_BINS, range=(start, times[-1]),
                                     weights=rows)
        width = span / RATE_BINS
        rates = counts / width
        top = max(rates.max(), 1e-9)
        bw, h = 16, 120
        bars = []
        for b, r in enumerate(rates):
            bh = h * r / top
            bars.append(f'<rect x="{50 + b * bw}" y="{10 + h - bh:.1f}" width="{bw - 2}" '
                        f'height="{bh:.1f}" fill="{BAR}"><title>{_duration(edges[b] - start)}'
                        f"-{_duration(edges[b + 1] - start)}: {r:.2f} images/s</title></rect>")
        bars.append(f'<text x="46" y="18" text-anchor="end" class="muted">{top:.2f}</text>'
                    f'<text x="46" y="{10 + h}" text-anchor="end" class="muted">0</text>'
                    f'<text x="50" y="{h + 26}" class="muted">0:00</text>'
                    f'<text x="{50 + RATE_BINS * bw}" y="{h + 26}" text-anchor="end" '
                    f'class="muted">{_duration(span)} (images/s over time)</text>')
        chart = svg(60 + RATE_BINS * bw, h + 32, "".join(bars))
    nodes: dict[str, list] = {}
    for r in records:
        row = nodes.setdefault(r.get("node", "not recorded"), [0, 0, 0, 0])
        row[0] += 1
        row[1] += r["rows"]
    for r in records:
        for i, stage in ((2, "generators"), (3, "labellers")):
            for node in r.get(stage, []):
                nodes.setdefault(node, [0, 0, 0, 0])[i] += 1
    by_node = table(["Ray node", "shards written", "images written", "shards it generated for",
                     "shards it labelled for"],
                    [[n, *v] for n, v in sorted(nodes.items())], numeric={1, 2, 3, 4})
    return note + chart + by_node


def _clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    """Time since the folder was made on the chart's axis: rounded, "m:ss" or "h:mm:ss" (the
    console's `_duration` truncates, pads the minutes and writes an ETA's "--:--")."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _left_out(store: ShardStore) -> str:
    run = store.manifest["run"]
    dropped, failed = store.dropped, store.failed
    if not dropped and not failed:
        return "<p>None: every finished shard holds all its samples.</p>"
    out = []
    if dropped:
        why = (f"image quality below --min-quality {run['min_quality']}"
               if run.get("min_quality") is not None else "left out on purpose")
        out.append(f"<p>{len(dropped)} dropped ({esc(why)}).</p>")
        out.append(table(["sample", "reason"], [[i, why] for i in dropped[:LISTED]],
                         numeric={0}))
    if failed:
        out.append(f"<p>{len(failed)} failed: a stage kept raising on them "
                   "(--max-failed-samples).</p>")
        out.append(table(["sample", "stage", "error"],
                         [[f["index"], f["stage"], f["error"]] for f in failed[:LISTED]],
                         numeric={0}))
    more = max(len(dropped), len(failed)) - LISTED
    if more > 0:
        out.append(f"<p class=note>The first {LISTED} of each are listed; the manifest's "
                   "`dropped` and `failed` hold them all.</p>")
    return "".join(out)


def _drift(drift: list[dict]) -> str:
    if not drift:
        return "<p>None: every run of this folder resolved the same.</p>"
    rows = [[d.get("at"), k, d.get("from", {}).get(k), v] for d in drift
            for k, v in d.get("to", {}).items()]
    return ("<p>Resumed with --allow-drift, so the samples mix what the runs resolved:</p>"
            + table(["resumed at", "what", "before", "after"], rows))
