"""Explanations measured, as the ALOE appendix measures them: localisation and faithfulness.

- Distortion pointing game: on a grid set (data/gridpg.py) the share of the positive attribution
  for "low quality" (`--target low`) that falls inside the one distorted cell, averaged over the
  grids whose map has any positive attribution (ALOE: grids with zero positive mass are discarded,
  and counted apart); chance is 0.25 (a map spread evenly). The four cells split the map's rows and
  columns at ceil(R / 2), so with an odd side every pixel still lies in exactly one cell.
- Deletion: the BLOCK x BLOCK blocks of the backbone's input are blanked in order of their mean
  attribution for the score (`--target high`, what raises quality), most attributed first, in
  DELETION_STEPS steps; the predicted score after each step gives a curve over the deleted pixel
  fraction 0..1 and its area (trapezoids). A faithful map makes the score fall early: an area below
  the random-order control's (the mean over RANDOM_ORDERS fixed orders). Blanked pixels are set to
  zero (black, before the backbone's normalisation: ALOE's "set to zero"), or (`fill="mean"`) to the
  image's mean colour. A side that BLOCK does not divide (518 = 32 x 16 + 6) ends in a row and a
  column of narrower blocks, so every pixel can be deleted. The curves, averaged over the grids, are
  kept for `deletion_figure`. A grid's blanked images, of its curve and of the controls, are scored
  together in forward passes of at most DELETION_BATCH images, the image and the blank image once for
  all curves (the same scores as one pass per step, to float rounding; benchmarks/explain_evaluate.py
  times the two).

Both work at the backbone's input side. A centre-cropping model (`--preprocess native`) sees the
centre of a square grid, and the centre of its crop is the grid's centre, so the crop's quadrants
are still the grid's cells (trimmed at the border).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from iqa.data.gridpg import read_gridpg
from iqa.extract.preprocess import decode_image
from iqa.heads.explain.attribution import attribute, score_target
from iqa.heads.explain.maps import Subject, input_pixels, predicted

BLOCK = 16
DELETION_STEPS = 8
RANDOM_ORDERS = 3
FILLS = ("zero", "mean")  # what a deleted pixel becomes: ALOE's zero, or the image's mean colour
DELETION_BATCH = 32  # blanked images per forward pass: a grid's curves in a few passes, memory bounded at 518 px


def cell_share(cam: torch.Tensor, cell: int) -> float | None:
    """The share of a map's positive mass [H, W] inside 2x2 cell `cell` (row-major); 0.25 for a flat map;
    None for a map with no positive mass (a grid the pointing game discards)."""
    positive = cam.clamp(min=0)
    total = float(positive.sum())
    if total <= 0:
        return None
    rows = torch.tensor_split(positive, 2, dim=0)[cell // 2]  # the first half takes the odd centre row
    return float(torch.tensor_split(rows, 2, dim=1)[cell % 2].sum()) / total


def blocks(height: int, width: int, block: int = BLOCK) -> list[tuple[slice, slice]]:
    """(rows, cols) of each block, row-major, covering every pixel once: the last row and column of blocks
    are narrower where `block` does not divide the side."""
    rows = [slice(top, min(top + block, height)) for top in range(0, height, block)]
    cols = [slice(left, min(left + block, width)) for left in range(0, width, block)]
    return [(r, c) for r in rows for c in cols]


def block_order(cam: torch.Tensor, block: int = BLOCK) -> np.ndarray:
    """Flat block indices (`blocks`), most attributed first: by mean attribution, so a narrow edge block
    ranks by its pixels, not its size (for full blocks the same order as the sum)."""
    means = torch.stack([cam[rows, cols].mean() for rows, cols in blocks(*cam.shape[-2:], block)])
    return torch.argsort(means, descending=True, stable=True).numpy()


@torch.no_grad()
def deletion_curves(subject: Subject, pixels: torch.Tensor, orders: list[np.ndarray], block: int = BLOCK,
                    fill: str = "zero", batch: int = DELETION_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(deleted pixel fraction, predicted score), each [len(orders), DELETION_STEPS + 1], as the blocks of each
    order (flat indices into `blocks`) are blanked: set to zero, or to the image's mean colour (`fill="mean"`).
    Every blanked image of every order is scored in passes of at most `batch` images."""
    if fill not in FILLS:
        raise ValueError(f"--deletion-fill must be one of {', '.join(FILLS)}, got {fill!r}")
    height, width = pixels.shape[-2:]
    cells = blocks(height, width, block)
    for order in orders:
        if len(order) != len(cells):
            raise ValueError(f"a deletion order of {len(order)} blocks for an input of {len(cells)}")
    per_row = -(-width // block)
    block_of_pixel = torch.arange(height)[:, None] // block * per_row + torch.arange(width)[None] // block
    cuts = torch.from_numpy(np.linspace(0, len(cells), DELETION_STEPS + 1).round().astype(int))
    ranks = torch.stack([torch.from_numpy(np.argsort(order)) for order in orders])  # [o, b]: block b's place in order o
    deleted = ranks[:, block_of_pixel][:, None] < cuts[None, :, None, None]  # [orders, steps, H, W]
    blank = pixels.float().mean((2, 3), keepdim=True).round().to(pixels.dtype) if fill == "mean" else 0
    # every order starts from the image and ends at the blank image: those two are scored once
    unique = torch.cat([deleted[0, :1], deleted[:, 1:-1].flatten(0, 1), deleted[0, -1:]])
    stages = torch.where(unique[:, None], blank, pixels)
    scored = torch.cat([predicted(subject, part) for part in stages.tensor_split(-(-len(stages) // batch))])
    ends = scored[[0, -1]].expand(len(orders), 2)
    scores = torch.cat([ends[:, :1], scored[1:-1].reshape(len(orders), DELETION_STEPS - 1), ends[:, 1:]], dim=1)
    fractions = deleted.sum((2, 3)).double() / (height * width)
    return fractions.numpy(), scores.numpy()


def deletion_curve(subject: Subject, pixels: torch.Tensor, order: np.ndarray, block: int = BLOCK,
                   fill: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """One order's curve (`deletion_curves`): fractions and scores, each [DELETION_STEPS + 1]."""
    fractions, scores = deletion_curves(subject, pixels, [order], block, fill)
    return fractions[0], scores[0]


def area(fractions: np.ndarray, curve: np.ndarray) -> float:
    """Area under a curve over the deleted fraction 0..1 (trapezoids)."""
    return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(fractions)))


@dataclass
class Evaluation:
    pointing_game: float  # mean share in the distorted cell over the grids not discarded (chance 0.25); NaN if none
    deletion_auc: float  # area under the score-vs-deleted-fraction curve, attribution order
    deletion_auc_random: float  # the same for random block orders (the control)
    grids: int
    method: str
    discarded: int = 0  # grids left out of the pointing game: no positive attribution
    deletion_fill: str = "zero"
    deletion_fraction: list[float] = field(default_factory=list)  # the curves' x: deleted pixel fraction
    deletion_curve: list[float] = field(default_factory=list)  # mean predicted score over the grids, attribution order
    deletion_curve_random: list[float] = field(default_factory=list)  # the same, random orders

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(subject: Subject, grid_set: Path, method: str = "gradcam", fill: str = "zero",
             progress: bool = True) -> Evaluation:
    """Pointing game and deletion of `subject`'s maps over every grid of `grid_set` (a bar over the grids on
    stderr with `progress`). Each curve's area is taken over its own deleted fractions (an order that deletes
    the narrow edge blocks early deletes less); the stored curves average fraction and score step by step."""
    shares, deleted, control = [], [], []
    rng = np.random.default_rng(0)
    for path, cell in tqdm(read_gridpg(grid_set), desc=f"evaluating {subject.name}'s maps (grids)", disable=not progress):
        image, reason, _ = decode_image(path)
        if image is None:
            raise ValueError(f"cannot read grid {path}: {reason}")
        pixels = input_pixels(subject.backbone, image)
        low = attribute(subject.backbone, score_target(subject.head, "low"), pixels, method)[0]
        shares.append(cell_share(low, cell))
        high = attribute(subject.backbone, score_target(subject.head, "high"), pixels, method)[0]
        order = block_order(high)
        orders = [order, *(rng.permutation(len(order)) for _ in range(RANDOM_ORDERS))]
        fractions, scores = deletion_curves(subject, pixels, orders, fill=fill)
        deleted.append((fractions[0], scores[0]))
        control += list(zip(fractions[1:], scores[1:]))
    pointed = [share for share in shares if share is not None]
    fraction, curve = np.mean(deleted, axis=0)
    _, curve_random = np.mean(control, axis=0)
    return Evaluation(float(np.mean(pointed)) if pointed else float("nan"), float(np.mean([area(*c) for c in deleted])),
                      float(np.mean([area(*c) for c in control])), len(shares), method, len(shares) - len(pointed),
                      fill, fraction.tolist(), curve.tolist(), curve_random.tolist())
