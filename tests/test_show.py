"""`factory.show` contact sheets and `factory.stats` histograms and plots, on hand-made folders of
both kinds (see `write_folder` in test_export.py)."""

import numpy as np
import pytest
from PIL import Image
from test_export import CLASSES, IDS, KINDS, SCORES, write_folder

from factory.show import IGNORE_GREY, ShowError, blend, class_colour, contact_sheet
from factory.stats import BINS, StatsError, dataset_stats, format_stats, plot_stats
from factory.store import ShardStore

SIZE = 64  # images and tiles: drawn unscaled, so every pixel can be predicted
GREY = 100
INNER = slice(20, 44)  # rows clear of the text strips at the top and bottom of a tile


@pytest.fixture(params=KINDS)
def grey_folder(request, tmp_path):
    images = np.full((len(CLASSES), SIZE, SIZE, 3), GREY, dtype=np.uint8)
    return request.param, *write_folder(tmp_path / request.param, request.param, h=SIZE, w=SIZE,
                                        images=images)


def expected_tile(masks, label, classes, colours):
    """A grey image with each class mask blended in its colour, ignore pixels in grey."""
    tile = np.full((SIZE, SIZE, 3), GREY, dtype=np.uint8)
    layers = [(m, colours[c]) for m, c in zip(masks, classes, strict=True)]
    if label is not None:
        layers.append((label == 255, IGNORE_GREY))
    for m, colour in layers:
        tile[m] = blend(tile[m], colour)
    return tile


def check_tiles(sheet, cols, samples, masks, labels):
    """The sheet's tiles are `samples` in order, each tinted where (and only where) its masks
    are, with colours given to classes in order of first appearance on the sheet."""
    colours = {}
    for i in samples:
        for c in CLASSES[i]:
            colours.setdefault(c, class_colour(len(colours)))
    assert len(set(colours.values())) == len(colours)
    for t, i in enumerate(samples):
        y, x = (t // cols) * SIZE, (t % cols) * SIZE
        got = sheet[y:y + SIZE, x:x + SIZE][INNER]
        want = expected_tile(masks[i], labels[i], CLASSES[i], colours)[INNER]
        np.testing.assert_array_equal(got, want)
        tinted = masks[i].any(0)[INNER]
        if labels[i] is not None:
            tinted |= labels[i][INNER] == 255
        assert (got[~tinted] == GREY).all() and (got[tinted] != GREY).any(-1).all()


def test_sheet_tints_masked_pixels_only_in_a_grid_of_n_tiles(grey_folder, tmp_path):
    kind, root, masks, labels, _ = grey_folder
    out = str(tmp_path / "sheet.png")
    assert contact_sheet(root, out, n=3, tile=SIZE).tiles == 3
    with Image.open(out) as im:
        assert (im.format, im.size) == ("PNG", (2 * SIZE, 2 * SIZE))  # 2 wide, 2 high
        sheet = np.asarray(im.convert("RGB"))
    check_tiles(sheet, 2, [0, 1, 2], masks, labels)
    assert (sheet[SIZE:, SIZE:] == 0).all()  # the fourth cell stays empty
    assert contact_sheet(root, out, tile=SIZE).tiles == 5  # n=16, but 5 samples
    with Image.open(out) as im:
        assert im.size == (3 * SIZE, 2 * SIZE)


def test_classes_filter_keeps_samples_naming_any_of_them(grey_folder, tmp_path):
    kind, root, masks, labels, _ = grey_folder
    out = str(tmp_path / "sheet.png")
    assert contact_sheet(root, out, classes=["dog"], tile=SIZE).tiles == 2
    with Image.open(out) as im:
        assert im.size == (2 * SIZE, SIZE)
        check_tiles(np.asarray(im.convert("RGB")), 2, [2, 4], masks, labels)
    assert contact_sheet(root, out, n=2, classes=["red panda", "dog"], tile=SIZE).tiles == 2
    with Image.open(out) as im:
        check_tiles(np.asarray(im.convert("RGB")), 2, [1, 2], masks, labels)


def test_classes_the_data_lacks_are_named_and_the_others_drawn(tmp_path, run_cli):
    """`factory show DIR --classes cat,dog` as the README writes it, on data without cats."""
    from factory.cli import main

    root, *_ = write_folder(tmp_path / "data", "triplets")
    out = tmp_path / "sheet.png"
    sheet = contact_sheet(root, str(out), classes=["unicorn", "dog"], tile=SIZE)
    assert (sheet.tiles, sheet.missing) == (2, ["unicorn"]) and out.exists()
    code, text, _ = run_cli(main, ["show", root, "--out", str(out), "--classes", "unicorn,dog"])
    assert code == 0 and text.strip().endswith("(no sample names 'unicorn')")


def test_unknown_class_names_and_empty_data_are_refused(tmp_path):
    root, *_ = write_folder(tmp_path / "data", "triplets")
    out = tmp_path / "sheet.png"
    with pytest.raises(ShowError, match=r"no sample names 'unicorn', 'yeti'; the data has: "
                                        r"cat, dog, red panda"):
        contact_sheet(root, str(out), classes=["unicorn", "yeti"])
    empty = ShardStore.create_or_resume(str(tmp_path / "empty"), {
        "kind": "triplets", "split": "pascal", "fold": "1", "n": 4, "shard_size": 2},
        seen=[], unseen=[], pairs={"source": "uniform"})
    with pytest.raises(ShowError, match="holds no samples yet"):
        contact_sheet(empty.root, str(out))
    assert not out.exists()


def expected_hist(values):
    counts = [0] * BINS
    for v in values:
        counts[min(int(float(v) * BINS), BINS - 1)] += 1
    return counts


@pytest.mark.parametrize("kind", KINDS)
def test_stats_histograms_count_what_the_shards_hold(tmp_path, kind):
    root, masks, *_ = write_folder(tmp_path / "data", kind, drop=[3])
    s = dataset_stats(root)
    kept = [0, 1, 2, 4]
    assert (s.kind, s.samples, s.dropped, s.shards_done) == (kind, 4, 1, 3)
    for name in IDS:
        at = [(i, CLASSES[i].index(name)) for i in kept if name in CLASSES[i]]
        c = s.per_class[name]
        assert c.samples == len(at) and c.empty == sum(not masks[i][k].any() for i, k in at)
        assert c.area_hist == expected_hist([masks[i][k].mean() for i, k in at])
        assert c.score_hist == expected_hist([np.float32(SCORES[i][k]) for i, k in at])  # as stored
    assert s.per_class["cat"].empty == 1 and sum(s.per_class["dog"].score_hist[9:]) == 1
    quality = [np.float32(np.mean(SCORES[i])) for i in kept]
    assert s.quality_hist == (expected_hist(quality) if kind == "segmentation" else None)
    text = format_stats(s)
    area_rows = text.split("mask area per class")[1].splitlines()
    assert area_rows[2].split() == ["cat", *map(str, s.per_class["cat"].area_hist)]
    assert "samples 4/5" in text and "class pairs: uniform" in text
    if kind == "segmentation":
        assert "grounding head 0123456789ab (step 7), threshold 0.5" in text
        assert "score per class (mean mask confidence" in text
        assert "(1 dropped: quality below 0.1)" in text
        assert text.splitlines()[-1].split() == ["images", *map(str, s.quality_hist)]
    else:
        assert "detector tiny (top oracle)" in text and "score per class (detector score)" in text


@pytest.mark.parametrize("kind", KINDS)
def test_plot_stats_writes_a_png_with_a_panel_per_histogram(tmp_path, kind):
    root, *_ = write_folder(tmp_path / "data", kind)
    path = tmp_path / "stats.png"
    plot_stats(dataset_stats(root), str(path))
    with Image.open(path) as im:  # 5 inches per panel at 100 dpi: area, score (, quality)
        assert (im.format, im.size) == ("PNG", ((3 if kind == "segmentation" else 2) * 500, 300))


def test_plot_stats_of_a_folder_without_samples_is_refused(tmp_path):
    empty = ShardStore.create_or_resume(str(tmp_path / "empty"), {
        "kind": "triplets", "split": "pascal", "fold": "1", "subset": "train", "n": 4,
        "shard_size": 2}, seen=["cat"], unseen=[], pairs={"source": "uniform"})
    with pytest.raises(StatsError, match="no samples"):
        plot_stats(dataset_stats(empty.root), str(tmp_path / "stats.png"))
    assert not (tmp_path / "stats.png").exists()
