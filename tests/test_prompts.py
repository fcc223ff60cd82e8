import collections

import pytest

from factory.prompts import SamplePlan, prompt_for
from factory.vocab import get_split


def plan(split="pascal", fold="1", subset="train", seed=0, **kw):
    return SamplePlan(get_split(split, fold), subset, seed, **kw)


def test_prompt_templates():
    assert prompt_for(("dog",)) == "a photograph of a dog"
    assert prompt_for(("dog", "cat")) == "a photograph of a dog and a cat"
    with pytest.raises(ValueError):
        prompt_for(("a", "b", "c"))


def test_sample_is_a_pure_function_of_run_and_index():
    a = [plan().sample(i) for i in range(50)]
    b = [plan().sample(i) for i in reversed(range(50))][::-1]
    assert a == b
    assert plan(seed=1).sample(3) != a[3]
    assert plan(fold="2").sample(3) != a[3]
    assert len({s.noise_seed for s in a}) == 50


def test_train_draws_seen_classes_half_one_half_two():
    p = plan()
    samples = [p.sample(i) for i in range(2000)]
    assert {c for s in samples for c in s.classes} == set(p.split.seen)
    two = sum(len(s.classes) == 2 for s in samples)
    assert 900 < two < 1100
    assert all(len(set(s.classes)) == len(s.classes) for s in samples)
    assert all(s.prompt == prompt_for(s.classes) for s in samples)
    only_one = plan(two_class_ratio=0.0)
    assert all(len(only_one.sample(i).classes) == 1 for i in range(200))


@pytest.mark.parametrize(("split", "n", "pairs"), [("pascal", 1310, 142), ("coco", 5488, 1559)])
def test_test_subset_has_the_papers_counts(split, n, pairs):
    p = plan(split, subset="test")
    assert p.default_n() == n and len(p.test_pairs) == pairs
    samples = [p.sample(i) for i in range(n)]
    singles = collections.Counter(s.classes[0] for s in samples if len(s.classes) == 1)
    assert set(singles.values()) == {30} and set(singles) == set(p.split.vocab.names)
    assert plan(split, subset="train").default_n() is None


def test_pairs_file_pairs_are_used_and_train_keeps_seen_ones():
    pairs = (("person", "horse"), ("person", "dog"), ("cat", "chair"))  # dog is unseen in fold 1
    p = plan(pairs=pairs, two_class_ratio=1.0)
    drawn = {frozenset(p.sample(i).classes) for i in range(100)}
    assert drawn == {frozenset(("person", "horse")), frozenset(("cat", "chair"))}
    t = plan(subset="test", pairs=pairs)
    assert t.default_n() == 20 * 30 + 3 * 5


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="unknown subset 'val'"):
        plan(subset="val")
    with pytest.raises(ValueError, match="lacks: zebra"):
        plan(pairs=(("person", "zebra"),))
    with pytest.raises(ValueError, match="two seen classes"):
        plan(pairs=(("person", "dog"),))
    with pytest.raises(ValueError, match="ratio"):
        plan(two_class_ratio=1.5)
