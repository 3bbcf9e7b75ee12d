"""KonIQ-10k: 10,073 in-the-wild photos, images in `1024x768/` (or the `512x384/` release).

Two label files are published and both are read:
- `koniq10k_scores_and_distributions.csv` (the main release, the paper's file): `MOS` on the
  1-5 scale, target = MOS / 5 (docs/recipe.md);
- `koniq10k_distributions_sets.csv` (the repository's metadata variant): `MOS` on the 0-100
  z-score scale plus the official `set` column (training/validation/test), target = MOS / 100.
The main file is used when both are present, and the `set` column is then read from the sets file
by image name, so `--split-by official` works on the paper's targets; `score_scale` names the file
and scale used, `sources` every file read.
"""

from dataclasses import replace
from pathlib import Path

from iqa.cache.manifest import Manifest, file_sha256
from iqa.data.readers import DatasetError, read_csv_columns, to_names
from iqa.data.table_release import TableRelease

IMAGE_FOLDERS = ("1024x768", "512x384")
MAIN = TableRelease(dataset="koniq10k", labels="koniq10k_scores_and_distributions.csv", name_column="image_name",
                    score_column="MOS", score_range=(0, 5), scale="MOS 1-5", image_folders=IMAGE_FOLDERS,
                    number_extras=("SD", "MOS_zscore"))
SETS = replace(MAIN, labels="koniq10k_distributions_sets.csv", score_range=(0, 100), scale="MOS 0-100 z-score",
               number_extras=("SD",), text_extras=("set",))


def load(root: Path, images: str | None = None) -> Manifest:
    if not (root / MAIN.labels).is_file():
        if (root / SETS.labels).is_file():
            return SETS.load(root, images)
        raise DatasetError(f"label file not found: neither {MAIN.labels} nor {SETS.labels} in {root}")
    manifest = MAIN.load(root, images)
    if (root / SETS.labels).is_file():
        manifest.extras["set"] = published_sets(root / SETS.labels, manifest.paths)
        manifest.sources[SETS.labels] = file_sha256(root / SETS.labels)
    return manifest


def published_sets(labels: Path, paths: list[str]) -> list[str]:
    """The sets file's `set` of each image in `paths`, matched by name; every image must be listed."""
    table = read_csv_columns(labels, ["image_name", "set"])
    of = dict(zip(to_names(table["image_name"], "image_name", labels), table["set"]))
    missing = [p for p in paths if p not in of]
    if missing:
        raise DatasetError(f"{labels.name} lists no set for {len(missing)} images of the main release file "
                           f"(first: {missing[0]}); use the sets file of the same release, or remove it")
    return [of[p] for p in paths]
