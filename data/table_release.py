"""A dataset released as one label table (.csv or .xlsx): one row per image, one score column.

Most benchmarks are exactly that, so their adapters are `TableRelease` rows of one table
(data/adapters.py: which file, which columns, which score range), not code. Targets follow one rule,
target = (y - lo) / (hi - lo) over the released score range [lo, hi] (flipped when lower
is better), which gives every entry of the recipe's data table (docs/recipe.md): y/5 is the range 0-5, (y-1)/4 is 1-5.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iqa.cache.manifest import Manifest, file_sha256
from iqa.data.readers import (
    DatasetError,
    image_folder,
    read_csv_columns,
    read_xlsx_columns,
    to_floats,
    to_names,
)


def target_rule(lo: float, hi: float, lower_better: bool = False) -> str:
    """The mapping of a raw score y to a target in [0, 1], as a short formula."""
    if lower_better:
        return f"target = ({hi:g}-y)/{hi - lo:g}"
    return f"target = y/{hi:g}" if lo == 0 else f"target = (y-{lo:g})/{hi - lo:g}"


def scale_scores(scores: np.ndarray, lo: float, hi: float, lower_better: bool = False) -> np.ndarray:
    targets = (np.asarray(scores, dtype=np.float64) - lo) / (hi - lo)
    return 1.0 - targets if lower_better else targets


@dataclass(frozen=True)
class TableRelease:
    dataset: str
    labels: str  # label file, relative to the dataset root
    name_column: str  # image path relative to the image folder
    score_column: str
    score_range: tuple[float, float]  # the released scale [lo, hi]
    scale: str  # what the score is, for `score_scale`, e.g. "MOS 1-5"
    image_folders: tuple[str, ...]  # where the release unpacks its images, most likely first
    lower_better: bool = False
    group_column: str | None = None  # content group (e.g. the reference image)
    number_extras: tuple[str, ...] = ()  # further columns kept, as numbers
    text_extras: tuple[str, ...] = ()  # further columns kept, as text

    def load(self, root: Path, images: str | None = None) -> Manifest:
        labels = root / self.labels
        # an absolute path to a file under the root is named as a relative one would be: the manifest (and
        # every store's fingerprint of it) must not depend on how the same file was spelled
        named = labels.relative_to(root).as_posix() if Path(self.labels).is_absolute() and labels.is_relative_to(root) else self.labels
        lo, hi = self.score_range
        if not lo < hi:
            raise DatasetError(f"score range must have LO < HI, got {lo:g},{hi:g}")
        group = [self.group_column] if self.group_column else []
        columns = [self.name_column, self.score_column, *group, *self.number_extras, *self.text_extras]
        read = read_xlsx_columns if labels.suffix.lower() == ".xlsx" else read_csv_columns
        table = read(labels, list(dict.fromkeys(columns)))
        scores = np.array(to_floats(table[self.score_column], self.score_column, labels))
        extras = {c: to_floats(table[c], c, labels) for c in self.number_extras}
        extras |= {c: ["" if v is None else str(v) for v in table[c]] for c in self.text_extras}
        return Manifest(
            dataset=self.dataset,
            image_root=str(image_folder(root, images, self.image_folders)),
            paths=to_names(table[self.name_column], self.name_column, labels),
            scores=scores,
            targets=scale_scores(scores, lo, hi, self.lower_better),
            score_scale=f"{self.scale} ({named}), {target_rule(lo, hi, self.lower_better)}",
            groups=to_names(table[self.group_column], self.group_column, labels) if self.group_column else None,
            extras=extras,
            sources={named: file_sha256(labels)},
        )
