"""The distortion pointing-game set: 2x2 grids of demo photos with exactly one cell distorted.

The ALOE appendix's Grid Pointing Game asks an explanation to point at the one cell of a grid
that holds the class; here the "class" is low quality. Each grid holds four different demo
photographs (centre-cropped square, resized to CELL pixels) and one of them, the cell
`cell` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), carries a local distortion at
level LEVEL of the demo set's scale: blur, noise, JPEG or pixelation (the ones a whole-image
statistic cannot tell from content; colour and brightness changes are left out). Grid i takes
cell i mod 4 and distortion (i div 4) mod 4, and its photos from a generator seeded by i alone,
so a build is the same on every machine. Layout: `images/grid-XXX.png` and `labels.csv`
(image, cell, distortion, level, photos).
"""

import csv
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from iqa.data.demo import DISTORTIONS, PHOTOS, _save_png, _seed, build_folder, load_photo

GRIDPG_DIR = "gridpg"  # default folder inside the cache
LABELS_FILE = "labels.csv"
GRID_DISTORTIONS = ("blur", "noise", "jpeg", "pixelate")
LEVEL = 4  # of 5: clearly visible, as the demo models see it
CELL = 128
GRIDS = 32
SEED = 16


@cache  # grids share photos; distortions return new images, never change this one
def square_cell(photo: str, side: int) -> Image.Image:
    """The photo centre-cropped square at `side` pixels."""
    image, _ = load_photo(photo, side)
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def make_grid(index: int, cell_side: int = CELL, distortions: tuple[str, ...] = GRID_DISTORTIONS,
              distorted: bool = True) -> tuple[Image.Image, dict]:
    """Grid `index` and its label row; `distorted=False` gives its pristine twin (the same photos)."""
    rng = np.random.default_rng([SEED, index])
    photos = [list(PHOTOS)[i] for i in rng.choice(len(PHOTOS), 4, replace=False)]
    cell, distortion = index % 4, distortions[(index // 4) % len(distortions)]
    distort, parameters = DISTORTIONS[distortion]
    grid = Image.new("RGB", (2 * cell_side, 2 * cell_side))
    for k, photo in enumerate(photos):
        image = square_cell(photo, cell_side)
        if distorted and k == cell:
            image = distort(image, parameters[LEVEL - 1], _seed(photo, LEVEL))
        grid.paste(image, ((k % 2) * cell_side, (k // 2) * cell_side))
    return grid, {"image": f"images/grid-{index:03d}.png", "cell": cell, "distortion": distortion, "level": LEVEL,
                  "photos": "+".join(photos)}


def make_gridpg(out_dir: Path, grids: int = GRIDS, cell_side: int = CELL, force: bool = False,
                distortions: tuple[str, ...] = GRID_DISTORTIONS, progress: bool = True) -> Path:
    """Build the grid set into `out_dir` (built aside and renamed into place; a bar naming `out_dir` on stderr
    with `progress`); its labels CSV."""
    def build(folder: Path) -> None:
        (folder / "images").mkdir()
        rows = []
        for index in tqdm(range(grids), desc=f"building the grid set {out_dir}", disable=not progress):
            grid, row = make_grid(index, cell_side, distortions)
            _save_png(grid, folder / row["image"])
            rows.append(row)
        with open(folder / LABELS_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    build_folder(Path(out_dir), build, force)
    return Path(out_dir) / LABELS_FILE


def grid_set_or_default(cache: Path, given: Path | None = None, progress: bool = True) -> Path:
    """`given`, else the default set `<cache>/gridpg`, built on first use (saying where, with `progress`)."""
    if given is not None:
        return Path(given)
    default = Path(cache) / GRIDPG_DIR
    if not default.exists():
        make_gridpg(default, progress=progress)
    return default


def read_gridpg(folder: Path) -> list[tuple[Path, int]]:
    """(grid image path, distorted cell) per grid of a set."""
    labels = Path(folder) / LABELS_FILE
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} is missing: not a grid set (`iqa data make-gridpg` builds one)")
    with open(labels, newline="") as f:
        return [(Path(folder) / row["image"], int(row["cell"])) for row in csv.DictReader(f)]
