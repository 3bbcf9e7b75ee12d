"""The ALOE appendix's explanation metrics by hand: the pointing game's cells and discarded grids."""

import numpy as np
import pytest
import torch

from iqa.heads.explain.evaluate import cell_share


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
