"""The offline demo set: KADID-10k in miniature, made from scikit-image's bundled photographs.

Fifteen photographs ship inside the scikit-image wheel (no download): eight in colour and seven
in grey (stored as RGB). Each is resized to 256 pixels on its short side (Lanczos) and is the
pristine reference of its content group. Seven distortion types are applied at five increasing
levels; saturation is skipped for the grey photos, where it changes nothing. So a colour photo
gives 1 + 7 * 5 = 36 images, a grey one 31, and the full set 505. Fifteen groups let the
content-held-out 80/20 split test on two or three photos never seen in training.

Score rule (the `score` column): colour SSIM against the pristine source,

    score = (6 * SSIM(Y) + SSIM(Cb) + SSIM(Cr)) / 8, clipped below at 0,

where Y, Cb, Cr are the full-range BT.601 (JPEG) channels computed in float and SSIM is Wang et
al. (2004) as implemented by `skimage.metrics.structural_similarity` with its paper settings
(Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255). The 6:1:1 weighting is the
one video coding uses for YCbCr PSNR; the chroma terms make the score react to saturation,
which leaves the luminance alone. Scores lie in [0, 1], higher is better, and the pristine image
scores exactly 1. Within each (photo, distortion) the score falls strictly with the level (the
levels below are chosen so; the tests check it). Load it with
`iqa data prepare csv --labels <folder>/labels.csv --image-col image --score-col score --score-range 0,1 --group-col ref`.

Layout of the output folder: `images/<photo>.png` (pristine) and
`images/<photo>_<distortion>_<level>.png`, all PNG (lossless, so a JPEG-distorted image is
stored exactly as it was scored), and `labels.csv` with columns image (path relative to the
folder), score, ref (the source photo: the content group), distortion ("pristine" for level 0),
level (0-5). Builds are deterministic: noise comes from seeds fixed per (photo, level) and
PNGs are written with fixed settings, so two builds give identical bytes.
"""

import csv
import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from tqdm import tqdm

from iqa.cache.atomic import building_folder, folder_state
from iqa.errors import ExistsError

DATASET = "demo"  # the name the demo set is prepared under
DEMO_DIR = "demo-src"  # default folder inside the cache
LABELS_FILE = "labels.csv"
MARK = ".iqa-data"  # what makes a folder one that `force` may replace (demo and grid sets)
COLUMNS = ("image", "score", "ref", "distortion", "level")
SHORT_SIDE = 256
NOISE_SEED = 6
PNG_COMPRESS_LEVEL = 1  # fast; level 6 saves only ~7% here

# Photographs bundled in the scikit-image wheel (loaded without pooch downloads), each by its
# function in `skimage.data`; the last seven are grey. Left out: synthetic images, scans of text and
# the motion-blurred clock.
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "ihc": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle",
    "retina": "retina",
    "hubble": "hubble_deep_field",
    "camera": "camera",
    "moon": "moon",
    "coins": "coins",
    "grass": "grass",
    "gravel": "gravel",
    "brick": "brick",
    "cell": "cell",
}
COLOUR_ONLY = {"saturation"}  # distortions that leave a grey photo unchanged


def _noise(image: Image.Image, sigma: float, seed: Sequence[int]) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    noisy = pixels + np.random.default_rng(list(seed)).normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return Image.open(buffer).convert("RGB")


def _pixelate(image: Image.Image, factor: int) -> Image.Image:
    small = image.resize((max(1, image.width // factor), max(1, image.height // factor)), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.NEAREST)


# name -> (distort(image, parameter, seed), parameters for levels 1..5, mildest first)
DISTORTIONS: dict[str, tuple[Callable, tuple]] = {
    "blur": (lambda im, r, _: im.filter(ImageFilter.GaussianBlur(r)), (0.75, 1.5, 2.5, 4.0, 6.0)),
    "noise": (_noise, (4.0, 8.0, 16.0, 28.0, 45.0)),
    "jpeg": (lambda im, q, _: _jpeg(im, q), (60, 35, 20, 10, 4)),
    "contrast": (lambda im, f, _: ImageEnhance.Contrast(im).enhance(f), (0.75, 0.55, 0.4, 0.27, 0.15)),
    "saturation": (lambda im, f, _: ImageEnhance.Color(im).enhance(f), (0.7, 0.45, 0.25, 0.1, 0.0)),
    "pixelate": (lambda im, k, _: _pixelate(im, k), (2, 3, 4, 6, 8)),
    "darken": (lambda im, f, _: ImageEnhance.Brightness(im).enhance(f), (0.85, 0.7, 0.55, 0.4, 0.25)),
}


def ycbcr(image: Image.Image) -> np.ndarray:
    """Full-range BT.601 Y, Cb, Cr in float (the JPEG colour transform), shape (H, W, 3)."""
    rgb = np.asarray(image, dtype=np.float64)
    matrix = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    return rgb @ matrix.T + np.array([0.0, 128.0, 128.0])


CHANNEL_WEIGHTS = np.array([6.0, 1.0, 1.0]) / 8.0


def colour_ssim(reference: Image.Image, distorted: Image.Image) -> float:
    """The documented score: 6:1:1 weighted SSIM over Y, Cb, Cr, clipped below at 0."""
    from skimage.metrics import structural_similarity  # here: scikit-image is slow to import

    ref, dist = ycbcr(reference), ycbcr(distorted)
    per_channel = [
        structural_similarity(
            ref[..., c], dist[..., c], data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for c in range(3)
    ]
    return max(0.0, float(CHANNEL_WEIGHTS @ per_channel))


def load_photo(name: str, short_side: int = SHORT_SIDE) -> tuple[Image.Image, bool]:
    """The pristine RGB image of a photo, and whether the photo has colour."""
    from skimage import data  # here: scikit-image is slow to import

    pixels = getattr(data, PHOTOS[name])()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
        pixels = pixels[0]
    image = Image.fromarray(pixels).convert("RGB")
    w, h = image.size
    size = (round(w * short_side / min(w, h)), round(h * short_side / min(w, h)))
    return image.resize(size, Image.Resampling.LANCZOS), pixels.ndim == 3


def _seed(photo: str, level: int) -> tuple[int, int, int]:
    """A noise seed fixed by the photo's name and the level, the same on every machine."""
    return NOISE_SEED, int.from_bytes(hashlib.sha256(photo.encode()).digest()[:4], "big"), level


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)


def _build_photo(folder: Path, photo: str, distortions: Sequence[str], short_side: int) -> list[tuple]:
    """Write one photo's pristine and distorted images; return their label rows."""
    pristine, colour = load_photo(photo, short_side)
    name = f"images/{photo}.png"
    _save_png(pristine, folder / name)
    rows = [(name, 1.0, photo, "pristine", 0)]
    for distortion in [d for d in distortions if colour or d not in COLOUR_ONLY]:
        distort, parameters = DISTORTIONS[distortion]
        for level, parameter in enumerate(parameters, start=1):
            image = distort(pristine, parameter, _seed(photo, level))
            name = f"images/{photo}_{distortion}_{level}.png"
            _save_png(image, folder / name)
            rows.append((name, colour_ssim(pristine, image), photo, distortion, level))
    return rows


def _build(folder: Path, photos: Sequence[str], distortions: Sequence[str], short_side: int) -> None:
    (folder / "images").mkdir()
    rows = []
    for photo in tqdm(photos, desc="demo set", unit="photo"):
        rows.extend(_build_photo(folder, photo, distortions, short_side))
    with open(folder / LABELS_FILE, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows((name, f"{score:.6f}", ref, dist, level) for name, score, ref, dist, level in rows)


def make_demo(
    out_dir: Path,
    photos: Sequence[str] | None = None,
    distortions: Sequence[str] | None = None,
    short_side: int | None = None,
    force: bool = False,
) -> Path:
    """Build the demo set into `out_dir` and return its labels CSV.

    `photos`, `distortions` and `short_side` default to all of PHOTOS, all of DISTORTIONS and
    SHORT_SIDE; smaller choices make a reduced set (for tests).

    The set is built in a temporary sibling folder and renamed into place, so a crash leaves
    nothing half-made. An existing, non-empty `out_dir` is an error unless `force`, which replaces
    a demo set built earlier, never a folder of anything else.
    """
    photos = tuple(PHOTOS) if photos is None else tuple(photos)
    distortions = tuple(DISTORTIONS) if distortions is None else tuple(distortions)
    short_side = SHORT_SIDE if short_side is None else short_side
    unknown = [p for p in photos if p not in PHOTOS] + [d for d in distortions if d not in DISTORTIONS]
    if unknown:
        raise ValueError(f"unknown photos or distortions {unknown}; choose from {list(PHOTOS)} and {list(DISTORTIONS)}")
    build_folder(Path(out_dir), lambda folder: _build(folder, photos, distortions, short_side), force)
    return Path(out_dir) / LABELS_FILE


def build_folder(out_dir: Path, build: Callable[[Path], None], force: bool = False) -> None:
    """`build(folder)` in a folder built aside and swapped onto `out_dir` (a crash leaves nothing
    half-made), marked as an iqa data set. An existing, non-empty `out_dir` is an error unless it
    carries the mark and `force` is given; a folder of anything else is never replaced."""
    state = folder_state(out_dir, MARK)
    if state in ("file", "foreign"):
        raise ExistsError(f"{out_dir} exists and is not an iqa data set; give a new or empty folder")
    if state == "marked" and not force:
        raise ExistsError(f"{out_dir} already exists; pass `force` to rebuild it")
    with building_folder(out_dir) as building:
        build(building)
        (building / MARK).write_text("built by iqa; --force replaces this folder\n")
