"""LIVE In the Wild Image Quality Challenge (CLIVE): 1,162 photos, images in `Images/`.

The release stores its labels as MATLAB files in `Data/`: `AllImages_release.mat` holds the
cell array `AllImages_release` (1169 x 1, image names) and `AllMOS_release.mat` the row vector
`AllMOS_release` (1 x 1169, MOS 0-100), in the same order. The first 7 entries (t1.bmp ...
t7.bmp, in `Images/trainingImages/`) are the images shown to subjects to train them before
rating; they are not part of the benchmark and are dropped here, as every published split
does (entries 7:1169), leaving 1,162 rows. Target = MOS / 100.
"""

from pathlib import Path

import numpy as np

from iqa.cache.manifest import Manifest, file_sha256
from iqa.data.readers import DatasetError, image_folder, require_file

TRAINING_IMAGES = 7  # leading entries of the release lists that only trained the subjects


def _variable(path: Path, name: str) -> np.ndarray:
    require_file(path)
    import scipy.io  # here, not at the top: it costs `iqa --help` 0.2 s

    try:
        contents = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged or non-MATLAB file
        raise DatasetError(f"{path.name}: unreadable MATLAB file ({type(e).__name__}: {e})") from None
    if name not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise DatasetError(f"{path.name}: no variable {name!r}; it has {found}")
    return contents[name]


def load(root: Path, images: str | None = None) -> Manifest:
    names_file, mos_file = root / "Data" / "AllImages_release.mat", root / "Data" / "AllMOS_release.mat"
    # Each cell of the names array is a 1-element string array (MATLAB char row).
    names = [str(np.ravel(cell)[0]).strip() for cell in np.ravel(_variable(names_file, "AllImages_release"))]
    scores = np.ravel(_variable(mos_file, "AllMOS_release")).astype(np.float64)
    if len(names) != len(scores):
        raise DatasetError(f"{names_file.name} lists {len(names)} images but {mos_file.name} has {len(scores)} scores")
    if len(names) <= TRAINING_IMAGES:
        raise DatasetError(
            f"{names_file.name} lists only {len(names)} images; the release starts with {TRAINING_IMAGES} training images"
        )
    names, scores = names[TRAINING_IMAGES:], scores[TRAINING_IMAGES:]
    return Manifest(
        dataset="clive",
        image_root=str(image_folder(root, images, ("Images",))),
        paths=names,
        scores=scores,
        targets=scores / 100.0,
        score_scale=f"MOS 0-100, target = y/100 (first {TRAINING_IMAGES} training images dropped)",
        sources={f"Data/{p.name}": file_sha256(p) for p in (names_file, mos_file)},
    )
