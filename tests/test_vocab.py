import pytest

from factory.vocab import (
    COCO_CATEGORIES,
    FOLDS,
    VOC_CLASSES,
    VOCABULARIES,
    get_split,
    to_vocab_name,
)


def test_vocabularies_have_the_datasets_classes_and_ids():
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert len(COCO_CATEGORIES) == 80 and max(COCO_CATEGORIES) == 90
    pascal, coco = VOCABULARIES["pascal"], VOCABULARIES["coco"]
    assert pascal.ids == tuple(range(1, 21)) and pascal.id_of("tvmonitor") == 20
    assert len(coco.names) == 79 and "mouse" not in coco.names  # COCO-sim drops mouse
    assert coco.id_of("person") == 1 and coco.id_of("toothbrush") == 90
    assert coco.id_of("couch") == 63 and coco.id_of("aeroplane") == 5


@pytest.mark.parametrize(("vocab", "name", "coco_name"), [
    ("pascal", "aeroplane", "airplane"), ("pascal", "tvmonitor", "tv"),
    ("pascal", "motorbike", "motorcycle"), ("pascal", "sofa", "couch"),
    ("pascal", "pottedplant", "potted plant"), ("pascal", "diningtable", "dining table"),
    ("coco", "couch", "couch"), ("coco", "hair drier", "hair drier"),
    ("coco", "tvmonitor", "tv"),
])
def test_prompt_names_map_to_the_detectors_coco_class(vocab, name, coco_name):
    v = VOCABULARIES[vocab]
    assert COCO_CATEGORIES[v.detector_ids[name]] == coco_name
    assert to_vocab_name(coco_name, v) == name


def test_every_class_has_a_detector_class():
    for v in VOCABULARIES.values():
        assert set(v.detector_ids) == set(v.names)
        assert len(set(v.detector_ids.values())) == len(v.names)


@pytest.mark.parametrize(("split", "fold"), [(s, f) for s in FOLDS for f in FOLDS[s]])
def test_every_fold_partitions_its_class_list(split, fold):
    s = get_split(split, fold)
    assert not set(s.seen) & set(s.unseen)
    assert sorted(s.seen + s.unseen) == sorted(s.vocab.names)
    assert len(s.seen) == len(set(s.seen))
    assert (len(s.seen), len(s.unseen)) == {"pascal": (15, 5), "coco": (65, 14)}[split]


def test_folds_are_the_papers_and_zs3():
    assert set(get_split("pascal", "1").unseen) == {"tvmonitor", "car", "dog", "sofa", "train"}
    assert set(get_split("pascal", "zs3").unseen) == {
        "pottedplant", "sheep", "sofa", "train", "tvmonitor"}
    assert "couch" in get_split("coco", "3").unseen  # Table 5's second 'bench'
    unseen = [set(get_split("coco", f).unseen) for f in "123"]
    assert not (unseen[0] & unseen[1] or unseen[1] & unseen[2] or unseen[0] & unseen[2])


@pytest.mark.parametrize(("split", "fold", "message"), [
    ("ade", "1", "unknown split 'ade'"), ("coco", "zs3", "unknown fold 'zs3'"),
    ("pascal", "4", "unknown fold '4'"),
])
def test_unknown_split_or_fold_is_refused(split, fold, message):
    with pytest.raises(ValueError, match=message):
        get_split(split, fold)
