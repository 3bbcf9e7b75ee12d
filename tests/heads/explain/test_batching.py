"""Deletion curves scored in batches give the scores of one forward pass per step; long explanation steps show
a bar on stderr (and none with progress=False)."""

import numpy as np
import pytest
import torch

from iqa.data.gridpg import grid_set_or_default, make_gridpg
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.heads.explain.evaluate import (DELETION_BATCH, DELETION_STEPS, block_order, blocks, deletion_curves, evaluate,
                                        predicted)
from iqa.heads.explain.maps import Subject, explain_files
from iqa.heads.models.mlp import StackedMLP


def tiny_subject(key: str, resolution: int) -> Subject:
    """A tiny random backbone of the registry (a ViT or a CNN) and a one-member head, in eval mode."""
    torch.manual_seed(0)
    backbone = load_backbone(get_spec(key, weights="tiny"), weights="tiny", resolution=resolution).eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, resolution, resolution)).shape[-1]
    return Subject(key, backbone, StackedMLP(dim, [8]).eval())


def per_step_curve(subject: Subject, pixels: torch.Tensor, order: np.ndarray, fill: str) -> tuple[list, list]:
    """One forward pass per step, the blocks blanked one by one: what the batched curves must equal."""
    cells = blocks(*pixels.shape[-2:])
    blank = pixels.float().mean((2, 3), keepdim=True).round().to(pixels.dtype) if fill == "mean" else 0
    fractions, scores = [], []
    for cut in np.linspace(0, len(order), DELETION_STEPS + 1).round().astype(int):
        blanked = pixels.clone()
        for b in order[:cut]:
            rows, cols = cells[int(b)]
            blanked[..., rows, cols] = blank
        fractions.append(sum((r.stop - r.start) * (c.stop - c.start) for r, c in (cells[int(b)] for b in order[:cut]))
                         / pixels[0, 0].numel())
        scores.append(float(predicted(subject, blanked)[0]))
    return fractions, scores


@pytest.mark.parametrize("key, fill, batch", [("dinov2", "zero", DELETION_BATCH), ("dinov2", "mean", 5),
                                              ("resnet152", "zero", 7)])
def test_batched_curves_equal_one_forward_pass_per_step(key, fill, batch, one_thread):
    side = 40  # 16 + 16 + 8: narrow edge blocks
    subject = tiny_subject(key, side)
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, side, side), dtype=np.uint8))
    rng = np.random.default_rng(2)
    orders = [block_order(torch.rand(side, side, generator=torch.Generator().manual_seed(3))),
              *(rng.permutation(9) for _ in range(3))]
    fractions, scores = deletion_curves(subject, pixels, orders, fill=fill, batch=batch)
    assert fractions.shape == scores.shape == (4, DELETION_STEPS + 1)
    assert len(set(np.round(scores[:, 3], 6))) > 1  # the orders blank different blocks
    for order, batched_fractions, batched_scores in zip(orders, fractions, scores):
        hand_fractions, hand_scores = per_step_curve(subject, pixels, order, fill)
        np.testing.assert_allclose(batched_fractions, hand_fractions, rtol=1e-12)
        np.testing.assert_allclose(batched_scores, hand_scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="a deletion order of 8 blocks"):
        deletion_curves(subject, pixels, [orders[0], orders[1][:8]])


def test_evaluate_explain_and_the_default_grid_set_show_bars_only_with_progress(tmp_path, capsys, one_thread):
    subject = tiny_subject("dinov2", 32)
    grids = grid_set_or_default(tmp_path / "cache")  # the default set, built here: the bar names where it goes
    assert f"building the grid set {tmp_path / 'cache' / 'gridpg'}" in capsys.readouterr().err
    quiet = make_gridpg(tmp_path / "small", grids=2, cell_side=16, progress=False).parent
    assert capsys.readouterr().err == ""
    evaluate(subject, quiet, progress=False)
    explain_files([subject], [grids / "images" / "grid-000.png"], tmp_path / "maps", target="low", progress=False)
    assert capsys.readouterr().err == ""
    result = evaluate(subject, quiet)
    assert result.grids == 2 and "evaluating dinov2's maps (grids)" in (err := capsys.readouterr().err) and "2/2" in err
    explain_files([subject], sorted((grids / "images").glob("*.png"))[:3], tmp_path / "maps", target="low")
    assert "maps of dinov2 (images)" in (err := capsys.readouterr().err) and "3/3" in err
