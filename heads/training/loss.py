"""The training loss, Eq. 1-2: MSE plus a pairwise margin ranking term, for a stack of heads.

`L = MSE + 2/(n(n-1)) * sum_{i<j} max(0, -sgn(s_i - s_j)(p_i - p_j) + m)`, m = 0.25 * std(s).

The paper trains with physical batch 2 and gradient accumulation 6 (Suppl. B.1), so by default a
batch of 12 is cut into micro-batches of 2, each micro-batch's loss (its own MSE, its own margin
m from its own two targets, its one pair) is computed alone and the micro-batch losses are averaged:
exactly what accumulating 6 backward passes of loss/6 gives. `micro_batch=None` ranks the whole
batch at once. std uses Bessel's correction (ddof = 1, `torch.std`'s default, which is what
`targets.std()` gives in a PyTorch training script): for two targets m = 0.25 * |s_1 - s_2| / sqrt(2).

`loss="mse"` drops the ranking term; `loss="l1"` is the mean absolute error (SMART-IQA's loss). The
other three of SMART-IQA's loss study (App. J, Table VII), which names but does not define them:
- `rank`: the margin ranking term above alone (no MSE);
- `fidelity`: the pairwise fidelity loss (Tsai et al. 2007, as UNIQUE and LIQE use it): with
  P_ij = Phi((p_i - p_j) / sqrt(2)) (Thurstone, unit variances) and the target order
  T_ij = 1, 1/2 or 0 as s_i >, = or < s_j, the mean over i<j of 1 - sqrt(T_ij P_ij) - sqrt((1 - T_ij)(1 - P_ij));
- `srcc`: 1 - Pearson(soft ranks of p, ranks of s), the soft rank of p_i being
  1/2 + sum_j sigmoid((p_i - p_j) / SOFT_RANK_TEMPERATURE) (its own term is 1/2: exact ranks as the
  temperature goes to 0, tied targets sharing their mean rank).
Pairs and ranks are taken within a micro-batch: with `micro_batch=2` the srcc loss is +-1 and carries
no gradient, so train these with the whole batch ranked at once (`--micro-batch` = the batch).
"""

from functools import lru_cache

import torch

from iqa.heads.training.metrics import average_ranks

MARGIN_SCALE = 0.25
SOFT_RANK_TEMPERATURE = 0.05  # on targets in [0, 1]: about a tenth of a typical set's spread
LOSSES = ("mse+margin", "mse", "l1", "rank", "fidelity", "srcc")


def loss_recipe(loss: str) -> dict:
    """The constants a loss adds to a run's key beyond MARGIN_SCALE (the earlier losses add none)."""
    return {"soft_rank_temperature": SOFT_RANK_TEMPERATURE} if loss == "srcc" else {}


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
    if loss == "srcc":
        return (1 - _pearson(soft_ranks(p), average_ranks(s).float())).mean(-1)
    mse = (p - s).pow(2).mean(-1)
    if loss == "mse":
        return mse.mean(-1)
    upper = _pairs(size, p.device)
    sign = torch.sign(s[..., :, None] - s[..., None, :])
    difference = p[..., :, None] - p[..., None, :]
    if loss == "fidelity":
        predicted = 0.5 * (1 + torch.erf(difference / 2))  # Phi(d / sqrt 2) = (1 + erf(d / 2)) / 2
        wanted = (1 + sign) / 2
        fidelity = 1 - (wanted * predicted + 1e-12).sqrt() - ((1 - wanted) * (1 - predicted) + 1e-12).sqrt()
        return fidelity[..., upper].mean((-2, -1))
    margin = MARGIN_SCALE * s.std(-1, keepdim=True).unsqueeze(-1)  # [M, G, 1, 1]
    hinge = torch.relu(-sign * difference + margin)
    ranking = hinge[..., upper].mean(-1)  # the mean over i<j is 2/(n(n-1)) * sum
    return (ranking if loss == "rank" else mse + ranking).mean(-1)


def soft_ranks(p: torch.Tensor) -> torch.Tensor:
    """Differentiable ranks along the last axis: 1/2 + sum_j sigmoid((p_i - p_j) / SOFT_RANK_TEMPERATURE)."""
    return 0.5 + torch.sigmoid((p[..., :, None] - p[..., None, :]) / SOFT_RANK_TEMPERATURE).sum(-1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / ((a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt() + 1e-12)
