"""SRCC and PLCC for a stack of predictions [M, N] against targets [N] or [M, N], in one pass.

SRCC is Pearson's correlation of tie-averaged ranks, the same number as scipy.stats.spearmanr.
A row with a constant or non-finite prediction gets NaN.
"""

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last axis, tied values sharing the mean of their ranks."""
    ordered = x.sort(dim=-1).values.contiguous()
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    through = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + through + 1).to(torch.float64) / 2


def plcc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = pred.to(torch.float64)
    t = target.to(torch.float64).expand_as(p)
    p = p - p.mean(-1, keepdim=True)
    t = t - t.mean(-1, keepdim=True)
    denominator = (p.pow(2).sum(-1) * t.pow(2).sum(-1)).sqrt()
    return torch.where(denominator > 0, (p * t).sum(-1) / denominator, torch.nan)


def srcc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.expand_as(pred)
    finite = torch.isfinite(pred).all(-1)
    ranked = plcc(average_ranks(torch.nan_to_num(pred)), average_ranks(target))
    return torch.where(finite, ranked, torch.nan)
