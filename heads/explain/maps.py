"""`iqa explain`: attribution maps of saved models (or a bare backbone's feature bands) over image files.

Per image, `<stem>.npy` holds the raw maps [K, H, W] at the image's own size (one per model, or
per band) and `<stem>.png` one page: the image, then each map over it. Maps are computed at the
backbone's input side, on the pixels extraction gives it, and put back where those pixels came from,
so a map's pixel lies over the image pixel it explains: the whole image resized square (`--preprocess
square`), or, for a model that saw centre crops (`--preprocess native`), the crop box, outlined on the
page, with zero outside it (pixels the model never sees cannot move its score).

The output folder carries a `.iqa-explain` mark: iqa writes into a new, empty or marked folder
and refuses one holding anything else.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from iqa.cache.atomic import folder_state
from iqa.cache.location import backbone_label
from iqa.extract.preprocess import centre_crop, decode_image, resize_uint8
from iqa.heads.explain.attribution import attribute, band_masks, band_target, explainable_blocks, normalised_input, score_target
from iqa.heads.saved.config import ModelConfig

MARK = ".iqa-explain"


@dataclass
class Subject:
    """What is explained: a backbone and a head (a model), or a backbone alone (its feature bands)."""

    name: str
    backbone: nn.Module
    head: nn.Module | None = None
    config: ModelConfig | None = None  # a model folder's (what it was trained and tested on)


def prepare_out(out: Path) -> Path:
    """A new, empty or marked folder; anything else is refused."""
    out = Path(out)
    if folder_state(out, MARK) in ("file", "foreign"):
        raise FileExistsError(f"{out} exists and holds files iqa did not write; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("written by iqa explain; a new run writes into this folder\n")
    return out


def input_pixels(backbone: nn.Module, image: Image.Image) -> torch.Tensor:
    """[1, 3, R, R] uint8, the way extraction resizes (square or centre crop, the checkpoint's filter)."""
    spec = backbone.spec
    return resize_uint8(image, spec.resolution, spec.resample, spec.shortest_side())[None]


def to_image_size(maps: torch.Tensor, spec, size: tuple[int, int]) -> np.ndarray:
    """[K, R, R] maps at the input side of a backbone with `spec` -> [K, H, W] float32 for an image of PIL
    size (W, H): resized whole, or placed into the centre crop of the resized image (zero around it)."""
    maps = maps.float()
    if spec.shortest_side():
        (w, h), (left, top) = centre_crop(size, spec.resolution, spec.shortest_side())
        canvas = maps.new_zeros(maps.shape[0], h, w)
        canvas[:, top:top + spec.resolution, left:left + spec.resolution] = maps
        maps = canvas
    return F.interpolate(maps[:, None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[:, 0].numpy()


def seen_box(spec, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """(left, top, right, bottom) in image pixels of what a centre-cropping backbone sees; None: the whole image."""
    if not spec.shortest_side():
        return None
    (w, h), (left, top) = centre_crop(size, spec.resolution, spec.shortest_side())
    sx, sy, r = size[0] / w, size[1] / h, spec.resolution
    return left * sx, top * sy, (left + r) * sx, (top + r) * sy


def subject_maps(subject: Subject, image: Image.Image, method: str = "gradcam", target: str = "high",
                 bands: list[tuple[float, float]] | None = None) -> tuple[np.ndarray, list[str]]:
    """([K, H, W] maps, K labels): the model's score map, or one map per feature band."""
    pixels, spec = input_pixels(subject.backbone, image), subject.backbone.spec
    if bands is None:
        maps = attribute(subject.backbone, score_target(subject.head, target), pixels, method)
        return to_image_size(maps, spec, image.size), [f"{subject.name} ({target})"]
    with torch.no_grad():
        pooled = subject.backbone(normalised_input(subject.backbone, pixels))
    masks = band_masks(pooled, bands)
    maps = torch.cat([attribute(subject.backbone, band_target(mask), pixels, method) for mask in masks])
    return to_image_size(maps, spec, image.size), [f"{subject.name} {a:g}-{b:g}%" for a, b in bands]


PANEL_INCHES = 4.5  # at 100 dpi: 450-pixel panels, legible on a report page


def write_page(image: Image.Image, maps: np.ndarray, labels: list[str], path: Path,
               boxes: list[tuple[float, float, float, float] | None] | None = None, title: str = "image") -> None:
    """The image, then each map over it (jet, alpha 0.5; each map scaled to its own maximum |value|, with a
    colour bar of that scale); a map's box (`seen_box`), where it has one, is outlined: the centre crop its
    model saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(maps)
    fig, axes = plt.subplots(1, panels, figsize=(PANEL_INCHES * panels, PANEL_INCHES), squeeze=False,
                             layout="constrained")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(title, fontsize=10)
    for ax, m, label, box in zip(axes[0, 1:], maps, labels, boxes or [None] * len(maps)):
        scale = float(np.abs(m).max()) or 1.0
        ax.imshow(image)
        signed = m.min() < 0  # IG is signed: a diverging map; Grad-CAM is not
        shown = ax.imshow(m / scale, cmap="RdBu_r" if signed else "jet", alpha=0.5, vmin=-1 if signed else 0, vmax=1)
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(f"attribution / {scale:.3g}", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        if box is not None:
            left, top, right, bottom = box
            ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                       edgecolor="white", linestyle="--", linewidth=1.2))
            label += " (centre crop)"
        ax.set_title(label, fontsize=10)
    for ax in axes[0]:
        ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predicted(subject: Subject, pixels: torch.Tensor) -> torch.Tensor:
    """The model's scores [B] of input pixels [B, 3, R, R] (target units, `iqa score`'s before the MOS map)."""
    return subject.head(subject.backbone(normalised_input(subject.backbone, pixels)).float()[None])[0].cpu()


@dataclass
class Explained:
    path: str
    page: str | None
    maps: str | None
    reason: str = ""  # why an image could not be explained


def explain_files(subjects: list[Subject], paths: list[Path], out: Path, method: str = "gradcam",
                  target: str = "high", bands: list[tuple[float, float]] | None = None,
                  targets: list[float] | None = None, progress: bool = True) -> list[Explained]:
    """One page and one .npy per readable image into `out` (`prepare_out`), a bar over the images on stderr with
    `progress`; unreadable ones carry their reason. Each model's map is titled with its predicted score; `targets`
    (the images' true targets, where known) title the image."""
    for subject in subjects:
        explainable_blocks(subject.backbone)
    out = prepare_out(out)
    done = []
    names = ", ".join(s.name for s in subjects)
    for index, path in enumerate(tqdm(list(map(Path, paths)), desc=f"maps of {names} (images)", disable=not progress)):
        image, reason, _ = decode_image(path)
        if image is None:
            done.append(Explained(str(path), None, None, reason))
            continue
        found = [subject_maps(s, image, method, target, bands) for s in subjects]
        maps = np.concatenate([m for m, _ in found])
        with torch.no_grad():
            scores = [None if s.head is None else float(predicted(s, input_pixels(s.backbone, image))[0]) for s in subjects]
        labels = [label if score is None else f"{label}\npredicted {score:.3f}"
                  for (_, ls), score in zip(found, scores) for label in ls]
        boxes = [seen_box(s.backbone.spec, image.size) for s, (_, ls) in zip(subjects, found) for _ in ls]
        stem = f"{index:04d}-{path.stem}"  # two images of one name in different folders stay apart
        np.save(out / f"{stem}.npy", maps)
        title = "image" if targets is None else f"image\ntrue {targets[index]:.3f}"
        write_page(image, maps, labels, out / f"{stem}.png", boxes, title)
        done.append(Explained(str(path), str(out / f"{stem}.png"), str(out / f"{stem}.npy")))
    return done


class ScoringHead(nn.Module):
    """A model's head behind the model's own steps from the backbone's output (the columns it reads,
    unit length with --l2norm), so a map explains the very score `iqa score` gives."""

    def __init__(self, model):
        super().__init__()
        self.model = [model]  # in a list: the model's modules stay the model's

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[1, B, D] backbone outputs -> [1, B] scores, as the head's stacked layout takes them."""
        model = self.model[0]
        return model.head(model.unit_length(model.head_inputs(pooled[0]))[None])


def model_subject(folder: Path, device: str = "cpu") -> Subject:
    """An `iqa export` folder as a Subject (refuses a missing or altered file, as `iqa score` does)."""
    from iqa.heads.saved.model import load_model

    model = load_model(folder, device)
    return Subject(Path(folder).name, model.backbone.float(), ScoringHead(model), model.config)


def backbone_subject(key: str, source: str | None = None, weights: str = "pretrained", device: str = "cpu") -> Subject:
    """A bare registry backbone (weights as `iqa extract` resolves them) as a Subject: bands only."""
    from iqa.extract.backbones import load_backbone
    from iqa.extract.registry import get_spec, weights_tag

    backbone = load_backbone(get_spec(key, weights), source=source, weights=weights)
    return Subject(backbone_label(key, weights_tag(weights)), backbone.to(device).eval())
