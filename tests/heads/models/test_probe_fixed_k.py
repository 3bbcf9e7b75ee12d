"""The knn probe with k fixed (ALOE's Table B2: k = 20): scikit-learn's numbers, its own run key."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from iqa.heads.models.probes import fit_probe
from iqa.heads.training.config import RunConfig, run_key
from iqa.heads.training.grid import expand_grid, head_choices
from iqa.heads.training.probe_runs import train_probes
from iqa.heads.training.trainer import Member, StackData


def noisy_set(n=300, d=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.1, 10, d) + 3
    return x, x @ rng.normal(size=d) / 20 + 0.3 * rng.normal(size=n)


def test_fixed_k_equals_scikit_learn_k_nearest_neighbours():
    x, y = noisy_set()
    probe, choice = fit_probe("knn", x[:250], y[:250], seed=8, knn_k=20)
    assert choice == {"k": 20, "cv_srcc": {}}  # nothing chosen, no CV scores
    reference = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=20, metric="cosine")).fit(x[:250], y[:250])
    with torch.no_grad():
        pred = probe(torch.as_tensor(x[250:])[None])[0].numpy()
    np.testing.assert_allclose(pred, reference.predict(x[250:]), atol=1e-6)
    (run,) = train_probes(StackData(x, y, np.arange(250)[None], x, y, np.arange(250, 300)[None]), [Member(8)], "knn",
                          knn_k=20)
    assert run.curves["probe"]["k"] == 20 and int(run.weights["k"]) == 20


def test_fixed_k_is_in_the_key_only_when_set():
    default = RunConfig("clive", "clive", "siglip2", "knn", "knn", "knn", 8, standardize=True)
    assert "knn_k" not in default.to_dict()  # keys of existing runs unchanged
    fixed = RunConfig("clive", "clive", "siglip2", "knn", "knn", "knn", 8, standardize=True, knn_k=20)
    assert fixed.to_dict()["knn_k"] == 20 and fixed.recipe()["probe"] == {"k": 20, "metric": "cosine"}
    assert run_key(default, "fp", "rows") != run_key(fixed, "fp", "rows")
    grid = expand_grid([("clive", "clive")], "siglip2", head_choices(["knn", "ridge", "baseline"], []), [8], knn_k=20)
    assert [c.knn_k for c in grid] == [20, None, None]  # only the knn probe takes it


@pytest.mark.parametrize("head, k, match", [("ridge", 20, "knn probe"), ("knn", 0, "between 1")])
def test_bad_fixed_k_is_refused(head, k, match):
    with pytest.raises(ValueError, match=match):
        RunConfig("clive", "clive", "siglip2", head, head, head, 8, knn_k=k)
    with pytest.raises(ValueError, match="give the knn head"):
        expand_grid([("clive", "clive")], "siglip2", head_choices(["ridge"], []), [8], knn_k=20)
    x, y = noisy_set(n=30)
    with pytest.raises(ValueError, match="between 1 and the 30"):
        fit_probe("knn", x, y, seed=8, knn_k=31)
