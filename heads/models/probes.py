"""Frozen-feature probes: ridge regression and k-nearest-neighbour regression (ALOE App., ARNIQA, CONTRIQUE, Re-IQA).

Each probe is one run of the grid (heads/training/probe_runs.py), recorded like an MLP head; its fitted form is a torch module
that scores embeddings [1, B, D] -> [1, B] exactly as the MLP heads do, so it is saved, exported and
scored through the same code (heads/saved/weights.py, heads/saved/model.py).

- `ridge`: closed form, the intercept unpenalised (scikit-learn's `Ridge(alpha)`), in float64.
- `knn`: the mean target of the k training rows of smallest cosine distance (scikit-learn's
  `KNeighborsRegressor(k, metric="cosine")`).

The inputs are z-scored with the run's own training rows (`standardize`, the probes' default) and
then top-k masked like the MLP's (`mask_k`). The regularisation alpha, or k, is chosen by K-fold
cross-validation on the training rows alone: folds drawn from the run's seed, the candidate whose
pooled out-of-fold predictions have the best SRCC wins (the first on ties). No test row is seen
before the chosen probe is fitted on all training rows. `knn_k` fixes k instead (ALOE's Table B2:
k = 20), so no cross-validation runs.
"""

import numpy as np
import torch
from torch import nn

from iqa.heads.training.metrics import srcc
from iqa.heads.models.mlp import member_seed, topk_mask

PROBES = ("ridge", "knn")
RIDGE_ALPHAS = tuple(float(10.0**e) for e in range(-3, 6))  # on z-scored features: 1e-3 .. 1e5
KNN_KS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
CV_FOLDS = 5
QUERY_CHUNK = 1024  # query rows per similarity matrix in knn


def probe_recipe(head: str, knn_k: int | None = None) -> dict:
    """What the code decides for a probe run (part of its key); a fixed k (`knn_k`) leaves nothing to choose."""
    if head == "knn" and knn_k is not None:
        return {"k": int(knn_k), "metric": "cosine"}
    grid = {"ridge": {"alphas": list(RIDGE_ALPHAS)}, "knn": {"ks": list(KNN_KS), "metric": "cosine"}}[head]
    return {**grid, "cv_folds": CV_FOLDS, "cv_score": "SRCC of the pooled out-of-fold predictions"}


class Probe(nn.Module):
    """The input transform every probe applies: z-score with the training rows' statistics, then top-k mask."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, mask_k: float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64))
        self.register_buffer("mask_k", torch.tensor([float(mask_k)], dtype=torch.float64))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(torch.float64) - self.mean) / self.std
        return topk_mask(z, self.mask_k) if float(self.mask_k) < 100 else z


class RidgeProbe(Probe):
    def __init__(self, mean, std, mask_k, weight, bias):
        super().__init__(mean, std, mask_k)
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float64))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float64).reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, B, D] -> [1, B]."""
        return (self.inputs(x) @ self.weight + self.bias).float()


class KnnProbe(Probe):
    def __init__(self, mean, std, mask_k, keys, values, k):
        super().__init__(mean, std, mask_k)
        self.register_buffer("keys", unit_rows(torch.as_tensor(keys, dtype=torch.float64)).float())
        self.register_buffer("values", torch.as_tensor(values, dtype=torch.float64))
        self.register_buffer("k", torch.tensor([int(k)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, B, D] -> [1, B]."""
        queries = unit_rows(self.inputs(x)[0]).float()
        k = int(self.k)
        pred = [self.values[nearest(queries[i : i + QUERY_CHUNK], self.keys, k)].mean(-1)
                for i in range(0, len(queries), QUERY_CHUNK)]
        return torch.cat(pred)[None].float()


PROBE_CLASSES = {"ridge": RidgeProbe, "knn": KnnProbe}


def probe_from_state(head: str, state: dict[str, torch.Tensor]) -> Probe:
    """A saved probe back from its state dict, every buffer exactly as saved."""
    extra = {"ridge": ("weight", "bias"), "knn": ("keys", "values", "k")}[head]
    probe = PROBE_CLASSES[head](state["mean"], state["std"], float(state["mask_k"]), *(state[n] for n in extra))
    probe.load_state_dict(state)
    return probe.eval()


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero: cosine distance 1 to everything)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] indices of the keys of highest cosine similarity (unit rows), nearest first."""
    return (queries @ keys.T).topk(k, dim=-1).indices


def ridge_solution(x: np.ndarray, y: np.ndarray, alphas) -> list[tuple[np.ndarray, float]]:
    """(weight, intercept) per alpha: argmin |y - x w - b|^2 + alpha |w|^2, from one eigendecomposition."""
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    eigenvalues, vectors = np.linalg.eigh(xc.T @ xc)
    projected = vectors.T @ (xc.T @ (y - mean_y))
    solutions = []
    for alpha in alphas:
        w = vectors @ (projected / (eigenvalues + alpha))
        solutions.append((w, float(mean_y - mean_x @ w)))
    return solutions


def cv_folds(n: int, seed: int, folds: int = CV_FOLDS) -> np.ndarray:
    """The fold of each of n training rows, from the run's seed alone."""
    order = np.random.default_rng(member_seed(seed, "cv")).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def _out_of_fold(z: np.ndarray, y: np.ndarray, head: str, seed: int) -> tuple[tuple, np.ndarray]:
    """Candidates and their pooled out-of-fold predictions [candidates, n]."""
    fold = cv_folds(len(y), seed)
    if head == "ridge":
        candidates = RIDGE_ALPHAS
        pred = np.zeros((len(candidates), len(y)))
        for f in range(CV_FOLDS):
            held = fold == f
            for c, (w, b) in enumerate(ridge_solution(z[~held], y[~held], candidates)):
                pred[c, held] = z[held] @ w + b
        return candidates, pred
    fewest_kept = len(y) - np.bincount(fold).max()
    candidates = tuple(k for k in KNN_KS if k <= fewest_kept)
    pred = np.zeros((len(candidates), len(y)))
    units = unit_rows(torch.as_tensor(z)).float()
    for f in range(CV_FOLDS):
        held = np.flatnonzero(fold == f)
        kept = np.flatnonzero(fold != f)
        order = nearest(units[held], units[kept], max(candidates))  # nearest first
        sums = np.cumsum(y[kept][order.numpy()], axis=1)
        for c, k in enumerate(candidates):
            pred[c, held] = sums[:, k - 1] / k
    return candidates, pred


def check_knn_k(head: str, knn_k: int | None, n_train: int | None = None) -> None:
    """A fixed k belongs to the knn probe, is at least 1 and (given n_train) at most the training rows."""
    if knn_k is None:
        return
    if head != "knn":
        raise ValueError(f"--knn-k fixes the neighbours of the knn probe; the {head!r} head takes none")
    if knn_k < 1 or (n_train is not None and knn_k > n_train):
        raise ValueError(f"--knn-k must be between 1 and the {n_train or 'number of'} training rows, got {knn_k}")


def fit_probe(head: str, x: np.ndarray, y: np.ndarray, seed: int, mask_k: float = 100.0,
              standardize: bool = True, knn_k: int | None = None) -> tuple[Probe, dict]:
    """The probe fitted on training rows x [n, D], y [n], its hyper-parameter chosen by CV on them alone
    (or k fixed by `knn_k`); and the choice (`{"alpha"|"k": value, "cv_srcc": {candidate: score}}`, no
    scores for a fixed k)."""
    if head not in PROBES:
        raise ValueError(f"unknown probe {head!r}; choose from {', '.join(PROBES)}")
    check_knn_k(head, knn_k, len(y))
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if standardize:
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 0, std, 1.0)  # a constant feature stays as it is
    else:
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    transform = Probe(torch.as_tensor(mean), torch.as_tensor(std), mask_k)
    z = transform.inputs(torch.as_tensor(x)[None])[0].numpy()
    if knn_k is not None:
        return KnnProbe(mean, std, mask_k, z, y, knn_k), {"k": int(knn_k), "cv_srcc": {}}
    candidates, pred = _out_of_fold(z, y, head, seed)
    scores = srcc(torch.as_tensor(pred), torch.as_tensor(y)).nan_to_num(nan=-np.inf).tolist()
    chosen = candidates[int(np.argmax(scores))]
    name = "alpha" if head == "ridge" else "k"
    choice = {name: chosen, "cv_srcc": {str(c): s for c, s in zip(candidates, scores)}}
    if head == "ridge":
        ((w, b),) = ridge_solution(z, y, [chosen])
        return RidgeProbe(mean, std, mask_k, w, b), choice
    return KnnProbe(mean, std, mask_k, z, y, chosen), choice

