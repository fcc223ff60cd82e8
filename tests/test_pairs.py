import json
import os

import pytest

from factory.pairs import coco_images, count_pairs, read_pairs, voc_images, write_pairs
from factory.vocab import VOCABULARIES, open_vocabulary


@pytest.fixture
def coco_json(tmp_path):
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 63, "name": "couch"},
            {"id": 74, "name": "mouse"}]
    anns = [(1, 1), (1, 18), (1, 18), (2, 1), (2, 63), (2, 74), (3, 18), (3, 1)]
    doc = {"categories": cats, "images": [{"id": i} for i in (1, 2, 3)],
           "annotations": [{"id": k, "image_id": i, "category_id": c}
                           for k, (i, c) in enumerate(anns)]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    os.makedirs(root / "ImageSets" / "Segmentation")
    os.makedirs(root / "Annotations")
    objs = {"a": ["person", "sofa", "person"], "b": ["sofa", "tvmonitor"], "c": ["cat"]}
    for image_id, names in objs.items():
        xml = "".join(f"<object><name>{n}</name></object>" for n in names)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{xml}</annotation>")
    (root / "ImageSets" / "Segmentation" / "trainval.txt").write_text("a\nb\nc\n")
    return str(root)


def test_coco_pairs_count_images_in_the_vocabularys_spelling(coco_json):
    coco = count_pairs(coco_images(coco_json), VOCABULARIES["coco"])
    assert coco == {("person", "dog"): 2, ("person", "couch"): 1}  # mouse is not in COCO-sim
    pascal = count_pairs(coco_images(coco_json), VOCABULARIES["pascal"])
    assert pascal == {("dog", "person"): 2, ("person", "sofa"): 1}  # VOC order, VOC names


def test_voc_pairs(voc_root):
    pairs = count_pairs(voc_images(voc_root), VOCABULARIES["pascal"])
    assert pairs == {("person", "sofa"): 1, ("sofa", "tvmonitor"): 1}


def test_pairs_file_round_trip_and_checks(tmp_path, coco_json):
    path = str(tmp_path / "pairs.json")
    counts = count_pairs(coco_images(coco_json), VOCABULARIES["coco"])
    assert write_pairs(path, counts, VOCABULARIES["coco"], source=coco_json, min_count=2) == 1
    assert read_pairs(path, VOCABULARIES["coco"]) == (("person", "dog"),)
    with pytest.raises(ValueError, match="for vocabulary 'coco', not 'pascal'"):
        read_pairs(path, VOCABULARIES["pascal"])
    doc = json.loads(open(path).read())
    doc["pairs"] = [["person", "unicorn"]]
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(ValueError, match="lacks: unicorn"):
        read_pairs(path, VOCABULARIES["coco"])


def test_a_pairs_file_may_start_with_a_byte_order_mark(tmp_path, coco_json):
    path = tmp_path / "pairs.json"
    counts = count_pairs(coco_images(coco_json), VOCABULARIES["coco"])
    write_pairs(str(path), counts, VOCABULARIES["coco"], source=coco_json)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as an editor on Windows saves it
    assert read_pairs(str(path), VOCABULARIES["coco"]) == (("person", "dog"), ("person", "couch"))


def test_a_pair_too_long_for_one_prompt_is_refused(tmp_path):
    from actors.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    a, b = " ".join(["zebra"] * 35), " ".join(["horse"] * 35)  # 41 tokens each in one prompt
    vocab = open_vocabulary([a, b, "cat"], tokenizer=tokenizer).vocab
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"vocabulary": vocab.name, "pairs": [[b, "cat"]]}))
    assert read_pairs(str(path), vocab, tokenizer) == ((b, "cat"),)
    path.write_text(json.dumps({"vocabulary": vocab.name, "pairs": [[b, "cat"], [a, b]]}))
    with pytest.raises(ValueError, match=r"pairs.json': pair 'zebra .*' and 'horse .*' is 78 "
                                         r"tokens in its prompt; CLIP reads at most 77$"):
        read_pairs(str(path), vocab, tokenizer)
