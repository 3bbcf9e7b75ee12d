"""Which epoch a run keeps: the selection rule behind its recorded metrics and its saved weights.

`test` (the paper's protocol, optimistic): the epoch of best test SRCC. `val`: the epoch of best
SRCC on a validation part carved from the seed's training split, so no test row influences the
choice. `last`: the final epoch.
"""

import numpy as np

SELECTION_RULES = ("test", "val", "last")
SCORE_CURVE = {"test": "srcc", "val": "val_srcc"}


def check_rule(select: str) -> None:
    if select not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {select!r}; choose from {', '.join(SELECTION_RULES)}")


def selected_epoch(curve: dict[str, list], select: str = "test") -> int:
    """0-based index of the epoch the rule keeps (the first of equal bests; NaN never wins)."""
    check_rule(select)
    if select == "last":
        return len(curve["srcc"]) - 1
    scores = np.nan_to_num(np.array(curve[SCORE_CURVE[select]], dtype=float), nan=-np.inf)
    return int(np.argmax(scores))


def improved(scores: list[float], best: list[float], select: str) -> list[bool]:
    """Per member: does this epoch replace the kept one (strictly better, as `selected_epoch` picks the first best)?"""
    if select == "last":
        return [True] * len(scores)
    return [bool(np.isfinite(s) and s > b) for s, b in zip(scores, best)]


def carve_validation(train_rows: np.ndarray, seed: int, fraction: float,
                     groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows: a `fraction` of the seed's training rows, drawn from the seed alone. With
    `groups` (a content-held-out split) whole groups are drawn until they hold the fraction, so no photo
    is on both sides."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    from iqa.heads.models.mlp import member_seed

    n_val = max(2, round(fraction * len(train_rows)))  # SRCC needs two rows
    rng = np.random.default_rng(member_seed(seed, "validation"))
    if groups is None:
        chosen = rng.permutation(len(train_rows))
        return np.sort(train_rows[chosen[n_val:]]), np.sort(train_rows[chosen[:n_val]])
    of_row = np.array([groups[r] for r in train_rows], dtype=object)
    held = set()
    for group in rng.permutation(sorted(set(of_row))):
        if np.isin(of_row, list(held)).sum() >= n_val:
            break
        held.add(group)
    in_val = np.isin(of_row, list(held))
    if in_val.all():
        raise ValueError(f"the training rows hold too few content groups to carve a validation part of {fraction:g}")
    return np.sort(train_rows[~in_val]), np.sort(train_rows[in_val])
