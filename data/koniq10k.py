"""KonIQ-10k: 10,073 in-the-wild photos, images in `1024x768/` (or the `512x384/` release).

Two label files are published and both are read:
- `koniq10k_scores_and_distributions.csv` (the main release, the paper's file): `MOS` on the
  1-5 scale, target = MOS / 5 (SPEC.md);
- `koniq10k_distributions_sets.csv` (the repository's metadata variant): `MOS` on the 0-100
  z-score scale plus the official `set` column (training/validation/test), target = MOS / 100.
The main file is used when both are present; `score_scale` names the file and scale used.
"""

from pathlib import Path

from iqa.cache.manifest import Manifest
from iqa.data.readers import DatasetError
from iqa.data.table_release import TableRelease

RELEASE_COUNT = 10_073
IMAGE_FOLDERS = ("1024x768", "512x384")
VARIANTS = (
    TableRelease(
        dataset="koniq10k",
        labels="koniq10k_scores_and_distributions.csv",
        name_column="image_name",
        score_column="MOS",
        score_range=(0, 5),
        scale="MOS 1-5",
        image_folders=IMAGE_FOLDERS,
        number_extras=("SD", "MOS_zscore"),
    ),
    TableRelease(
        dataset="koniq10k",
        labels="koniq10k_distributions_sets.csv",
        name_column="image_name",
        score_column="MOS",
        score_range=(0, 100),
        scale="MOS 0-100 z-score",
        image_folders=IMAGE_FOLDERS,
        number_extras=("SD",),
        text_extras=("set",),
    ),
)


def load(root: Path, images: str | None = None) -> Manifest:
    for variant in VARIANTS:
        if (root / variant.labels).is_file():
            return variant.load(root, images)
    raise DatasetError(f"label file not found: neither {' nor '.join(v.labels for v in VARIANTS)} in {root}")
