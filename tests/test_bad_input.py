"""Bad input to every command (issue 15, part 7): one table of cases, each of which must be
refused with exit status 2 and one line on stderr (`NAME: error: ...`, no traceback), before any
Ray start or model work, writing nothing: the --out path stays absent, and every folder the case
could touch (the shared samples, the case's own tmp_path) is byte-for-byte unchanged."""

import hashlib
import json
import logging
import os
import shutil
import sys

import pytest
import torch
from conftest import KNOWN_CLASSES, known_masks, write_triplets

from eval.protocol1 import main as protocol1_main
from factory.cli import main as factory_main
from factory.store import MANIFEST, ShardStore
from train.grounding.checkpoint import HEAD_INFO, HEAD_WEIGHTS
from train.grounding.job import main as job_main

ENTRIES = {  # entry point -> (main, the program name its errors start with)
    "factory": (factory_main, "factory"),
    "job": (job_main, "python -m train.grounding"),
    "protocol1": (protocol1_main, "python -m eval.protocol1"),
}
NOT_UTF8 = b"\xff\xfe\x00bad"
GENERATE_RUN = {"seed": 0, "detector_weights": None, "pairs": "uniform", "two_class_ratio": 0.5,
                "oracle": "union", "score_threshold": 0.5, "fp8": False}  # beyond write_triplets'


def unreadable(path) -> str:
    """A path that cannot be read as a file: mode 000, or (where that does not stop reads, as
    for root) a directory where the file is expected."""
    path.write_text("{}")
    path.chmod(0)
    try:
        path.open("rb").close()
    except PermissionError:
        return str(path)
    path.unlink()
    path.mkdir()
    return str(path)


@pytest.fixture(scope="module")
def samples(tmp_path_factory, known_mask_data, tiny_generator, tiny_checkpoint) -> dict:
    """The folders and files the cases read, built once: {placeholder: path}, and "root", the
    folder holding them all."""
    root = tmp_path_factory.mktemp("bad-input")
    p = {"root": str(root), "missing": str(root / "nowhere")}
    p["data"] = str(shutil.copytree(known_mask_data, root / "data"))  # train triplets, with
    store = ShardStore.open(p["data"])  # the manifest entries `factory generate` adds
    store.manifest["run"].update(GENERATE_RUN)
    store.record("pairs", {"source": "uniform", "path": None, "count": None})
    p["test"] = write_triplets(  # a finished test set for Protocol I
        str(root / "test"), tiny_generator, [("aeroplane",), ("bicycle", "bird")],
        lambda i, x, c: known_masks(x, [KNOWN_CLASSES.index(n) for n in c]),
        subset="test", seen=list(KNOWN_CLASSES), unseen=[])
    p["label"] = ShardStore.create_or_resume(  # a `factory label` folder: not triplets
        str(root / "label"), {"kind": "segmentation", "split": "pascal", "fold": "1",
                              "subset": "label", "n": 4, "shard_size": 4, "model": "tiny"},
        seen=list(KNOWN_CLASSES), unseen=[]).root
    p["damaged"] = shutil.copytree(p["data"], root / "damaged")  # half-written manifest
    text = (root / "damaged" / MANIFEST).read_text()
    (root / "damaged" / MANIFEST).write_text(text[:len(text) // 2])
    p["unreadable_manifest"] = shutil.copytree(p["data"], root / "unreadable-manifest")
    (root / "unreadable-manifest" / MANIFEST).unlink()
    unreadable(root / "unreadable-manifest" / MANIFEST)
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("not a factory folder")
    p["plain"] = str(root / "plain")
    (root / "file.txt").write_text("a file, not a folder")
    p["file"] = str(root / "file.txt")
    (root / "not-utf8.txt").write_bytes(NOT_UTF8)
    p["not_utf8"] = str(root / "not-utf8.txt")
    p["unreadable"] = unreadable(root / "unreadable.json")
    (root / "instances.json").write_text(json.dumps({  # a valid COCO instances file
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 2}]}))
    p["coco"] = str(root / "instances.json")
    p["ckpt"] = shutil.copytree(tiny_checkpoint, root / "ckpt")
    p["ckpt_no_info"] = shutil.copytree(tiny_checkpoint, root / "ckpt-no-info")
    (root / "ckpt-no-info" / HEAD_INFO).unlink()
    p["ckpt_bad_json"] = shutil.copytree(tiny_checkpoint, root / "ckpt-bad-json")
    (root / "ckpt-bad-json" / HEAD_INFO).write_text('{"split": "pascal", "fo')
    p["ckpt_truncated"] = shutil.copytree(tiny_checkpoint, root / "ckpt-truncated")
    weights = (root / "ckpt-truncated" / HEAD_WEIGHTS).read_bytes()
    (root / "ckpt-truncated" / HEAD_WEIGHTS).write_bytes(weights[:len(weights) // 2])
    return {k: str(v) for k, v in p.items()}


def case_paths(tmp_path, samples: dict, setup: str | None) -> dict:
    """The case's own paths: `out` (absent), `out_file` (a file), `out_dir` (a folder with a
    file in it) and, with `setup`, `target`: a copy of that sample for a case that may write."""
    (tmp_path / "out-file").write_text("keep me")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("keep me")
    paths = {"out": str(tmp_path / "out"), "out_file": str(tmp_path / "out-file"),
             "out_dir": str(tmp_path / "occupied")}
    if setup is not None:
        paths["target"] = shutil.copytree(samples[setup], tmp_path / "target")
    return paths


def snapshot(root: str) -> dict[str, str]:
    """Every folder and file below `root`: relative path -> "dir", or the file's SHA-256 (its
    size and mode where it cannot be read)."""
    seen = {}
    for folder, _, files in os.walk(root):
        seen[os.path.relpath(folder, root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            try:
                with open(path, "rb") as f:
                    seen[key] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                st = os.stat(path)
                seen[key] = f"unreadable, {st.st_size} bytes, mode {st.st_mode:o}"
    return seen


def ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def case(id: str, entry: str, argv: list[str], setup: str | None = None, marks=()):
    """A row of the table: `argv` names paths as {placeholders} (`samples`, `case_paths`)."""
    return pytest.param(entry, argv, setup, id=id, marks=marks)


WITHOUT_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


GEN = ["generate", "--model", "tiny", "--n", "4", "--out", "{out}"]
LABEL = ["label", "--checkpoint", "{ckpt}", "--n", "4", "--out", "{out}"]
SHOW = ["show", "{data}", "--out", "{out}"]
EXPORT = ["export", "{data}", "--format", "coco", "--out", "{out}"]
JOB = ["--data", "{data}", "--out", "{out}"]
P1 = ["--data", "{test}", "--baseline", "daam"]  # a later --data or --baseline wins

CASES = [
    # factory generate: numbers, names, files, --out
    case("generate-n-0", "factory", [*GEN, "--n", "0"]),
    case("generate-shard-size-negative", "factory", [*GEN, "--shard-size", "-1"]),
    case("generate-shard-size-0", "factory", [*GEN, "--shard-size", "0"]),
    case("generate-batch-size-0", "factory", [*GEN, "--batch-size", "0"]),
    case("generate-label-batch-size-0", "factory", [*GEN, "--label-batch-size", "0"]),
    case("generate-steps-0", "factory", [*GEN, "--steps", "0"]),
    case("generate-feature-step-past-steps", "factory",
         [*GEN, "--steps", "5", "--feature-step", "5"]),
    case("generate-generators-0", "factory", [*GEN, "--generators", "0"]),
    case("generate-device-cuda-without-a-gpu", "factory", [*GEN, "--device", "cuda"],
         marks=WITHOUT_CUDA),
    case("generate-placement-timeout-0", "factory", [*GEN, "--placement-timeout", "0"]),
    case("generate-max-failed-samples-negative", "factory",
         [*GEN, "--max-failed-samples", "-1"]),
    case("generate-two-class-ratio-1.5", "factory", [*GEN, "--two-class-ratio", "1.5"]),
    case("generate-n-not-a-number", "factory", [*GEN, "--n", "many"]),
    case("generate-unknown-split", "factory", [*GEN, "--split", "cityscapes"]),
    case("generate-unknown-fold", "factory", [*GEN, "--fold", "9"]),
    case("generate-unknown-subset", "factory", [*GEN, "--subset", "val"]),
    case("generate-unknown-model", "factory", [*GEN, "--model", "./no-such-model"]),
    case("generate-unknown-detector", "factory", [*GEN, "--detector", "yolo"]),
    case("generate-unknown-oracle", "factory", [*GEN, "--oracle", "best"]),
    case("generate-unknown-precision", "factory", [*GEN, "--precision", "float8"]),
    case("generate-missing-detector-weights", "factory",
         [*GEN, "--detector", "torchvision", "--detector-weights", "{missing}"]),
    case("generate-pairs-not-utf8", "factory", [*GEN, "--pairs", "{not_utf8}"]),
    case("generate-pairs-unreadable", "factory", [*GEN, "--pairs", "{unreadable}"]),
    case("generate-pairs-missing", "factory", [*GEN, "--pairs", "{missing}"]),
    case("generate-pairs-is-a-coco-file", "factory", [*GEN, "--pairs", "{coco}"]),
    case("generate-out-is-a-file", "factory", [*GEN, "--out", "{out_file}"]),
    case("generate-out-is-a-plain-folder", "factory", [*GEN, "--out", "{out_dir}"]),
    case("generate-out-is-a-label-folder", "factory", [*GEN, "--out", "{target}"], "label"),
    case("generate-resume-half-written-manifest", "factory", [*GEN, "--out", "{target}"],
         "damaged"),
    # factory label: checkpoints, vocabularies, numbers, --out
    case("label-checkpoint-missing", "factory", [*LABEL, "--checkpoint", "{missing}"]),
    case("label-checkpoint-without-head-json", "factory",
         [*LABEL, "--checkpoint", "{ckpt_no_info}"]),
    case("label-checkpoint-head-json-not-json", "factory",
         [*LABEL, "--checkpoint", "{ckpt_bad_json}"]),
    case("label-checkpoint-head-pt-truncated", "factory",
         [*LABEL, "--checkpoint", "{ckpt_truncated}"]),
    case("label-checkpoint-is-a-data-folder", "factory", [*LABEL, "--checkpoint", "{data}"]),
    case("label-checkpoint-is-a-file", "factory", [*LABEL, "--checkpoint", "{file}"]),
    case("label-vocab-not-utf8", "factory", [*LABEL, "--vocab", "{not_utf8}"]),
    case("label-vocab-unreadable", "factory", [*LABEL, "--vocab", "{unreadable}"]),
    case("label-vocab-missing", "factory", [*LABEL, "--vocab", "{missing}"]),
    case("label-pairs-not-utf8", "factory", [*LABEL, "--pairs", "{not_utf8}"]),
    case("label-n-0", "factory", [*LABEL, "--n", "0"]),
    case("label-per-class-negative", "factory", [*LABEL, "--per-class", "-1"]),
    case("label-batch-size-0", "factory", [*LABEL, "--batch-size", "0"]),
    case("label-max-failed-samples-negative", "factory", [*LABEL, "--max-failed-samples", "-5"]),
    case("label-threshold-0", "factory", [*LABEL, "--threshold", "0"]),
    case("label-unknown-split", "factory", [*LABEL, "--split", "cityscapes"]),
    case("label-unknown-fold", "factory", [*LABEL, "--fold", "9"]),
    case("label-unknown-model", "factory", [*LABEL, "--model", "./no-such-model"]),
    case("label-out-is-a-file", "factory", [*LABEL, "--out", "{out_file}"]),
    case("label-out-has-a-half-written-manifest", "factory", [*LABEL, "--out", "{target}"],
         "damaged"),
    # factory pairs
    case("pairs-neither-coco-nor-voc", "factory", ["pairs", "--out", "{out}"]),
    case("pairs-both-coco-and-voc", "factory",
         ["pairs", "--coco", "{coco}", "--voc", "{plain}", "--out", "{out}"]),
    case("pairs-coco-not-utf8", "factory", ["pairs", "--coco", "{not_utf8}", "--out", "{out}"]),
    case("pairs-coco-unreadable", "factory",
         ["pairs", "--coco", "{unreadable}", "--out", "{out}"]),
    case("pairs-coco-missing", "factory", ["pairs", "--coco", "{missing}", "--out", "{out}"]),
    case("pairs-coco-is-a-manifest", "factory",
         ["pairs", "--coco", "{data}/manifest.json", "--out", "{out}"]),
    case("pairs-voc-is-a-plain-folder", "factory",
         ["pairs", "--voc", "{plain}", "--out", "{out}"]),
    case("pairs-voc-is-a-file", "factory", ["pairs", "--voc", "{file}", "--out", "{out}"]),
    case("pairs-unknown-split", "factory",
         ["pairs", "--coco", "{coco}", "--split", "cityscapes", "--out", "{out}"]),
    case("pairs-min-count-0", "factory",
         ["pairs", "--coco", "{coco}", "--min-count", "0", "--out", "{out}"]),
    case("pairs-out-is-a-folder", "factory",
         ["pairs", "--coco", "{coco}", "--out", "{out_dir}"]),
    # factory stats
    case("stats-missing-folder", "factory", ["stats", "{missing}"]),
    case("stats-plain-folder", "factory", ["stats", "{plain}"]),
    case("stats-file-not-folder", "factory", ["stats", "{file}"]),
    case("stats-half-written-manifest", "factory", ["stats", "{damaged}"]),
    case("stats-unreadable-manifest", "factory", ["stats", "{unreadable_manifest}"]),
    case("stats-plot-is-a-folder", "factory", ["stats", "{data}", "--plot", "{out_dir}"]),
    # factory show
    case("show-n-0", "factory", [*SHOW, "--n", "0"]),
    case("show-tile-0", "factory", [*SHOW, "--tile", "0"]),
    case("show-unknown-class", "factory", [*SHOW, "--classes", "zebra"]),
    case("show-missing-folder", "factory", ["show", "{missing}", "--out", "{out}"]),
    case("show-plain-folder", "factory", ["show", "{plain}", "--out", "{out}"]),
    case("show-half-written-manifest", "factory", ["show", "{damaged}", "--out", "{out}"]),
    case("show-label-folder-without-samples", "factory", ["show", "{label}", "--out", "{out}"]),
    case("show-out-is-a-folder", "factory", [*SHOW, "--out", "{out_dir}"]),
    # factory export
    case("export-unknown-format", "factory", [*EXPORT, "--format", "tfrecord"]),
    case("export-missing-folder", "factory", ["export", "{missing}", "--format", "coco",
                                              "--out", "{out}"]),
    case("export-plain-folder", "factory", ["export", "{plain}", "--format", "voc",
                                            "--out", "{out}"]),
    case("export-file-not-folder", "factory", ["export", "{file}", "--format", "coco",
                                               "--out", "{out}"]),
    case("export-half-written-manifest", "factory", ["export", "{damaged}", "--format",
                                                     "parquet", "--out", "{out}"]),
    case("export-out-is-a-file", "factory", [*EXPORT, "--out", "{out_file}"]),
    case("export-out-is-an-occupied-folder", "factory", [*EXPORT, "--out", "{out_dir}"]),
    # factory verify
    case("verify-missing-folder", "factory", ["verify", "{missing}"]),
    case("verify-plain-folder", "factory", ["verify", "{plain}"]),
    case("verify-file-not-folder", "factory", ["verify", "{file}"]),
    case("verify-half-written-manifest", "factory", ["verify", "{damaged}"]),
    case("verify-unreadable-manifest", "factory", ["verify", "{unreadable_manifest}"]),
    # python -m train.grounding
    case("job-steps-0", "job", [*JOB, "--steps", "0"]),
    case("job-batch-size-0", "job", [*JOB, "--batch-size", "0"]),
    case("job-num-workers-0", "job", [*JOB, "--num-workers", "0"]),
    case("job-report-every-negative", "job", [*JOB, "--report-every", "-1"]),
    case("job-unknown-head", "job", [*JOB, "--head", "huge"]),
    case("job-data-is-a-label-folder", "job", [*JOB, "--data", "{label}"]),
    case("job-data-is-a-test-set", "job", [*JOB, "--data", "{test}"]),
    case("job-data-is-a-plain-folder", "job", [*JOB, "--data", "{plain}"]),
    case("job-data-is-a-file", "job", [*JOB, "--data", "{file}"]),
    case("job-data-half-written-manifest", "job", [*JOB, "--data", "{damaged}"]),
    case("job-data-unreadable-manifest", "job", [*JOB, "--data", "{unreadable_manifest}"]),
    case("job-out-is-an-occupied-folder", "job", [*JOB, "--out", "{out_dir}"]),
    case("job-out-is-a-file", "job", [*JOB, "--out", "{out_file}"]),
    case("job-model-missing", "job", [*JOB, "--model", "{missing}"]),
    case("job-lr-0", "job", [*JOB, "--lr", "0"]),
    case("job-weight-decay-negative", "job", [*JOB, "--weight-decay", "-1"]),
    case("job-cpus-per-worker-0", "job", [*JOB, "--cpus-per-worker", "0"]),
    # python -m eval.protocol1
    case("protocol1-nothing-to-evaluate", "protocol1", ["--data", "{test}"]),
    case("protocol1-unknown-baseline", "protocol1", [*P1, "--baseline", "clipseg"]),
    case("protocol1-unknown-mask-rule", "protocol1", [*P1, "--mask-rule", "argmax"]),
    case("protocol1-batch-size-0", "protocol1", [*P1, "--batch-size", "0"]),
    case("protocol1-device-cuda-without-a-gpu", "protocol1", [*P1, "--device", "cuda"],
         marks=WITHOUT_CUDA),
    case("protocol1-min-area-1.5", "protocol1", [*P1, "--min-area", "1.5"]),
    case("protocol1-threshold-1.5", "protocol1", [*P1, "--threshold", "1.5"]),
    case("protocol1-daam-threshold-negative", "protocol1", [*P1, "--daam-threshold", "-0.1"]),
    case("protocol1-daam-actors-0", "protocol1", [*P1, "--daam-actors", "0"]),
    case("protocol1-data-is-a-train-set", "protocol1", [*P1, "--data", "{data}"]),
    case("protocol1-data-is-a-label-folder", "protocol1", [*P1, "--data", "{label}"]),
    case("protocol1-data-is-a-plain-folder", "protocol1", [*P1, "--data", "{plain}"]),
    case("protocol1-data-missing", "protocol1", [*P1, "--data", "{missing}"]),
    case("protocol1-data-half-written-manifest", "protocol1", [*P1, "--data", "{damaged}"]),
    case("protocol1-checkpoint-without-head-json", "protocol1",
         ["--data", "{test}", "--checkpoint", "{ckpt_no_info}"]),
    case("protocol1-checkpoint-head-json-not-json", "protocol1",
         ["--data", "{test}", "--checkpoint", "{ckpt_bad_json}"]),
    case("protocol1-checkpoint-head-pt-truncated", "protocol1",
         ["--data", "{test}", "--checkpoint", "{ckpt_truncated}"]),
]


@pytest.mark.parametrize("entry, argv, setup", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(samples, tmp_path, run_cli, caplog,
                                                         entry, argv, setup):
    paths = {**samples, **case_paths(tmp_path, samples, setup)}
    argv = [a.format(**paths) for a in argv]
    main, prog = ENTRIES[entry]
    before = snapshot(samples["root"]), snapshot(str(tmp_path))
    ray_before = ray_started()
    caplog.clear()
    caplog.set_level(logging.INFO)
    code, _, err = run_cli(main, argv)
    # the commands log to stderr at INFO (logging.basicConfig): a record is a line there too
    lines = err.splitlines() + [r.getMessage() for r in caplog.records]
    assert code == 2, err
    assert "Traceback" not in err and 'File "' not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    assert not ray_started() or ray_before, "Ray was started before the refusal"
    assert (snapshot(samples["root"]), snapshot(str(tmp_path))) == before


def test_the_samples_pass_where_the_cases_fail(samples, tmp_path, run_cli):
    """The control: the shared folders and checkpoint are good input where a case does not
    damage them, so each case is refused for its own bad input."""
    for argv in (["stats", samples["data"]], ["verify", samples["data"]],
                 ["verify", samples["test"]],
                 ["show", samples["data"], "--out", str(tmp_path / "grid.png"), "--n", "2"],
                 ["export", samples["data"], "--format", "coco", "--out", str(tmp_path / "c")],
                 ["pairs", "--coco", samples["coco"], "--out", str(tmp_path / "pairs.json")]):
        code, _, err = run_cli(factory_main, argv)
        assert code == 0, (argv, err)
