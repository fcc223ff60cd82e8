import os
import shutil
import tempfile

# Tests start a local Ray whose workers share this interpreter; Ray's `uv run` hook (read when
# ray is first imported) would copy the project and build a venv per session instead.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 2 CPUs and both stage resources, a short temp dir
    (Unix socket paths are limited to ~100 characters)."""
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=2, resources={"gen": 4, "label": 4}, include_dashboard=False,
             _temp_dir=temp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


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
