"""Train/test splits: 80/20 per seed, the paper's protocol (seeds 8, 19, 25).

The algorithm is defined here, not borrowed from a random number generator whose stream may
change between library versions, so a split is the same on every machine and every release:

- `random`: each image's key is sha256("<seed>:<relative path>"); the images are ordered by key
  and the first round(0.8 * N) are train, the rest test. The split of an image depends only on
  its path and the seed, never on row order.
- `group`: the same key is computed for each content group's name; groups are taken in key
  order into train until train holds at least round(0.8 * N) images, and the remaining groups
  are test. No group appears on both sides (for KADID-10k: no reference image is shared).
- `official`: a dataset's published split, the same for every seed (the seed still drives
  initialisation and data order): its `set` column's `training` rows train, `test` rows test and
  `validation` rows are held out for `--select val` (SMART-IQA's protocol). Only KonIQ-10k has
  one here: the `set` column of `koniq10k_distributions_sets.csv` from the KonIQ repository
  (subpic/koniq, metadata/), 7,058 / 1,000 / 2,015 images; the main release file has no split.
"""

import hashlib
from typing import Literal

import numpy as np

from iqa.errors import SettingError

PAPER_SEEDS = (8, 19, 25)
TRAIN_FRACTION = 0.8
SplitBy = Literal["random", "group", "official"]
SPLIT_RULES = ("random", "group", "official")
OFFICIAL_SETS = ("training", "validation", "test")


def _order(seed: int, names: list[str]) -> np.ndarray:
    keys = [hashlib.sha256(f"{seed}:{name}".encode()).digest() for name in names]
    return np.array(sorted(range(len(names)), key=keys.__getitem__), dtype=np.int64)


def split_indices(
    paths: list[str],
    seed: int,
    by: SplitBy = "random",
    groups: list[str] | None = None,
    train_fraction: float = TRAIN_FRACTION,
    sets: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of (train, test) for one seed; `sets` is the published split's column (`official`)."""
    if by == "official":
        published = official_split(sets)
        return published["training"], published["test"]
    n = len(paths)
    n_train = round(train_fraction * n)
    if by == "random":
        order = _order(seed, paths)
        train, test = order[:n_train], order[n_train:]
    elif by == "group":
        if groups is None:
            raise SettingError("`split_by` group needs a dataset with content groups")
        names = sorted(set(groups))
        rows_of = {name: [] for name in names}
        for row, name in enumerate(groups):
            rows_of[name].append(row)
        train_rows: list[int] = []
        test_rows: list[int] = []
        for g in _order(seed, names):
            side = train_rows if len(train_rows) < n_train else test_rows
            side.extend(rows_of[names[g]])
        train, test = np.array(train_rows, dtype=np.int64), np.array(test_rows, dtype=np.int64)
    else:
        raise SettingError(f"unknown split rule {by!r} for `split_by`; use {', '.join(SPLIT_RULES)}")
    return np.sort(train), np.sort(test)


def official_split(sets: list[str] | None) -> dict[str, np.ndarray]:
    """Sorted rows of each published set (training, validation, test) from a manifest's `set` column."""
    if sets is None:
        raise SettingError("`split_by` official needs the dataset's published split (a 'set' column); of the "
                         "adapters only koniq10k has one: add koniq10k_distributions_sets.csv to its --root "
                         "and run `iqa data prepare koniq10k` again")
    unknown = sorted(set(sets) - set(OFFICIAL_SETS))
    if unknown:
        raise ValueError(f"the `set` column holds {unknown}; the published split names only {', '.join(OFFICIAL_SETS)}")
    column = np.asarray(sets)
    return {name: np.flatnonzero(column == name) for name in OFFICIAL_SETS}
