import os
import shutil
import tempfile

# Tests start a local Ray whose workers share this interpreter; Ray's `uv run` hook (read when
# ray is first imported) would copy the project and build a venv per session instead.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray workers and driver processes cache the bytecode they compile (factory.pools.connect_ray)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 2 CPUs and both stage resources, a short temp dir
    (Unix socket paths are limited to ~100 characters), the workers' output kept off the
    console as `factory.pools.connect_ray` keeps it."""
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=2, resources={"gen": 1, "label": 1}, include_dashboard=False,
             log_to_driver=False, _temp_dir=temp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def run_cli(capsys):
    """Runs a command's `main(argv)` in this process: (exit status, stdout, stderr)."""

    def run(main, argv):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_generator():
    from actors.sd_generator import SDGenerator

    return SDGenerator("tiny", steps=5)


@pytest.fixture(scope="session")
def tiny_labeller():
    from actors.maskrcnn_labeller import MaskRCNNLabeller

    return MaskRCNNLabeller("pascal", detector="tiny")


@pytest.fixture(scope="session")
def spec_batch():
    """Makes a batch as the spec stage does: prompts, noise seeds, class lists."""
    from actors.batch import object_column

    def make(classes, seeds):
        from factory.prompts import prompt_for

        return {"prompt": np.array([prompt_for(tuple(c)) for c in classes], dtype=object),
                "noise_seed": np.array(seeds, dtype=np.int64),
                "classes": object_column([list(c) for c in classes])}

    return make


def ray_worker_pids(title: bytes) -> list[int]:
    """The processes of this session's local Ray (children of its raylet) whose title holds
    `title`: Ray names them after what they run, e.g. `ray::RayTrainWorker` or
    `ray::MapWorker(MapBatches(GeneratorStage))`."""
    import ray._private.worker

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if parent == raylet and title in f.read():
                    pids.append(int(entry))
        except OSError:  # the process ended meanwhile
            continue
    return pids


KNOWN_CLASSES = ("aeroplane", "bicycle", "bird", "boat")  # seen in pascal fold 1


def known_masks(x_t: np.ndarray, channels: list[int]) -> np.ndarray:
    """(K, 8h, 8w) masks that are a known function of a latent: mask k covers the 8x8 pixel
    cells where channel `channels[k]` of x_t (4, h, w) is in its top 20%."""
    cells = [x_t[c] > np.quantile(x_t[c], 0.8) for c in channels]
    return np.stack([np.kron(m, np.ones((8, 8), dtype=bool)) for m in cells])


def write_triplets(root: str, generator, classes: list[tuple[str, ...]], masks_of, *,
                   subset: str, seen: list[str], unseen: list[str], first_seed: int = 100) -> str:
    """A `factory generate`-style pascal fold-1 folder of tiny triplets, one per entry of
    `classes` (noise seeds first_seed, first_seed + 1, ...), with the masks
    `masks_of(i, x_t, classes)` gives."""
    from actors.batch import object_column
    from factory.prompts import prompt_for
    from factory.schema import encode_masks, to_triplets
    from factory.store import ShardStore
    from factory.vocab import VOCABULARIES

    n = len(classes)
    out = generator({"prompt": np.array([prompt_for(c) for c in classes], dtype=object),
                     "noise_seed": np.arange(n) + first_seed})
    masks = [masks_of(i, x, c) for i, (x, c) in enumerate(zip(out["x_t"], classes, strict=True))]
    vocab = VOCABULARIES["pascal"]
    out.update(index=np.arange(n), classes=object_column([list(c) for c in classes]),
               class_ids=object_column([[vocab.id_of(x) for x in c] for c in classes]),
               masks=object_column([encode_masks(m) for m in masks]),
               scores=object_column([[1.0] * len(m) for m in masks]),
               areas=object_column([m.sum((1, 2)).tolist() for m in masks]))
    run = {"kind": "triplets", "split": "pascal", "fold": "1", "subset": subset, "n": n,
           "shard_size": 8, "model": "tiny", "detector": "known-masks", "steps": 5,
           "guidance": 7.5, "feature_step": 4, "precision": "auto"}
    store = ShardStore.create_or_resume(root, run, seen=seen, unseen=unseen)
    table = to_triplets(out, split="pascal", fold="1", subset=subset, run_seed=0,
                        sd_model="tiny", detector="known-masks")
    for k in range(store.num_shards):
        store.write_shard(k, table.slice(8 * k, 8))
    return root


@pytest.fixture(scope="session")
def known_mask_data(tmp_path_factory, tiny_generator):
    """A `factory generate`-style training folder of 16 tiny triplets whose masks are a known
    function of the latent: class k of KNOWN_CLASSES covers the 8x8 latent cells where channel
    k of x_t is in its top 20%. A grounding head can learn that only through the features and
    the class embedding, so the set fails if the head, the loss or the data path is broken."""
    rng = np.random.default_rng(0)
    classes = [tuple(rng.choice(KNOWN_CLASSES, size=1 + i % 2, replace=False)) for i in range(16)]
    return write_triplets(
        str(tmp_path_factory.mktemp("known") / "data"), tiny_generator, classes,
        lambda i, x, c: known_masks(x, [KNOWN_CLASSES.index(n) for n in c]),
        subset="train", seen=list(KNOWN_CLASSES), unseen=[])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A grounding-head checkpoint for the tiny SD, trained for pascal fold 1 (random weights,
    seeded): what `python -m train.grounding` writes, without the training."""
    import torch

    from actors.frozen_sd import FrozenSD
    from factory.vocab import get_split
    from train.grounding.checkpoint import save_checkpoint
    from train.grounding.model import build_grounding_head

    folder = str(tmp_path_factory.mktemp("head"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = build_grounding_head("tiny", **FrozenSD("tiny", "cpu").head_overrides()).eval()
    opt = torch.optim.Adam(head.parameters())
    info = {"kind": "grounding-head", "split": "pascal", "fold": "1", "model": "tiny",
            "seen": list(get_split("pascal", "1").seen)}
    save_checkpoint(folder, head, opt, 7, info)
    return folder
