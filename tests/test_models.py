import numpy as np
import pytest
import torch

from actors.names import ModelNotFoundError, check_model_name
from actors.sd import RandomSDConfig, clip_tokenizer, load_sd, random_sd_components
from actors.sd_generator import SDGenerator


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_tokenizer_is_sds_clip_bpe(tokenizer):
    assert len(tokenizer) == 49408
    ids = tokenizer("a photograph of a dog").input_ids
    assert ids == [49406, 320, 8853, 539, 320, 1929, 49407]  # SD 1.x's ids for this prompt


@pytest.mark.parametrize(("name", "tokens"), [
    ("tvmonitor", ["tv", "monitor</w>"]),
    ("hair drier", ["hair</w>", "drier</w>"]),
    ("pottedplant", ["pot", "ted", "plant</w>"]),
    ("diningtable", ["din", "ing", "table</w>"]),
    ("dog", ["dog</w>"]),
])
def test_class_names_tokenize_as_in_sd(tokenizer, name, tokens):
    ids = tokenizer(name, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == tokens


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a, b = (random_sd_components(RandomSDConfig.tiny()) for _ in range(2))
    assert torch.equal(torch.rand(3), expected)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = a[part].state_dict(), b[part].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    blocks = [type(blk).__name__ for blk in a["unet"].down_blocks]
    assert blocks == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]  # SD 1.x topology


def test_tiny_model_saved_and_loaded_by_path_generates_the_same(tmp_path, spec_batch):
    load_sd("tiny").save_pretrained(tmp_path / "tiny-sd")
    check_model_name(str(tmp_path / "tiny-sd"))
    batch = spec_batch([("dog",), ("cat", "chair")], [1, 2])
    by_name = SDGenerator("tiny", steps=3)(batch)
    by_path = SDGenerator(str(tmp_path / "tiny-sd"), steps=3)(batch)
    np.testing.assert_array_equal(by_name["image"], by_path["image"])
    np.testing.assert_array_equal(by_name["x_t"], by_path["x_t"])


@pytest.mark.parametrize("model", ["/no/such/folder", "nobody-here/no-such-model"])
def test_a_model_that_cannot_be_loaded_gives_one_line(model):
    with pytest.raises(ModelNotFoundError) as e:
        check_model_name(model)
    assert model in str(e.value) and "\n" not in str(e.value)
    assert "--model" in str(e.value)
    with pytest.raises(ModelNotFoundError):
        load_sd(model)


def test_weights_id_names_the_exact_weights_of_a_local_folder(tmp_path):
    from actors.names import weights_id

    load_sd("tiny").save_pretrained(tmp_path / "sd")
    first = weights_id(str(tmp_path / "sd"))
    assert first.startswith("sha256:") and weights_id(str(tmp_path / "sd")) == first
    (tmp_path / "copy").mkdir()
    for path in (tmp_path / "sd").rglob("*"):  # another folder name, the same files: same id
        target = tmp_path / "copy" / path.relative_to(tmp_path / "sd")
        if path.is_dir():
            target.mkdir()
        else:
            target.write_bytes(path.read_bytes())
    assert weights_id(str(tmp_path / "copy")) == first
    weights = next((tmp_path / "copy" / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert weights_id(str(tmp_path / "copy")) != first
    assert weights_id("tiny") == "tiny (random weights built in code)"
