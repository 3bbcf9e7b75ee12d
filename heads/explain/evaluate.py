"""Explanations measured, as the ALOE appendix measures them: localisation and faithfulness.

- Distortion pointing game: on a grid set (data/gridpg.py) the share of the positive attribution
  for "low quality" (`--target low`) that falls inside the one distorted cell, averaged over the
  grids whose map has any positive attribution (ALOE: grids with zero positive mass are discarded,
  and counted apart); chance is 0.25 (a map spread evenly). The four cells split the map's rows and
  columns at ceil(R / 2), so with an odd side every pixel still lies in exactly one cell.
- Deletion: the BLOCK x BLOCK blocks of the backbone's input are blanked (filled with the image's
  mean colour) in order of their attribution for the score (`--target high`, what raises quality),
  most attributed first, in DELETION_STEPS steps; the predicted score after each step gives a curve
  over the deleted fraction 0..1 and its area (trapezoids). A faithful map makes the score fall
  early: an area below the random-order control's (the mean over RANDOM_ORDERS fixed orders).

Both work at the backbone's input side. A centre-cropping model (`--preprocess native`) sees the
centre of a square grid, and the centre of its crop is the grid's centre, so the crop's quadrants
are still the grid's cells (trimmed at the border).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from iqa.data.gridpg import read_gridpg
from iqa.extract.preprocess import decode_image
from iqa.heads.explain.attribution import attribute, normalised_input, score_target
from iqa.heads.explain.maps import Subject, input_pixels

BLOCK = 16
DELETION_STEPS = 8
RANDOM_ORDERS = 3


def cell_share(cam: torch.Tensor, cell: int) -> float | None:
    """The share of a map's positive mass [H, W] inside 2x2 cell `cell` (row-major); 0.25 for a flat map;
    None for a map with no positive mass (a grid the pointing game discards)."""
    positive = cam.clamp(min=0)
    total = float(positive.sum())
    if total <= 0:
        return None
    rows = torch.tensor_split(positive, 2, dim=0)[cell // 2]  # the first half takes the odd centre row
    return float(torch.tensor_split(rows, 2, dim=1)[cell % 2].sum()) / total


@torch.no_grad()
def predicted(subject: Subject, pixels: torch.Tensor) -> torch.Tensor:
    return subject.head(subject.backbone(normalised_input(subject.backbone, pixels)).float()[None])[0].cpu()


def deletion_curve(subject: Subject, pixels: torch.Tensor, order: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Predicted score [DELETION_STEPS + 1] as the blocks of `order` (flat block indices) are mean-filled."""
    side = pixels.shape[-1] // block
    mean = pixels.float().mean((2, 3), keepdim=True).round().to(pixels.dtype)
    cuts = np.linspace(0, len(order), DELETION_STEPS + 1).round().astype(int)
    stages = []
    for cut in cuts:
        blanked = pixels.clone()
        for b in order[:cut]:
            r, c = divmod(int(b), side)
            blanked[..., r * block:(r + 1) * block, c * block:(c + 1) * block] = mean
        stages.append(blanked)
    return predicted(subject, torch.cat(stages)).numpy()


def area(curve: np.ndarray) -> float:
    """Area under a curve sampled evenly over the deleted fraction 0..1."""
    return float(((curve[1:] + curve[:-1]) / 2).mean())


def block_order(cam: torch.Tensor, block: int = BLOCK) -> np.ndarray:
    """Flat block indices, most attributed (block sum) first."""
    side = cam.shape[-1] // block
    sums = cam[: side * block, : side * block].reshape(side, block, side, block).sum((1, 3)).flatten()
    return torch.argsort(sums, descending=True, stable=True).numpy()


@dataclass
class Evaluation:
    pointing_game: float  # mean share in the distorted cell over the grids not discarded (chance 0.25); NaN if none
    deletion_auc: float  # area under the score-vs-deleted-fraction curve, attribution order
    deletion_auc_random: float  # the same for random block orders (the control)
    grids: int
    method: str
    discarded: int = 0  # grids left out of the pointing game: no positive attribution

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(subject: Subject, grid_set: Path, method: str = "gradcam") -> Evaluation:
    """Pointing game and deletion of `subject`'s maps over every grid of `grid_set`."""
    shares, deleted, control = [], [], []
    rng = np.random.default_rng(0)
    for path, cell in read_gridpg(grid_set):
        image, reason, _ = decode_image(path)
        if image is None:
            raise ValueError(f"cannot read grid {path}: {reason}")
        pixels = input_pixels(subject.backbone, image)
        low = attribute(subject.backbone, score_target(subject.head, "low"), pixels, method)[0]
        shares.append(cell_share(low, cell))
        high = attribute(subject.backbone, score_target(subject.head, "high"), pixels, method)[0]
        order = block_order(high)
        deleted.append(area(deletion_curve(subject, pixels, order)))
        control.append(np.mean([area(deletion_curve(subject, pixels, rng.permutation(len(order))))
                                for _ in range(RANDOM_ORDERS)]))
    pointed = [share for share in shares if share is not None]
    return Evaluation(float(np.mean(pointed)) if pointed else float("nan"), float(np.mean(deleted)),
                      float(np.mean(control)), len(shares), method, len(shares) - len(pointed))
