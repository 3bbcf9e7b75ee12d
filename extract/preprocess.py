"""Decoding and preprocessing, with PIL and numpy only (no torchvision).

Every image becomes 8-bit RGB the same way: EXIF orientation applied; 16-bit greyscale scaled
to 8 bits (not clipped); transparency composited on white (what a viewer sees); CMYK, palette
and grey converted by PIL. Then, with the checkpoint's own PIL filter (bicubic or bilinear,
antialiased when shrinking), either the whole image is resized to `resolution` x `resolution`
("square", no crop) or its shortest side is resized and the centre cropped ("native"), and the
batch is scaled to [0, 1] and normalised with the encoder's mean and std.

A file that cannot be decoded yields a reason instead of an exception, so one bad image never
stops a run: missing, not an image, truncated or corrupt, or a decompression bomb (more pixels
than PIL's MAX_IMAGE_PIXELS; PIL's warning is treated as an error).
"""

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from iqa.cache.stamps import missing_stamp, stamp

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_image(path: Path) -> tuple[Image.Image | None, str | None, np.ndarray]:
    """(RGB image, None, stamp) or (None, reason, stamp); the stamp (cache/stamps.py) records the
    file's size, mtime and bytes as read here, so a later change to the file can be noticed."""
    try:
        stat, data = path.stat(), path.read_bytes()
    except OSError:  # missing, a folder, or unreadable
        return None, "missing file", missing_stamp()
    return *decode_bytes(data), stamp(stat, data)


def decode_bytes(data: bytes) -> tuple[Image.Image | None, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_rgb(ImageOps.exif_transpose(image)), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"decompression bomb: {err}"
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for truncated and corrupt data
        return None, f"truncated or corrupt: {err}"


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_uint8(image: Image.Image, resolution: int, resample: str = "bicubic",
                 shortest_side: int | None = None) -> torch.Tensor:
    """[3, R, R] uint8: the whole image resized, or (with `shortest_side`) the shortest edge resized
    to that side keeping the aspect ratio, then the centre R x R cropped."""
    if shortest_side is None:
        resized = image.resize((resolution, resolution), RESAMPLE[resample])
    else:
        (w, h), (left, top) = centre_crop(image.size, resolution, shortest_side)
        resized = image.resize((w, h), RESAMPLE[resample]).crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)


def centre_crop(size: tuple[int, int], resolution: int, shortest_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((W', H'), (left, top)): the size an image of PIL size `size` is resized to, its shortest edge to
    `shortest_side` (never below `resolution`), and the corner of the centre `resolution` square cut from it."""
    w, h = size
    scale = shortest_side / min(w, h)
    w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return (w, h), ((w - resolution) // 2, (h - resolution) // 2)


def normalise(batch: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1], minus mean, over std (per channel)."""
    mean_t = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean_t) / std_t


def recipe(resolution: int | None, mean: tuple, std: tuple, resample: str = "bicubic",
           shortest_side: int | None = None) -> str:
    """What was done to each image, in words: stored in every store's fingerprint."""
    decode = "PIL decode, EXIF transpose, 16-bit/grey/CMYK/palette to RGB, alpha on white"
    if resolution is None:
        return f"{decode}; features computed in the decode worker at native size"
    geometry = (f"resize {resolution}x{resolution} {resample}, no crop" if shortest_side is None
                else f"resize shortest side to {shortest_side} {resample}, centre crop {resolution}x{resolution}")
    return f"{decode}; {geometry}; /255; mean {mean} std {std}"
