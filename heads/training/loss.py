"""The training loss, Eq. 1-2: MSE plus a pairwise margin ranking term, for a stack of heads.

`L = MSE + 2/(n(n-1)) * sum_{i<j} max(0, -sgn(s_i - s_j)(p_i - p_j) + m)`, m = 0.25 * std(s).

The paper trains with physical batch 2 and gradient accumulation 6 (Suppl. B.1), so by default a
batch of 12 is cut into micro-batches of 2, each micro-batch's loss (its own MSE, its own margin
m from its own two targets, its one pair) is computed alone and the micro-batch losses are averaged:
exactly what accumulating 6 backward passes of loss/6 gives. `micro_batch=None` ranks the whole
batch at once. std uses Bessel's correction (ddof = 1, `torch.std`'s default, which is what
`targets.std()` gives in a PyTorch training script): for two targets m = 0.25 * |s_1 - s_2| / sqrt(2).

`loss="mse"` drops the ranking term; `loss="l1"` is the mean absolute error (SMART-IQA's loss).
"""

from functools import lru_cache

import torch

MARGIN_SCALE = 0.25
LOSSES = ("mse+margin", "mse", "l1")


@lru_cache
def _pairs(size: int, device: torch.device) -> torch.Tensor:
    """Mask of the pairs i < j of a micro-batch."""
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)


def iqa_loss(pred: torch.Tensor, target: torch.Tensor, micro_batch: int | None = 2, loss: str = "mse+margin") -> torch.Tensor:
    """pred, target [M, B] -> loss per member [M]. B must be a multiple of micro_batch."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    members, batch = pred.shape
    size = batch if micro_batch is None else micro_batch
    if batch % size or size < 2:
        raise ValueError(f"batch {batch} must split into micro-batches of at least 2 (got {size})")
    p = pred.float().reshape(members, batch // size, size)
    s = target.float().reshape(members, batch // size, size)
    if loss == "l1":
        return (p - s).abs().mean((-2, -1))
    mse = (p - s).pow(2).mean(-1)
    if loss == "mse":
        return mse.mean(-1)
    margin = MARGIN_SCALE * s.std(-1, keepdim=True).unsqueeze(-1)  # [M, G, 1, 1]
    upper = _pairs(size, p.device)
    sign = torch.sign(s[..., :, None] - s[..., None, :])
    hinge = torch.relu(-sign * (p[..., :, None] - p[..., None, :]) + margin)
    ranking = hinge[..., upper].mean(-1)  # the mean over i<j is 2/(n(n-1)) * sum
    return (mse + ranking).mean(-1)
