"""The ALOE appendix's explanation metrics by hand: the pointing game's cells and discarded grids, deletion's
blocks, fill and curve."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from iqa.data.gridpg import make_gridpg, read_gridpg
from iqa.extract.registry import get_spec
from iqa.heads.explain.evaluate import DELETION_STEPS, FILLS, area, block_order, blocks, cell_share, deletion_curve
from iqa.heads.explain.maps import Subject
from iqa.heads.report.figures import deletion_figure


def hand_share(cam: np.ndarray, cell: int) -> float:
    """L_i of ALOE App. B: positive mass in cell i over positive mass in all cells; the cells cut at ceil(R / 2)."""
    positive = np.maximum(cam, 0)
    cut_r, cut_c = -(-cam.shape[0] // 2), -(-cam.shape[1] // 2)
    rows = slice(0, cut_r) if cell // 2 == 0 else slice(cut_r, None)
    cols = slice(0, cut_c) if cell % 2 == 0 else slice(cut_c, None)
    return positive[rows, cols].sum() / positive.sum()


@pytest.mark.parametrize("side", [(32, 32), (37, 37), (37, 30)])
def test_cell_shares_are_the_papers_and_sum_to_one_at_any_side(side):
    cam = np.random.default_rng(sum(side)).normal(size=side)
    shares = [cell_share(torch.as_tensor(cam), cell) for cell in range(4)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-12)  # every pixel in exactly one cell (0.994 before at 37)
    np.testing.assert_allclose(shares, [hand_share(cam, cell) for cell in range(4)], rtol=1e-12)
    centre = np.zeros(side)
    centre[side[0] // 2, side[1] // 2] = 1.0  # the centre pixel of an odd map belongs to the top-left cell
    assert cell_share(torch.as_tensor(centre), 0) == (1.0 if side[0] % 2 and side[1] % 2 else 0.0)


def test_a_map_without_positive_attribution_is_discarded_not_chance():
    assert cell_share(torch.zeros(8, 8), 1) is None
    assert cell_share(-torch.rand(9, 9), 3) is None
    assert cell_share(torch.ones(8, 8), 1) == pytest.approx(0.25)


class MeanColour(nn.Module):
    """A stand-in backbone: the normalised input's mean per channel [B, 3]."""

    def __init__(self, resolution: int, mean=(0.0, 0.0, 0.0)):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.spec = replace(get_spec("dinov2", weights="tiny"), resolution=resolution, mean=mean, std=(1.0, 1.0, 1.0))

    def forward(self, x):
        return x.mean((2, 3))


class ChannelSum(nn.Module):
    def forward(self, features):  # [1, B, 3] -> [1, B]
        return features.sum(-1)


def test_blocks_cover_every_pixel_once_where_the_block_does_not_divide_the_side():
    seen = np.zeros((518, 518), dtype=int)
    for rows, cols in blocks(518, 518):
        seen[rows, cols] += 1
    assert (seen == 1).all() and len(blocks(518, 518)) == 33 * 33  # 32 full blocks and one of 6 pixels per side


@pytest.mark.parametrize("fill", FILLS)
def test_deletion_curve_is_the_hand_computed_score_of_each_blanked_image(fill):
    side = 40  # 16 + 16 + 8: the last row and column of blocks are narrow
    subject = Subject("mean colour", MeanColour(side), ChannelSum())
    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (1, 3, side, side), dtype=np.uint8))
    order = np.random.default_rng(4).permutation(9)
    fractions, curve = deletion_curve(subject, pixels, order, fill=fill)
    image = pixels[0].numpy().astype(float)
    blank = np.zeros(3) if fill == "zero" else np.round(image.mean((1, 2)))
    edges = [0, 16, 32, 40]
    cuts = np.linspace(0, 9, DELETION_STEPS + 1).round().astype(int)
    for step, cut in enumerate(cuts):
        hand = image.copy()
        for b in order[:cut]:
            r, c = divmod(int(b), 3)
            hand[:, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = blank[:, None, None]
        assert fractions[step] == pytest.approx((hand != image).any(0).sum() / side**2 if fill == "zero" else
                                                sum((edges[b // 3 + 1] - edges[b // 3]) * (edges[b % 3 + 1] - edges[b % 3])
                                                    for b in order[:cut]) / side**2)
        assert curve[step] == pytest.approx((hand / 255).mean((1, 2)).sum(), abs=1e-5)
    assert fractions[-1] == 1.0  # every pixel deleted at the end
    assert area(fractions, curve) == pytest.approx(np.trapezoid(curve, fractions))
    with pytest.raises(ValueError, match="--deletion-fill"):
        deletion_curve(subject, pixels, order, fill="noise")


def test_block_order_ranks_by_mean_attribution_so_a_narrow_block_can_come_first():
    cam = torch.zeros(40, 40)
    cam[32:, 32:] = 1.0  # the 8x8 corner block: mean 1, sum 64
    cam[:16, :16] = 0.5  # a full block: mean 0.5, sum 128
    assert block_order(cam)[:2].tolist() == [8, 0]


def test_evaluate_discards_grids_without_positive_attribution_and_keeps_the_curves(tmp_path, monkeypatch):
    """Two of four grids get an empty "low quality" map: the pointing game averages the other two only."""
    import iqa.heads.explain.evaluate as evaluate_module

    grids = make_gridpg(tmp_path / "grids", grids=4, cell_side=16).parent
    cells = [cell for _, cell in read_gridpg(grids)]
    calls = iter(range(100))

    def fake_attribute(backbone, side, pixels, method):
        """Low-quality maps: empty for grids 0 and 1; grid 2 all in its cell, grid 3 spread evenly."""
        index = next(calls) // 2
        if side == "high":
            return torch.rand(1, *pixels.shape[-2:], generator=torch.Generator().manual_seed(index))
        cam = torch.zeros(1, *pixels.shape[-2:])
        if index == 2:
            r, c = divmod(cells[2], 2)
            cam[0, r * 19:(r + 1) * 19, c * 19:(c + 1) * 19] = 1.0  # side 37: the cells cut at 19
        elif index == 3:
            cam += 1.0
        return cam

    monkeypatch.setattr(evaluate_module, "attribute", fake_attribute)
    monkeypatch.setattr(evaluate_module, "score_target", lambda head, side: side)
    result = evaluate_module.evaluate(Subject("mean colour", MeanColour(37, (0.5, 0.5, 0.5)), ChannelSum()), grids)
    assert (result.grids, result.discarded) == (4, 2)
    flat = 18 * 18 / 37**2  # grid 3's cell is the bottom-right one, 18 x 18 of the 37 x 37 pixels
    assert cells[3] == 3 and result.pointing_game == pytest.approx((1.0 + flat) / 2)  # not counting 0.25 twice
    assert result.deletion_fill == "zero" and len(result.deletion_curve) == DELETION_STEPS + 1
    assert result.deletion_fraction[0] == 0 and result.deletion_fraction[-1] == 1
    assert result.deletion_curve[-1] == pytest.approx(-1.5, abs=1e-5)  # all black: 3 x (0 - 0.5)
    fig = deletion_figure({"m": result.as_dict()})
    assert len(fig.axes[0].lines) == 2
