import numpy as np
import pytest

from iqa.data.splits import split_indices
from iqa.heads.models.mlp import member_seed


def test_random_split_is_80_20_disjoint_and_order_free():
    paths = [f"img_{i:04d}.jpg" for i in range(1001)]
    train, test = split_indices(paths, seed=8)
    assert len(train) == round(0.8 * 1001) and len(train) + len(test) == 1001
    assert not set(train) & set(test)
    # Shuffling the rows moves no image to the other side.
    perm = np.random.default_rng(0).permutation(len(paths))
    shuffled = [paths[i] for i in perm]
    train_s, _ = split_indices(shuffled, seed=8)
    assert {shuffled[i] for i in train_s} == {paths[i] for i in train}


def test_seeds_give_different_splits():
    paths = [f"{i}.png" for i in range(200)]
    a, _ = split_indices(paths, seed=8)
    b, _ = split_indices(paths, seed=19)
    assert set(a) != set(b)


def test_group_split_keeps_each_group_on_one_side():
    groups = [f"ref{i % 37}" for i in range(740)]
    paths = [f"d{i}.png" for i in range(740)]
    train, test = split_indices(paths, seed=25, by="group", groups=groups)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert len(train) >= 592 and len(train) + len(test) == 740


def test_group_split_without_groups_is_an_error():
    with pytest.raises(ValueError, match="content groups"):
        split_indices(["a", "b"], seed=8, by="group")


def test_splits_and_member_seeds_are_pinned():
    """docs/datasets.md promises the same split on every machine and library version: these are fixed values."""
    paths = [f"img_{i:02d}.jpg" for i in range(20)]
    tests = {seed: split_indices(paths, seed)[1].tolist() for seed in (8, 19, 25)}
    assert tests == {8: [2, 8, 14, 15], 19: [1, 9, 11, 16], 25: [3, 12, 13, 14]}
    groups = [f"r{i % 4}" for i in range(8)]
    assert split_indices([f"d{i}.png" for i in range(8)], 25, by="group", groups=groups)[1].tolist() == [1, 5]
    assert member_seed(8, "order") == 8159973449159769457
    assert member_seed(19, "init") == 713091851431809872
    assert member_seed(25, "torch") == 2601398551658057986


def test_official_split_is_the_set_column_whatever_the_seed():
    sets = ["training", "test", "validation", "training", "test", "training"]
    for seed in (8, 19):
        train, test = split_indices([f"{i}.jpg" for i in range(6)], seed, by="official", sets=sets)
        assert train.tolist() == [0, 3, 5] and test.tolist() == [1, 4]
    with pytest.raises(ValueError, match="published split"):
        split_indices(["a", "b"], seed=8, by="official")
    with pytest.raises(ValueError, match="'train'"):
        split_indices(["a", "b"], seed=8, by="official", sets=["train", "test"])
