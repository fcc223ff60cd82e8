import pytest

from factory.cli import main
from factory.prompts import prompt_for
from factory.vocab import (
    COCO_CATEGORIES,
    FOLDS,
    VOC_CLASSES,
    VOCABULARIES,
    check_class_names,
    get_split,
    open_vocabulary,
    read_vocabulary_file,
    to_vocab_name,
)

# "zebra" is one CLIP token and "a photograph of a" four; with start and end tokens a name of
# k zebras makes a prompt of k + 6 tokens, one of 72 the first over CLIP's 77.
LONGEST = " ".join(["zebra"] * 71)
TOO_LONG = " ".join(["zebra"] * 72)
TOO_LONG_SHOWN = "'zebra zebra zebra zebra zebra zebra zebr…'"  # its first 40 characters


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


@pytest.fixture(scope="module")
def tokenizer():
    from actors.tokenizer import clip_tokenizer

    return clip_tokenizer()


def test_a_byte_order_mark_does_not_reach_the_first_name(tmp_path, tokenizer):
    text = "zebra\nred panda\n"
    (tmp_path / "bom.txt").write_text(text, encoding="utf-8-sig")  # as Windows Notepad saves
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbfzebra")
    names, _ = read_vocabulary_file(str(tmp_path / "bom.txt"))
    plain, _ = read_vocabulary_file(str(tmp_path / "plain.txt"))
    assert names == plain == ["zebra", "red panda"]
    ids = tokenizer(prompt_for((names[0],))).input_ids
    assert ids == tokenizer(prompt_for((plain[0],))).input_ids and len(ids) == 7


def test_names_are_checked_in_their_prompt_with_start_and_end_tokens(tokenizer):
    assert len(tokenizer(prompt_for((LONGEST,))).input_ids) == 77
    assert check_class_names(["zebra", LONGEST], tokenizer=tokenizer) == ["zebra", LONGEST]
    with pytest.raises(ValueError) as e:
        check_class_names(["zebra", TOO_LONG, "cat " + TOO_LONG], tokenizer=tokenizer)
    assert str(e.value) == (f"class name {TOO_LONG_SHOWN} is 78 tokens in its prompt; "
                            "class name 'cat zebra zebra zebra zebra zebra zebra…' is 79 "
                            "tokens in its prompt; CLIP reads at most 77")


def test_a_pair_whose_two_class_prompt_is_too_long_is_refused(tmp_path, tokenizer):
    a, b = " ".join(["zebra"] * 35), " ".join(["horse"] * 35)  # 41 tokens each in one prompt
    alone = tmp_path / "alone.txt"
    alone.write_text(f"{a}\n{b}\n")
    assert read_vocabulary_file(str(alone), tokenizer) == ([a, b], [])
    paired = tmp_path / "paired.txt"
    paired.write_text(f"{a}, {b}\n")
    with pytest.raises(ValueError, match=r"paired.txt: pair 'zebra zebra .*' and 'horse .*' is "
                                         r"78 tokens in its prompt; CLIP reads at most 77$"):
        read_vocabulary_file(str(paired), tokenizer)


@pytest.mark.parametrize(("names", "message"), [
    (["dog", "", "cat"], "class name 2 of 3 is empty"),
    (["dog", " \t "], "class name 2 of 2 is empty"),
    (["Dog", "cat", "dog"], "'Dog' and 'dog' differ only in case or spacing: give one of them"),
    (["hot dog", "hot  dog"],
     "'hot dog' and 'hot  dog' differ only in case or spacing: give one of them"),
    ([" zebra", "ZEBRA "],
     "' zebra' and 'ZEBRA ' differ only in case or spacing: give one of them"),
    (["dog", "cat", "dog"], "class name 'dog' is given twice: give it once"),
])
def test_empty_and_look_alike_names_are_refused(names, message):
    with pytest.raises(ValueError) as e:
        check_class_names(names)
    assert str(e.value) == message


def test_names_come_back_with_single_inner_spaces_and_their_case():
    assert check_class_names(["  red \t panda ", "Zebra"]) == ["red panda", "Zebra"]
    assert open_vocabulary([" red  panda", "zebra "]).vocab.names == ("red panda", "zebra")


def test_a_vocabulary_file_names_a_class_in_several_lines_but_not_in_two_spellings(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("zebra\nfire  truck, zebra \nfire  truck, red panda\n")
    names, pairs = read_vocabulary_file(str(path))
    assert names == ["zebra", "fire truck", "red panda"]
    assert pairs == [("fire truck", "zebra"), ("fire truck", "red panda")]
    path.write_text("zebra\nfire truck, Zebra\n")
    with pytest.raises(ValueError, match="vocab.txt: 'zebra' and 'Zebra' differ only in case"):
        read_vocabulary_file(str(path))


@pytest.mark.parametrize(("classes", "message"), [
    ("dog,Dog", "'dog' and 'Dog' differ only in case or spacing: give one of them"),
    ("dog,,cat", "class name 2 of 3 is empty"),
    (f"dog,{TOO_LONG}", f"class name {TOO_LONG_SHOWN} is 78 tokens in its prompt; CLIP reads "
                        "at most 77"),
])
def test_label_refuses_bad_class_names_in_one_line_before_ray_and_writing(
        run_cli, tmp_path, tiny_checkpoint, monkeypatch, classes, message):
    import factory.pools

    ray_starts = []
    monkeypatch.setattr(factory.pools, "connect_ray", ray_starts.append)
    out = tmp_path / "out"
    code, _, err = run_cli(main, ["label", "--checkpoint", tiny_checkpoint, "--classes", classes,
                                  "--out", str(out), "--n", "2"])
    assert (code, err.splitlines()) == (2, [f"factory: error: {message}"])
    assert not out.exists() and ray_starts == []
