"""Any other dataset: a CSV (or .xlsx) with an image column and a score column.

The caller says which columns hold what and the score range [LO, HI] the scores were given
on; target = (y - LO) / (HI - LO), or (HI - y) / (HI - LO) with `lower_better` (DMOS and
other "lower is better" scales). An optional group column marks content groups for
`--split-by group`. Image paths are relative to the root, or to `images` under it.
"""

import math
from pathlib import Path

from iqa.cache.manifest import Manifest
from iqa.data.readers import DatasetError
from iqa.data.table_release import TableRelease


def parse_score_range(text: str) -> tuple[float, float]:
    """'LO,HI' as given on the command line, e.g. '0,100' or '1,5'."""
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise DatasetError(f"score range must be LO,HI (two numbers), got {text!r}") from None
    return checked_range(lo, hi)


def checked_range(lo: float, hi: float) -> tuple[float, float]:
    """LO < HI, both finite and HI - LO too: an infinite or NaN bound maps every score to NaN or 0."""
    if not all(math.isfinite(v) for v in (lo, hi, hi - lo)):
        raise DatasetError(f"score range must be two finite numbers, got {lo:g},{hi:g}; give the scale's real ends, e.g. 0,100")
    if not lo < hi:
        raise DatasetError(f"score range must have LO < HI, got {lo:g},{hi:g}")
    return lo, hi


def load(
    root: Path,
    labels: str | None = None,
    image_col: str | None = None,
    score_col: str | None = None,
    score_range: tuple[float, float] | str | None = None,
    lower_better: bool = False,
    group_col: str | None = None,
    name: str = "csv",
    images: str | None = None,
) -> Manifest:
    needed = {"--labels": labels, "--image-col": image_col, "--score-col": score_col, "--score-range": score_range}
    missing = [flag for flag, value in needed.items() if value is None]
    if missing:
        raise DatasetError(f"a custom csv dataset needs {' '.join(missing)}")
    if isinstance(score_range, str):
        score_range = parse_score_range(score_range)
    lo, hi = checked_range(*score_range)
    release = TableRelease(
        dataset=name,
        labels=labels,  # relative to the root, or absolute (pathlib keeps an absolute one)
        name_column=image_col,
        score_column=score_col,
        score_range=(lo, hi),
        scale=f"score {lo:g}-{hi:g}, {'lower' if lower_better else 'higher'} is better",
        image_folders=(".",),
        lower_better=lower_better,
        group_column=group_col,
    )
    return release.load(root, images)
