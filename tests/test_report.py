"""`factory report`: the page of an output folder, read as text (escaping, the picks, bounded
memory, the numbers of `factory stats`, the run and Protocol sections, bad input) and in a real
headless Chromium (loads from file:// offline and without errors, filters, the large view, the
figures), which also takes the README's screenshot (docs/report.png).

The browser tests need Chromium at /usr/bin/chromium (the OS package, driven by Playwright's
Python package; no `playwright install`). Without it they skip, saying how to install it; with
FACTORY_REQUIRE_BROWSER=1 (set by .ci/run) they fail instead."""

import html
import json
import logging
import os
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.batch import object_column
from eval.protocol1 import write_report as write_protocol1
from eval.protocol2 import PAPER_TABLE2
from eval.protocol2 import markdown as protocol2_markdown
from eval.protocol2 import write_report as write_protocol2
from eval.table import PAPER_TABLE1_AVERAGES, ProtocolTable
from factory.cli import main
from factory.console import Progress
from factory.report import RATE_BINS, REPORT_DIR, make_report, pick_keys
from factory.schema import encode_masks, to_segmentation, to_triplets
from factory.stats import dataset_stats, format_stats
from factory.store import ShardStore

HOSTILE = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"
T0 = 1_700_000_000.0  # the first shard's write time in hand-made folders
ARROW_POOLS = []  # the memory test's proxy pools, kept for the life of the process


def write_folder(root, classes, *, seen, unseen, kind="triplets", shard_size=4, size=16,
                 prompts=None, drop=(), failed=None) -> str:
    """A hand-made output folder, one sample per entry of `classes` (class-name lists), random
    images and masks (sample 0's first mask empty), in shards whose records carry a node and a
    write time (shard k at T0 + 10 k s, by node-0 or node-1). `drop`: samples left out below
    --min-quality (segmentation); `failed`: {index: error} left out by a failing stage."""
    rng = np.random.default_rng(0)
    n = len(classes)
    names = list(dict.fromkeys([*seen, *unseen]))
    ids = {c: i + 1 for i, c in enumerate(names)}
    masks = [rng.random((len(c), size, size)) < 0.3 for c in classes]
    masks[0][0] = False
    scores = [rng.uniform(0.5, 1.0, len(c)).round(2).tolist() for c in classes]
    batch = {
        "index": np.arange(n, dtype=np.int64),
        "prompt": np.array(prompts or ["a photograph of a " + " and a ".join(c) for c in classes],
                           dtype=object),
        "noise_seed": np.arange(n, dtype=np.int64),
        "classes": object_column(classes),
        "class_ids": object_column([[ids[c] for c in cs] for cs in classes]),
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "x_t": np.zeros((n, 4, 2, 2), dtype=np.float16),
        "t": np.ones(n, dtype=np.int32),
        "masks": object_column([encode_masks(m) for m in masks]),
        "scores": object_column(scores),
        "areas": object_column([m.sum((1, 2)).tolist() for m in masks]),
    }
    meta = dict(split="open", fold="open", run_seed=0, sd_model="tiny")
    run = {"kind": kind, "split": "open", "fold": "open", "n": n, "shard_size": shard_size,
           "model": "tiny"}
    if kind == "segmentation":
        labels = np.zeros((n, size, size), dtype=np.uint8)
        for i, (m, cs) in enumerate(zip(masks, classes, strict=True)):
            for mask, c in zip(m, cs, strict=True):
                labels[i][mask] = ids[c]
            labels[i][:2] = 255  # an ignore band
        batch.update(label=labels, quality=np.array([np.mean(s) for s in scores], np.float32))
        table = to_segmentation(batch, checkpoint="head", subset="label", **meta)
        run.update(subset="label", checkpoint="0123456789abcdef", threshold=0.5,
                   min_quality=0.6)
    else:
        table = to_triplets(batch, detector="tiny", subset="train", **meta)
        run.update(subset="train", detector="tiny", oracle="union")
    store = ShardStore.create_or_resume(
        str(root), run, seen=list(seen), unseen=list(unseen), pairs={"source": "uniform"},
        categories=[{"id": ids[c], "name": c} for c in names])
    failed = failed or {}
    for k in range(store.num_shards):
        rows = store.shard_rows(k)
        keep = [i for i in rows if i not in drop and i not in failed]
        node = f"node-{k % 2}"
        store.add_records({k: store.layout.write(
            k, table.take(keep), [i for i in rows if i in drop],
            [{"index": i, "stage": "labeller", "error": failed[i]} for i in rows if i in failed],
            node=node, written_at=T0 + 10 * k, generators=[node], labellers=["node-0"])})
    store.compact()
    return store.root


def page_data(page: str) -> dict:
    """The gallery's JSON in a written page."""
    text = Path(page).read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text,
                     re.S)
    return json.loads(blob.group(1))


def files_under(root) -> dict[str, int | None]:
    """Every file (its size) and folder (None) below `root`."""
    found = {}
    for d, folders, files in os.walk(root):
        found.update({os.path.relpath(os.path.join(d, f), root): None for f in folders})
        found.update({os.path.relpath(os.path.join(d, f), root): os.path.getsize(
            os.path.join(d, f)) for f in files})
    return found


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[str, str]:
    """A folder whose class names, prompts and path would be markup if not escaped, and its
    page, written under a file name that needs quoting in a URL."""
    names = [HOSTILE, "cat & dog", 'say "hi"']
    classes = [[HOSTILE], [HOSTILE, "cat & dog"], ['say "hi"'], ["cat & dog"]]
    prompts = [f"</script><img src=x onerror=alert(2)> {' and '.join(c)}" for c in classes]
    base = tmp_path_factory.mktemp("hostile")
    root = write_folder(base / "run <i>1</i>", classes, seen=names[:2], unseen=names[2:],
                        prompts=prompts)
    return root, make_report(root, out=str(base / "my report #1.html")).page


# ---------------------------------------------------------------- the page as text


def test_strings_from_the_data_reach_the_page_as_text(hostile):
    root, page = hostile
    text = Path(page).read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<img src=x" not in text and "<i>1</i>" not in text
    assert text.count("<script") == 2  # the gallery's data and the page's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # e.g. the figures' class labels
    assert "run &lt;i&gt;1&lt;/i&gt;" in text and "cat &amp; dog" in text
    data = page_data(page)
    assert set(data["classes"]) == {HOSTILE, "cat & dog", 'say "hi"'}
    assert [s["prompt"] for s in data["samples"]][0].startswith("</script><img src=x")
    assert data["samples"][0]["img"].startswith("my%20report%20%231_files/")
    assert os.path.isfile(os.path.join(os.path.dirname(page), "my report #1_files",
                                       "000000000.webp"))


def test_each_class_brings_at_most_k_picks_spread_over_the_folder_whatever_the_shards(tmp_path):
    rng = np.random.default_rng(1)
    names = ["cat", "dog", "bird", "cow"]
    classes = [list(rng.choice(names, size=1 + i % 2, replace=False)) for i in range(60)]
    k = 3
    keys = pick_keys(np.arange(60))
    expected = set()
    for c in names:  # of each class, the k samples naming it with the lowest keys
        expected |= set(sorted((i for i in range(60) if c in classes[i]),
                               key=lambda i: keys[i])[:k])
    pages = {}
    for shard_size in (4, 7):
        root = write_folder(tmp_path / f"by-{shard_size}", classes, seen=names[:3],
                            unseen=names[3:], shard_size=shard_size)
        r = make_report(root, per_class=k)
        shown = [s["index"] for s in page_data(r.page)["samples"]]
        assert shown == sorted(expected) and (r.shown, r.samples) == (len(expected), 60)
        pictures = files_under(os.path.join(root, REPORT_DIR, "index_files"))
        assert sorted(p for p in pictures if p.endswith(".webp")) == [
            f"{i:09d}.webp" for i in shown]
        before = Path(r.page).read_bytes()
        make_report(root, per_class=k)  # again: the same page, pictures replaced
        assert Path(r.page).read_bytes() == before
        assert files_under(os.path.join(root, REPORT_DIR, "index_files")) == pictures
        figures = before.decode().split('<section id="figures">')[1].split("<details>")[0]
        pages[shard_size] = ([{key: v for key, v in s.items() if key != "file"}  # shard name
                              for s in page_data(r.page)["samples"]], figures)
    assert pages[4] == pages[7]  # the same samples and pictures, the same figures
    assert len(expected) <= k * len(names) and max(expected) >= 30  # not just the first rows
    for c in names:
        assert sum(c in classes[i] for i in expected) >= k


def test_memory_stays_bounded_as_the_folder_grows(tmp_path, record_property):
    """Peak Python (tracemalloc) and Arrow (a proxy pool) memory of a report, on folders of 10
    and 40 shards of 32 samples: reading the folder whole would grow both with it."""
    names = ["cat", "dog"]

    def peak(shards: int) -> tuple[int, int]:
        classes = [[names[i % 2]] for i in range(32 * shards)]
        root = write_folder(tmp_path / f"s{shards}", classes, seen=names, unseen=[],
                            shard_size=32, size=8)
        pool = pa.proxy_memory_pool(pa.default_memory_pool())
        ARROW_POOLS.append(pool)  # never freed: buffers it allocated may outlive the test
        before = pa.default_memory_pool()
        pa.set_memory_pool(pool)
        tracemalloc.start()
        try:
            make_report(root, per_class=2)
            python = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            pa.set_memory_pool(before)
        return python, pool.max_memory()

    peak(10)  # first: the imports and caches of a first report
    small, large = peak(10), peak(40)
    record_property("peak_bytes_10_shards_python_arrow", small)
    record_property("peak_bytes_40_shards_python_arrow", large)
    print(f"peak memory (Python, Arrow): 10 shards {small}, 40 shards {large}")
    assert large[0] < 1.25 * small[0] and large[1] < 1.25 * small[1], (small, large)


def test_each_pass_over_a_long_folder_shows_a_progress_line_and_its_end(tmp_path, monkeypatch,
                                                                       caplog):
    """A pass's line comes when due (30 s in a log, 1 s on a terminal): due at once here."""
    root = write_folder(tmp_path / "data", [["cat"], ["dog"]] * 6, seen=["cat", "dog"],
                        unseen=[])
    monkeypatch.setattr(Progress, "due", lambda self: True)
    caplog.set_level(logging.INFO, logger="factory.console")
    make_report(root, per_class=1)
    lines = [r.getMessage().split() for r in caplog.records if r.name == "factory.console"]
    assert [w[2] for w in lines if w[:2] == ["samples", "read"]] == [
        "4/12", "8/12", "12/12", "12/12"]  # after each shard, then at the end
    assert [w[2] for w in lines if w[:2] == ["samples", "drawn"]] == ["1/2", "2/2", "2/2"]


def test_figures_hold_the_numbers_of_factory_stats(tmp_path):
    classes = [["cat"], ["cat", "dog"], ["dog"], ["owl"], ["cat", "owl"], ["dog"], ["cat"]]
    root = write_folder(tmp_path / "seg", classes, seen=["cat", "dog"], unseen=["owl"],
                        kind="segmentation", drop=[3])
    text = Path(make_report(root).page).read_text(encoding="utf-8")
    s = dataset_stats(root)
    bars = re.findall(r"<title>([^<]*?)(?: \(unseen\))?: (\d+) samples, (\d+) with an empty "
                      r"mask</title>", text)
    assert bars == [(n, str(s.per_class[n].samples), str(s.per_class[n].empty))
                    for n in ("cat", "dog", "owl")]
    assert s.per_class["cat"].empty == 1  # sample 0's empty mask
    cells = [int(v) for v in re.findall(r"<title>[^<]*, \d\.\d-\d\.\d: (\d+)</title>", text)]
    heat = [cells[i:i + 10] for i in range(0, len(cells), 10)]  # area rows, score rows, quality
    names = ["cat", "dog", "owl"]
    assert heat[:3] == [s.per_class[n].area_hist for n in names]
    assert heat[3:6] == [s.per_class[n].score_hist for n in names]
    qualities = [int(v) for v in re.findall(r"<title>\d\.\d-\d\.\d: (\d+)</title>", text)]
    assert qualities == s.quality_hist and sum(qualities) == 6
    assert f"<pre>{html.escape(format_stats(s))}</pre>" in text
    assert "Pools</h3>\n<p>Not recorded: the manifest keeps no pools" in text


def test_the_run_section_tells_times_nodes_left_out_samples_and_drift(tmp_path):
    classes = [["cat"], ["dog"], ["cat", "dog"]] * 4
    root = write_folder(tmp_path / "seg", classes, seen=["cat"], unseen=["dog"],
                        kind="segmentation", drop=[2, 5],
                        failed={7: "ValueError: boom <b>"})
    store = ShardStore.open(root)
    store.record("resolved", {"precision": "float32", "sd_weights": "tiny"})
    store.record("drift", [{"at": "2026-01-02T03:04:05+0000", "from": {"precision": "float32"},
                            "to": {"precision": "bfloat16"}}])
    store.record("pools", {"generator": {"actors": 2, "gpus_each": 0.8, "devices": ["cuda"],
                                         "nodes": ["node-0", "node-1"]},
                           "labeller": {"actors": 1, "gpus_each": 0.2, "devices": ["cuda"],
                                        "nodes": ["node-0"]}})
    text = Path(make_report(root).page).read_text(encoding="utf-8")
    run = text.split('<section id="run">')[1].split("</section>")[0]
    assert "2 dropped (image quality below --min-quality 0.6)" in run
    assert re.search(r"<td class=num>5</td><td>image quality below", run)
    assert "<td class=num>7</td><td>labeller</td><td>ValueError: boom &lt;b&gt;</td>" in run
    assert "<td>precision</td><td>float32</td><td>bfloat16</td>" in run
    assert ("<tr><td>generator</td><td>2</td><td>0.8</td><td>cuda</td><td>node-0, node-1</td>"
            "</tr><tr><td>labeller</td><td>1</td><td>0.2</td><td>cuda</td><td>node-0</td></tr>"
            ) in run
    assert "The busy share of each pool's actors is not recorded in the manifest" in run
    assert "<td>precision</td><td>float32</td>" in run  # resolved
    # 9 images in 3 shards written 10 s apart, the first at T0: 9 / 20 s since the first write
    assert "9 images in 3 shards, 0.45 images/s since the folder was made" in run
    chart = run.split("images/s over time")[0].rsplit("<svg", 1)[1]
    assert chart.count("<rect") == RATE_BINS
    # shards 0 and 2 (3 and 4 rows) by node-0, shard 1 (2 rows) by node-1; all labelled on node-0
    assert ("<tr><td>node-0</td><td class=num>2</td><td class=num>7</td><td class=num>2</td>"
            "<td class=num>3</td></tr>") in run
    assert ("<tr><td>node-1</td><td class=num>1</td><td class=num>2</td><td class=num>1</td>"
            "<td class=num>0</td></tr>") in run


def protocol_reports(folder) -> tuple[dict, dict]:
    """A Protocol I and a Protocol II report written as their commands write them."""
    table = ProtocolTable(["grounding head"], ["cat"], ["dog"])
    gt = np.zeros((1, 4, 4), dtype=bool)
    gt[0, :2] = True
    table.update("grounding head", ["cat"], gt, gt)  # One/Seen: 100
    pred = np.zeros_like(gt)
    pred[0, :1] = True
    table.update("grounding head", ["dog"], pred, gt)  # One/Unseen: 50
    paper = PAPER_TABLE1_AVERAGES["pascal"]
    p1 = {"split": "pascal", "fold": "1", "samples": 3, "kept": 2, "mask_rule": "independent",
          **json.loads(table.to_json()), "paper_reference": paper,
          "markdown": table.to_markdown(paper)}
    write_protocol1(p1, str(folder / "protocol1.json"))
    p2 = {"dataset": "voc", "fold": "1", "images": 8, "seen": ["aeroplane"], "unseen": ["car"],
          "predictions": None, "checkpoint": "m", "conventions": {"voc20": {
              "seen": 61.3, "unseen": 40.7, "harmonic": 48.9,
              "per_class": {"aeroplane": 61.3, "car": 40.7}}}}
    p2["markdown"] = protocol2_markdown(p2)
    write_protocol2(p2, str(folder / "protocol2.json"))
    return p1, p2


def test_protocol_results_alone_make_a_page_with_the_papers_rows_marked(tmp_path):
    protocol_reports(tmp_path)
    r = make_report(str(tmp_path))
    assert r.protocols == ["protocol1.json", "protocol2.json"] and r.shown == 0
    text = Path(r.page).read_text(encoding="utf-8")
    assert 'id="gallery"' not in text and '<a href="#protocols">' in text
    assert "Protocol I: pascal fold 1, 2 of 3 test samples" in text
    assert ("<tr><td>grounding head</td><td class=num>100.00</td><td class=num>50.00</td>"
            "<td class=num>–</td>") in text
    assert "<tr class=paper><td>ours (paper)</td><td class=num>90.30</td>" in text
    assert "Mask rule: independent." in text
    assert "Protocol II: VOC fold 1, 8 val images" in text
    assert "<td class=num>61.3</td><td class=num>40.7</td><td class=num>48.9</td>" in text
    assert "<tr class=paper><td>C (paper, the mixture)</td><td class=num>69.5</td>" in text
    assert "<td>car (unseen)</td><td class=num>40.7</td>" in text
    assert text.count("<tr class=paper>") == len(PAPER_TABLE1_AVERAGES["pascal"]) + len(
        PAPER_TABLE2["voc"])  # and no other row


@pytest.fixture
def damaged(tmp_path) -> str:
    """A folder whose second shard is cut in half."""
    root = write_folder(tmp_path / "data", [["cat"], ["dog"]] * 4, seen=["cat", "dog"],
                        unseen=[])
    shard = ShardStore.open(root).shard_path(1)
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[:len(data) // 2])
    return root


@pytest.mark.parametrize("argv, error", [
    (["report", "{tmp}"], "is not a factory output folder (no manifest.json) and holds no "
                          "Protocol I/II results"),
    (["report", "{damaged}"], "cannot read shard shard-00001-of-00002.parquet of"),
    (["report", "{damaged}", "--out", "{tmp}/page.html"], "cannot read shard shard-00001-of-"),
    (["report", "{damaged}", "--out", "{tmp}/missing/page.html"], "no folder"),
    (["report", "{damaged}", "--out", "{tmp}"], "is a folder"),
    (["report", "{damaged}", "--per-class", "0"], "--per-class must be at least 1, got 0"),
    (["report", "{tmp}/nowhere"], "no folder"),
    (["report", "{half}"], "cannot read {half}/manifest.json: Expecting"),
], ids=["not-a-factory-folder", "unreadable-shard", "unreadable-shard-out-in-a-folder",
        "out-in-a-missing-folder", "out-is-a-folder", "per-class-0", "missing-folder",
        "half-written-manifest"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, damaged, run_cli, argv,
                                                         error):
    (tmp_path / "notes.txt").write_text("not a factory folder")
    half = tmp_path / "half"  # a manifest cut off mid-write
    half.mkdir()
    (half / "manifest.json").write_text('{"run": {"n": 4')
    argv = [a.format(tmp=tmp_path, damaged=damaged, half=half) for a in argv]
    error = error.format(half=half)
    before = files_under(tmp_path)
    code, out, err = run_cli(main, argv)
    assert code == 2 and out == "", err
    assert len(err.splitlines()) == 1 and err.startswith("factory: error: ") and error in err
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------- the page in a browser


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        why = (f"the browser tests need Chromium at {CHROMIUM}: install it with "
               "`sudo apt-get install -y chromium` (Debian, Ubuntu)")
        if os.environ.get("FACTORY_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (FACTORY_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """Opens a page from file:// and records its console errors, requests and dialogs."""
    pages = []

    def go(path: str):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        seen = {"errors": [], "requests": [], "dialogs": []}
        page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
        page.goto(Path(path).as_uri(), wait_until="load")
        pages.append(page)
        return page, seen

    yield go
    for page in pages:
        page.close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_generator) -> str:
    """A `factory generate --subset test --detector test-bright-pixels` folder of 8 samples,
    made by the same stages in this process instead of through Ray: tiny SD images, the
    bright-pixel masks (never all empty), shards of 4 whose records carry write times."""
    from actors.maskrcnn_labeller import MaskRCNNLabeller
    from actors.names import TEST_DETECTOR
    from factory.prompts import SamplePlan
    from factory.vocab import VOCABULARIES, get_split

    split, vocab, n = get_split("pascal", "1"), VOCABULARIES["pascal"], 8
    specs = [SamplePlan(split, "test", 0).sample(i) for i in range(n)]
    batch = tiny_generator({"prompt": np.array([s.prompt for s in specs], dtype=object),
                            "noise_seed": np.array([s.noise_seed for s in specs])})
    batch.update(index=np.arange(n), classes=object_column([list(s.classes) for s in specs]),
                 class_ids=object_column([[vocab.id_of(c) for c in s.classes] for s in specs]))
    batch = MaskRCNNLabeller("pascal", detector=TEST_DETECTOR)(batch)
    table = to_triplets(batch, detector=TEST_DETECTOR, split="pascal", fold="1", subset="test",
                        run_seed=0, sd_model="tiny")
    run = {"kind": "triplets", "split": "pascal", "fold": "1", "subset": "test", "n": n,
           "seed": 0, "shard_size": 4, "model": "tiny", "detector": TEST_DETECTOR,
           "oracle": "union", "score_threshold": 0.5, "steps": 5, "guidance": 7.5,
           "feature_step": 4, "precision": "auto"}
    store = ShardStore.create_or_resume(
        str(tmp_path_factory.mktemp("generated") / "pascal-test"), run, seen=list(split.seen),
        unseen=list(split.unseen), pairs={"source": "uniform", "path": None, "count": None},
        arguments={**run, "batch_size": 4, "generators": "auto", "labellers": "auto"})
    store.record("resolved", {"precision": "float32", "sd_weights": "tiny", "torch": "x"})
    start = time.time()
    for k in range(store.num_shards):
        store.add_records({k: store.layout.write(k, table.slice(4 * k, 4), node="node-a",
                                                 written_at=start + 5 * k,
                                                 generators=["node-a"], labellers=["node-a"])})
    store.compact()
    return store.root


@pytest.fixture(scope="module")
def generated_page(generated) -> str:
    return make_report(generated).page


def tiles_shown(page) -> list[tuple[bool, list[str]]]:
    """Each tile: (visible, its class names)."""
    return page.eval_on_selector_all(".tile", "ts => ts.map(t => [!t.hidden, "
                                     "[...t.querySelectorAll('.chip .name')].map(n => "
                                     "n.textContent)])")


def test_the_page_loads_from_file_offline_without_errors(open_page, generated_page):
    page, seen = open_page(generated_page)
    page.wait_for_function("() => [...document.querySelectorAll('.tile img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
    assert seen["errors"] == [] and seen["dialogs"] == []
    assert seen["requests"] and all(u.startswith("file://") for u in seen["requests"])
    assert "://" not in Path(generated_page).read_text(encoding="utf-8")  # no URL at all
    assert page.locator(".tile").count() == 8
    assert page.locator("#shown").text_content() == "8 of 8 samples shown"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.locator("#gallery").screenshot(path=str(SCREENSHOT))  # the README's picture (the
    # gallery alone: the header names the folder, a new temporary path on every run)


def test_filters_leave_exactly_the_matching_tiles(open_page, generated_page):
    page, seen = open_page(generated_page)
    data = page_data(generated_page)
    page.select_option("#f-class", "bus")
    tiles = tiles_shown(page)
    assert all(visible == ("bus" in names) for visible, names in tiles), tiles
    shown = sum(v for v, _ in tiles)
    assert 0 < shown < len(tiles)
    assert page.locator("#shown").text_content() == f"{shown} of 8 samples shown"
    page.select_option("#f-class", "")
    page.select_option("#f-split", "unseen")
    unseen = {n for n, c in data["classes"].items() if not c["seen"]}
    tiles = tiles_shown(page)
    assert all(visible == bool(unseen & set(names)) for visible, names in tiles)
    assert 0 < sum(v for v, _ in tiles) < len(tiles)
    page.select_option("#f-split", "")
    low = sorted(s["value"] for s in data["samples"])[4]
    page.fill("#f-min", str(low))
    visible = page.eval_on_selector_all(".tile", "ts => ts.map(t => !t.hidden)")
    assert visible == [s["value"] >= low for s in data["samples"]]
    assert seen["errors"] == []


def test_a_tile_opens_its_large_view_with_each_mask_switchable(open_page, generated_page):
    page, seen = open_page(generated_page)
    data = page_data(generated_page)
    at = next(i for i, s in enumerate(data["samples"]) if len(s["classes"]) == 2)
    tile = page.locator(".tile").nth(at)
    small = tile.locator("img.image").bounding_box()
    assert not page.locator("#viewer").is_visible()
    tile.click()
    assert page.locator("#viewer").is_visible()
    assert page.locator("#v-prompt").text_content() == data["samples"][at]["prompt"]
    big = page.locator("#v-pic img.image")
    assert big.get_attribute("src") == data["samples"][at]["img"]
    assert big.bounding_box()["width"] > 2 * small["width"]
    masks = page.locator("#v-pic img.mask")
    assert masks.count() == 2 and masks.nth(0).is_visible() and masks.nth(1).is_visible()
    page.locator('#v-layers input[data-layer="1"]').uncheck()
    assert masks.nth(0).is_visible() and not masks.nth(1).is_visible()
    assert page.locator("#v-layers .chip .name").all_text_contents() == data["samples"][at][
        "classes"]
    page.keyboard.press("Escape")
    assert not page.locator("#viewer").is_visible()
    assert seen["errors"] == []


def test_the_figures_are_drawn(open_page, generated_page, generated):
    page, _ = open_page(generated_page)
    svgs = page.locator("#figures svg")
    assert svgs.count() == 3  # samples per class, mask area, score
    for i in range(3):
        box = svgs.nth(i).bounding_box()
        assert box["width"] > 100 and box["height"] > 50
        assert svgs.nth(i).locator("rect").count() > 0
    area = svgs.nth(1).locator("text").all_text_contents()
    counts = [int(t) for t in area if t.isdigit()]  # the cell labels
    stats = dataset_stats(generated)
    assert sum(counts) == stats.masks and stats.empty_masks < stats.masks  # masks to look at
    assert page.locator("#run svg rect").count() == RATE_BINS  # images/s over time


def test_a_hostile_class_name_shows_as_text(open_page, hostile):
    _, path = hostile
    page, seen = open_page(path)
    page.wait_for_function("() => document.querySelector('.tile img').naturalWidth > 0",
                           timeout=10_000)
    assert seen["dialogs"] == [] and seen["errors"] == []
    assert page.evaluate("document.scripts.length") == 2
    assert HOSTILE in page.locator("#tiles .chip .name").all_text_contents()
    assert HOSTILE in page.locator("#f-class option").all_text_contents()
    assert page.locator("#figures text", has_text=HOSTILE).count() >= 1
    assert page.locator(".tile .prompt").first.text_content().startswith("</script><img")

