"""The distortion type of each image of a synthetic-distortion set, read from its file name.

- KADID-10k names its images `I<ref>_<type>_<level>.png` (`I01_05_03.png`: reference 1, type 05,
  level 3); the 25 types are numbered as in its release (Lin et al. 2019, Table 1).
- The demo set (data/demo.py) names them `<photo>_<distortion>_<level>.png`, its seven distortions,
  and the pristine source `<photo>.png`.
Other datasets have no types in their names: `distortion_types` gives None for them.
"""

import re
from pathlib import PurePosixPath

from iqa.data.demo import DATASET as DEMO_DATASET, DISTORTIONS as DEMO_DISTORTIONS

KADID_TYPES = (
    "gaussian blur", "lens blur", "motion blur", "color diffusion", "color shift", "color quantization",
    "color saturation 1", "color saturation 2", "jpeg2000", "jpeg", "white noise", "white noise in color component",
    "impulse noise", "multiplicative noise", "denoise", "brighten", "darken", "mean shift", "jitter",
    "non-eccentricity patch", "pixelate", "quantization", "color block", "high sharpen", "contrast change",
)
KADID_NAME = re.compile(r"I\d+_(\d+)_\d+")
PRISTINE = "pristine"


def kadid_type(path: str) -> str:
    """`I01_05_03.png` -> "05 color shift"."""
    match = KADID_NAME.fullmatch(PurePosixPath(path).stem)
    number = int(match.group(1)) if match else 0
    if not 1 <= number <= len(KADID_TYPES):
        raise ValueError(f"{path} is not named like a KADID-10k image (I<ref>_<type 01-25>_<level>.png)")
    return f"{number:02d} {KADID_TYPES[number - 1]}"


def demo_type(path: str, distortions: tuple[str, ...]) -> str:
    """`images/coffee_blur_3.png` -> "blur"; the pristine `images/coffee.png` -> "pristine" (photo names have no "_")."""
    parts = PurePosixPath(path).stem.split("_")
    if len(parts) == 1:
        return PRISTINE
    if len(parts) != 3 or parts[1] not in distortions or not parts[2].isdigit():
        raise ValueError(f"{path} is not named like a demo image (<photo>_<distortion>_<level>.png)")
    return parts[1]


def distortion_types(dataset: str, paths: list[str]) -> list[str] | None:
    """Each image's distortion type, for KADID-10k and the demo set; None for any other dataset."""
    if dataset == "kadid10k":
        return [kadid_type(p) for p in paths]
    if dataset == DEMO_DATASET:
        return [demo_type(p, tuple(DEMO_DISTORTIONS)) for p in paths]
    return None
