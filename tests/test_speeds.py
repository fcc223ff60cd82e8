"""The stage speeds that size the `auto` pools come from the committed benchmark results
(factory/speeds.py): which file wins, and what a missing or broken file does."""

import json
import os
import pathlib

import pytest

import factory.pools
from factory.errors import FactoryError
from factory.options import RunOptions
from factory.speeds import LABEL_BATCH, MeasuredSpeeds, main, measured_speed

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("sd generator", "grounding head", "mask r-cnn")  # the names the pipelines look up


def write(folder: pathlib.Path, name: str, data) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def generate_result(images_per_s: float, device: str) -> dict:
    return {"device": device, "stage": {"images_per_s": images_per_s, "batch_size": 16}}


def test_the_pools_read_each_stage_from_a_committed_result_file_it_names():
    for stage in STAGES:
        speed = measured_speed(stage)
        path = ROOT / speed.source
        assert path.is_file() and RESULTS in path.parents  # committed, in benchmarks/results
        assert speed.card in path.as_posix()  # the card is named by the file or its folder
        data = json.loads(path.read_text())
        for key in speed.key.split("."):
            data = data[key]
        assert factory.pools.IMAGES_PER_S[stage] == data > 0


def test_the_grounding_labeller_is_read_at_the_batch_the_factory_labels_at():
    assert LABEL_BATCH == RunOptions.label_batch_size
    assert measured_speed("grounding head").batch_size == LABEL_BATCH


def test_the_h100_file_wins_over_the_h200_file(tmp_path):
    write(tmp_path, "generate-h200.json", generate_result(4.4, "NVIDIA H200"))
    assert measured_speed("sd generator", str(tmp_path)).card == "h200"
    write(tmp_path, "generate-h100.json", generate_result(4.1, "NVIDIA H100 80GB HBM3"))
    speed = measured_speed("sd generator", str(tmp_path))
    assert (speed.card, speed.images_per_s, speed.batch_size) == ("h100", 4.1, 16)
    assert speed.source.endswith("generate-h100.json") and speed.key == "stage.images_per_s"


def test_a_file_cut_short_before_its_figure_is_passed_over(tmp_path):
    # the float8 part ran on an H100 before the stage itself was timed there
    write(tmp_path, "generate-h100.json", {"device": "NVIDIA H100", "levers": [
        {"lever": "float8", "status": "compiling"}]})
    write(tmp_path, "generate-h200.json", generate_result(4.4, "NVIDIA H200"))
    assert measured_speed("sd generator", str(tmp_path)).card == "h200"


def test_the_stale_grounding_figure_is_used_only_without_a_new_one_and_says_so(tmp_path):
    write(tmp_path, "h200-b9f3fe7/label.json", {"labeller_images_per_s": {"8": 73.0, "32": 126.0}})
    old = measured_speed("grounding head", str(tmp_path))
    assert (old.images_per_s, old.batch_size) == (73.0, 8)
    assert old.note.startswith("stale") and "stale" in str(old)
    write(tmp_path, "label-h100.json", {"labeller_images_per_s": {"8": 40.0, "32": 60.0}})
    new = measured_speed("grounding head", str(tmp_path))
    assert (new.images_per_s, new.card, new.note) == (40.0, "h100", "")


def test_no_file_at_all_is_one_line_naming_the_files_tried(tmp_path):
    speeds = MeasuredSpeeds(str(tmp_path))
    with pytest.raises(FactoryError, match=r"no measured speed for the mask r-cnn stage .*"
                                           r"tried pipeline-h100.json, pipeline-h200.json; "
                                           r"run `bash benchmarks/gpu.sh`"):
        speeds["mask r-cnn"]


@pytest.mark.parametrize(("content", "message"), [
    ("{\"stage\": {\"images_per_s\": 4.4", "cannot read the sd generator stage's speed from"),
    ({"stage": {"images_per_s": "fast"}}, "holds no sd generator speed at stage.images_per_s "
                                          "\\(found 'fast'\\)"),
    ({"stage": {"images_per_s": 0}}, "holds no sd generator speed"),
    ({"stage": {"images_per_s": float("inf")}}, "holds no sd generator speed"),
])
def test_a_garbled_file_is_an_error_naming_it_not_skipped(tmp_path, content, message):
    write(tmp_path, "generate-h100.json", content)
    write(tmp_path, "generate-h200.json", generate_result(4.4, "NVIDIA H200"))  # not reached
    with pytest.raises(FactoryError, match=message) as e:
        measured_speed("sd generator", str(tmp_path))
    assert "generate-h100.json" in str(e.value)


def test_the_measured_speeds_behave_as_the_dict_the_callers_index(tmp_path):
    speeds = MeasuredSpeeds()
    assert tuple(speeds) == STAGES and len(speeds) == 3
    assert all(isinstance(speeds[s], float) for s in STAGES)
    assert "mask r-cnn" in speeds and "detectron" not in speeds
    assert speeds.get("detectron", 1.0) == 1.0
    # nothing is read before a figure is asked for: an empty folder fails only at the lookup
    empty = MeasuredSpeeds(str(tmp_path))
    assert list(empty) == list(STAGES)
    with pytest.raises(FactoryError):
        empty["sd generator"]


def test_the_table_cites_each_file(capsys):
    main([])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for stage, line in zip(STAGES, lines, strict=True):
        assert line.startswith(stage) and "images/s" in line
        assert os.path.join("benchmarks", "results") in line
