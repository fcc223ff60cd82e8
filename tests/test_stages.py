import os

import numpy as np
import pytest
import torch

from actors.maskrcnn_labeller import (
    MaskRCNNLabeller,
    build_torchvision_maskrcnn,
    class_masks,
)
from actors.names import DetectorNotFoundError, check_detector, oracle_score_threshold
from actors.sd_generator import SDGenerator, precision_dtype
from factory.schema import decode_masks


@pytest.fixture(scope="module")
def generated(tiny_generator, spec_batch):
    batch = spec_batch([("dog",), ("cat", "chair"), ("person",)], [11, 12, 13])
    return batch, tiny_generator(batch)


def test_generator_outputs(tiny_generator, generated):
    batch, out = generated
    assert out["image"].shape == (3, 64, 64, 3) and out["image"].dtype == np.uint8
    assert out["x_t"].shape == (3, 4, 8, 8) and out["x_t"].dtype == np.float32
    assert list(out["t"]) == [1, 1, 1]  # the last of 5 DDIM steps (SD's steps_offset = 1)
    assert list(out["prompt"]) == list(batch["prompt"])
    assert out["image"].std() > 0 and not np.array_equal(out["image"][0], out["image"][2])


def test_sample_depends_on_its_seed_not_its_batch(tiny_generator, generated, spec_batch):
    batch, out = generated
    alone = tiny_generator(spec_batch([("cat", "chair")], [12]))
    np.testing.assert_allclose(alone["image"][0], out["image"][1], atol=1)
    # float32 on the CPU: BLAS picks other kernels for other batch sizes (gemv for one row,
    # oneDNN conv blocking), so results agree to float32 precision of x_t's scale, not bit for bit
    assert np.abs(alone["x_t"][0] - out["x_t"][1]).max() <= 1e-5 * np.abs(out["x_t"][1]).max()
    other_seed = tiny_generator(spec_batch([("cat", "chair")], [99]))
    assert np.abs(other_seed["image"][0].astype(int) - out["image"][1]).max() > 10


def test_x_t_is_the_latent_entering_the_feature_step(tiny_generator, generated):
    """One guided UNet step and DDIM update from the stored x_t, then the VAE, give the image."""
    batch, out = generated
    pipe = tiny_generator.pipe
    pipe.scheduler.set_timesteps(tiny_generator.steps)
    x = torch.from_numpy(out["x_t"])                                       # (B, 4, 8, 8)
    t = int(out["t"][0])
    cond, uncond = pipe.encode_prompt(list(batch["prompt"]), "cpu", 1, True)
    with torch.no_grad():
        eps = pipe.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
        e_u, e_c = eps.chunk(2)
        x0 = pipe.scheduler.step(e_u + tiny_generator.guidance * (e_c - e_u), t, x).prev_sample
        img = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
    assert np.abs(img - out["image"]).max() <= 1  # rounding to uint8 may flip at .5


def test_a_short_batch_is_padded_to_the_compiled_size(generated, spec_batch):
    """The compiled UNet must never meet a new shape: 3 samples run as 4, and the padding's
    outputs are dropped, leaving what the unpadded call gives."""
    batch, out = generated
    padded = SDGenerator("tiny", steps=5, batch_size=4)
    rows = []
    padded.pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    got = padded(batch)
    assert rows and set(rows) == {8}  # 4 images x 2 CFG halves, at every step
    assert got["image"].shape == out["image"].shape and len(got["t"]) == 3
    np.testing.assert_allclose(got["image"], out["image"], atol=1)
    assert np.abs(got["x_t"] - out["x_t"]).max() <= 1e-5 * np.abs(out["x_t"]).max()
    assert list(got["prompt"]) == list(batch["prompt"])
    with pytest.raises(ValueError, match="batch of 5 images for a generator of batch size 4"):
        padded(spec_batch([("dog",)] * 5, list(range(5))))


def test_measured_defaults_bf16_compiled_on_a_gpu_only():
    assert precision_dtype(None, "cuda") == torch.bfloat16
    assert precision_dtype(None, "cpu") == torch.float32
    gen = SDGenerator("tiny", steps=2, device="cpu")
    assert not gen.compiled and not hasattr(gen.pipe.unet, "_orig_mod")
    assert not any(p.requires_grad for p in gen.pipe.unet.parameters())  # frozen before compile
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        SDGenerator("tiny", steps=2, compile=True, compile_mode="fast")


def test_feature_step_zero_stores_the_initial_noise(spec_batch):
    gen = SDGenerator("tiny", steps=3, feature_step=0)
    out = gen(spec_batch([("dog",)], [5]))
    np.testing.assert_array_equal(out["x_t"][0], gen.initial_noise(np.array([5]))[0].numpy())
    assert out["t"][0] == 667


def test_generator_refuses_a_batch_without_seeds(tiny_generator):
    with pytest.raises(ValueError, match="lacks column.*noise_seed"):
        tiny_generator({"prompt": np.array(["a photograph of a dog"], dtype=object)})


def square(y, x, size=16, hw=(64, 64)):
    m = torch.zeros((1, *hw))
    m[0, y:y + size, x:x + size] = 0.9
    return m


@pytest.fixture
def detections():
    # two confident dogs, one weak dog, one person (COCO ids: dog 18, person 1)
    return {"labels": torch.tensor([18, 18, 1, 18]),
            "scores": torch.tensor([0.9, 0.6, 0.95, 0.3]),
            "masks": torch.stack([square(0, 0), square(32, 32), square(0, 32), square(48, 0)])}


def test_union_oracle_joins_confident_instances_of_each_class(detections):
    masks, scores = class_masks(detections, [18, 17, 1], (64, 64), score_threshold=0.5)
    assert masks.shape == (3, 64, 64)
    assert masks[0].sum() == 2 * 256 and masks[0][0, 0] and masks[0][40, 40]
    assert not masks[0][50, 2]  # the 0.3 dog is below the threshold
    assert masks[1].sum() == 0 and scores[1] == 0  # no cat detected: empty mask, kept
    assert masks[2].sum() == 256
    np.testing.assert_allclose(scores, [0.9, 0.0, 0.95])


def test_top1_oracle_takes_the_best_instance(detections):
    masks, _ = class_masks(detections, [18], (64, 64), score_threshold=0.5, oracle="top1")
    assert masks[0].sum() == 256 and masks[0][0, 0] and not masks[0][40, 40]
    masks, _ = class_masks(detections, [18], (64, 64), score_threshold=0.95, oracle="top1")
    assert masks[0].sum() == 0
    # at its default 0.05, all three dogs pass; the best is taken wherever it is listed
    shuffled = {k: v[[3, 1, 2, 0]] for k, v in detections.items()}  # dogs 0.3, 0.6, 0.9
    masks, _ = class_masks(shuffled, [18], (64, 64), score_threshold=0.05, oracle="top1")
    assert masks[0].sum() == 256 and masks[0][0, 0]


def test_each_oracle_has_its_own_default_score_threshold():
    assert oracle_score_threshold("union") == 0.5
    assert oracle_score_threshold("top1") == 0.05  # the paper's code: mmdet's test threshold
    assert oracle_score_threshold("top1", 0.5) == 0.5 and oracle_score_threshold("union", 0) == 0
    with pytest.raises(ValueError, match="unknown oracle 'best'"):
        oracle_score_threshold("best")


class FixedDetections(torch.nn.Module):
    """Stands in for the network to test the labeller's class mapping and encoding."""

    def __init__(self, dets):
        super().__init__()
        self.dets = dets

    def forward(self, images):
        return [self.dets for _ in images]


def test_labeller_maps_prompt_names_to_coco_ids_and_encodes_rle(tiny_labeller, spec_batch):
    sofa_and_tv = {"labels": torch.tensor([63, 72]), "scores": torch.tensor([0.8, 0.7]),
                   "masks": torch.stack([square(0, 0), square(32, 32)])}
    labeller = MaskRCNNLabeller("pascal", detector="tiny")
    labeller.model = FixedDetections(sofa_and_tv)
    batch = spec_batch([("sofa", "tvmonitor"), ("dog",)], [1, 2])
    batch["image"] = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    out = labeller(batch)
    first = decode_masks(out["masks"][0], 64, 64)
    assert first.shape == (2, 64, 64) and first[0][0, 0] and first[1][40, 40]
    assert out["areas"][0] == [256, 256] and out["areas"][1] == [0]
    assert out["scores"][0] == pytest.approx([0.8, 0.7])


@pytest.mark.parametrize(("oracle", "score_threshold", "found"), [
    ("top1", None, True),    # its default 0.05 keeps the 0.1 dog
    ("union", None, False),  # its default 0.5 drops it
    ("top1", 0.5, False),    # an explicit threshold wins
    ("union", 0.05, True),
])
def test_oracle_defaults_decide_a_weak_lone_instance(spec_batch, oracle, score_threshold,
                                                     found):
    weak_dog = {"labels": torch.tensor([18]), "scores": torch.tensor([0.1]),
                "masks": square(8, 8)[None]}
    labeller = MaskRCNNLabeller("pascal", detector="tiny", oracle=oracle,
                                score_threshold=score_threshold)
    labeller.model = FixedDetections(weak_dog)
    batch = spec_batch([("dog",)], [1])
    batch["image"] = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    out = labeller(batch)
    assert out["areas"][0] == [256 if found else 0] and out["scores"][0] == pytest.approx([0.1])


@pytest.mark.parametrize(("oracle", "given", "recorded"), [
    ("union", None, 0.5), ("top1", None, 0.05), ("top1", 0.3, 0.3)])
def test_the_manifest_records_the_resolved_score_threshold(tmp_path, oracle, given, recorded):
    from factory.errors import FactoryError
    from factory.identity import prepare
    from factory.options import GenerateOptions
    from factory.store import ShardStore

    out = str(tmp_path / "out")
    options = dict(out=out, model="tiny", n=4, oracle=oracle)
    _, store = prepare(GenerateOptions(**options, score_threshold=given))
    store.create()
    manifest = ShardStore.open(out).manifest
    assert manifest["run"]["score_threshold"] == recorded
    assert manifest["arguments"]["score_threshold"] == given  # as given
    # a rerun naming the same threshold is the same run; another threshold is refused
    prepare(GenerateOptions(**options, score_threshold=recorded))
    with pytest.raises(FactoryError, match=f"score_threshold={recorded} "):
        prepare(GenerateOptions(**options, score_threshold=0.7))


def test_tiny_labeller_on_generated_images(tiny_labeller, generated):
    _, out = generated
    labelled = tiny_labeller(out)
    for classes, rles, areas in zip(out["classes"], labelled["masks"], labelled["areas"],
                                    strict=True):
        masks = decode_masks(rles, 64, 64)
        assert len(rles) == len(classes) and masks.shape == (len(classes), 64, 64)
        assert masks.sum((1, 2)).tolist() == areas


def test_real_weights_load_through_the_same_builder(tmp_path):
    torch.manual_seed(0)
    ref = build_torchvision_maskrcnn("tiny").state_dict()
    torch.save(ref, tmp_path / "maskrcnn.pth")
    loaded = build_torchvision_maskrcnn("torchvision", str(tmp_path / "maskrcnn.pth")).state_dict()
    assert ref.keys() == loaded.keys() and all(torch.equal(ref[k], loaded[k]) for k in ref)


@pytest.mark.parametrize(("detector", "weights", "message"), [
    ("torchvision", "/no/weights.pth", "no Mask R-CNN weights at '/no/weights.pth'"),
    ("yolo", None, "unknown detector 'yolo'"),
])
def test_missing_detector_is_one_clear_error(detector, weights, message):
    with pytest.raises(DetectorNotFoundError, match=message):
        check_detector(detector, weights)


def test_detectron2_backend_needs_detectron2_or_says_how():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        with pytest.raises(DetectorNotFoundError, match="build it from source"):
            check_detector("detectron2", None)
    else:
        pytest.skip("detectron2 is installed: see test_detectron2_labels_coco_ids")


def test_detectron2_labels_coco_ids(tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 has no wheel; built on clusters only")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from actors.maskrcnn_labeller import DETECTRON2_CONFIG, Detectron2MaskRCNN

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(DETECTRON2_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "d2.pth")
    det = Detectron2MaskRCNN(str(tmp_path / "d2.pth")).eval()
    with torch.no_grad():
        (out,) = det([torch.rand(3, 64, 64)])
    assert out["masks"].shape[1:] == (1, 64, 64)
    assert set(out["labels"].tolist()) <= set(range(1, 91))


@pytest.mark.slow
def test_a_compile_is_loaded_again_from_the_shared_cache_folder(tmp_path, monkeypatch):
    """What a second generator actor on a node, or a resumed run, does: the first compile
    writes into the cache folder, a later one (fresh dynamo state, as in a new process) loads
    from it instead of compiling."""
    from torch._dynamo.utils import counters

    from actors.sd_generator import use_compile_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert use_compile_cache(str(cache)) == str(cache)

    def compile_once() -> int:
        torch._dynamo.reset()
        counters.clear()
        torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)(torch.ones(8))
        return counters["inductor"]["fxgraph_cache_hit"]

    assert compile_once() == 0 and any(cache.iterdir())  # compiled, into the given folder
    assert compile_once() == 1  # loaded
    torch._dynamo.reset()
    SDGenerator("tiny", steps=2, compile=True, compile_cache=str(cache))  # compiles lazily
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
