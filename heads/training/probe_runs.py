"""Probe runs in a grid: each member of a stack fitted and tested alone, recorded like an MLP run."""

import numpy as np
import torch

from iqa.heads.models.probes import fit_probe
from iqa.heads.training.trainer import Member, RunResult, StackData, epoch_metrics, result_from_curves


def train_probes(data: StackData, members: list[Member], head: str, standardize: bool = True,
                 knn_k: int | None = None) -> list[RunResult]:
    """One probe per member, fitted on its training rows and tested on its test rows: a RunResult each,
    recorded like a one-epoch MLP run (curves hold the test SRCC/PLCC and the CV choice)."""
    x_train, x_test = np.asarray(data.x_train, dtype=np.float64), np.asarray(data.x_test, dtype=np.float64)
    y_train, y_test = np.asarray(data.y_train, dtype=np.float64), np.asarray(data.y_test, dtype=np.float64)
    results = []
    for member, train_rows, test_rows in zip(members, np.asarray(data.train_rows), np.asarray(data.test_rows)):
        probe, choice = fit_probe(head, x_train[train_rows], y_train[train_rows], member.seed, member.mask_k, standardize,
                                  knn_k)
        with torch.no_grad():
            pred = probe(torch.as_tensor(x_test[test_rows])[None])
        (test_srcc,), (test_plcc,) = epoch_metrics(pred, torch.as_tensor(y_test[test_rows])[None])
        curves = {"srcc": [test_srcc], "plcc": [test_plcc], "probe": choice}
        if not np.isfinite(pred.numpy()).all():
            results.append(result_from_curves(curves, 1, None))
            continue
        result = result_from_curves(curves, None, None, "last")
        result.weights = {name: t.cpu() for name, t in probe.state_dict().items()}
        results.append(result)
    return results
