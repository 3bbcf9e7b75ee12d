"""Ridge and kNN probes: scikit-learn's numbers, hyper-parameters chosen on training rows only, grid runs."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from iqa.cache.results import ResultsDB
from iqa.heads.training.grid import expand_grid, head_choices, run_grid, run_rows
from iqa.heads.training.metrics import srcc
from iqa.heads.training.probe_runs import train_probes
from iqa.heads.models.probes import RIDGE_ALPHAS, fit_probe, ridge_solution
from iqa.heads.training.trainer import Member, StackData
from iqa.heads.saved.weights import load_head, run_weights_path
from helpers import fake_cache


def mixed_scale_set(n=300, d=20, seed=0):
    """A noisy linear target on features whose scales differ 100x (as the NSS features' do)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.1, 10, d) + 3
    y = x @ rng.normal(size=d) / 20 + 0.3 * rng.normal(size=n)
    return x, y


def predict(probe, x):
    with torch.no_grad():
        return probe(torch.as_tensor(x)[None])[0].numpy()


@pytest.mark.parametrize("standardize", [False, True])
def test_ridge_equals_scikit_learn_ridge_with_the_chosen_alpha(standardize):
    x, y = mixed_scale_set()
    probe, choice = fit_probe("ridge", x[:250], y[:250], seed=8, standardize=standardize)
    assert choice["alpha"] in RIDGE_ALPHAS and set(choice["cv_srcc"]) == {str(a) for a in RIDGE_ALPHAS}
    ridge = Ridge(alpha=choice["alpha"])
    reference = make_pipeline(StandardScaler(), ridge) if standardize else ridge
    reference.fit(x[:250], y[:250])
    np.testing.assert_allclose(predict(probe, x[250:]), reference.predict(x[250:]), atol=1e-5)  # float32 output
    for alpha, (w, b) in zip((1e-3, 10.0, 1e4), ridge_solution(x, y, (1e-3, 10.0, 1e4))):  # the closed form itself
        fitted = Ridge(alpha=alpha).fit(x, y)
        np.testing.assert_allclose(w, fitted.coef_, rtol=1e-8, atol=1e-10)
        assert b == pytest.approx(fitted.intercept_, rel=1e-8)


@pytest.mark.parametrize("standardize", [False, True])
def test_knn_equals_scikit_learn_cosine_neighbours_with_the_chosen_k(standardize):
    x, y = mixed_scale_set()
    probe, choice = fit_probe("knn", x[:250], y[:250], seed=8, standardize=standardize)
    knn = KNeighborsRegressor(n_neighbors=choice["k"], metric="cosine")
    reference = make_pipeline(StandardScaler(), knn) if standardize else knn
    reference.fit(x[:250], y[:250])
    np.testing.assert_allclose(predict(probe, x[250:]), reference.predict(x[250:]), atol=1e-6)
    assert choice["k"] > 1  # on a noisy target, averaging neighbours beats the single nearest one


def test_hyper_parameters_are_chosen_without_seeing_a_test_row():
    x, y = mixed_scale_set()
    rows = lambda: StackData(x, y, np.arange(240)[None], x, y, np.arange(240, 300)[None])  # noqa: E731
    for head in ("ridge", "knn"):
        (before,) = train_probes(rows(), [Member(8)], head)
        x[240:], y[240:] = np.random.default_rng(1).normal(size=(60, x.shape[1])) * 50, 7.0 - y[240:]  # other test rows
        (after,) = train_probes(rows(), [Member(8)], head)
        assert after.curves["probe"] == before.curves["probe"]  # same choice, same CV scores
        assert all(torch.equal(after.weights[k], before.weights[k]) for k in before.weights)
        assert after.best_srcc != before.best_srcc  # the test rows did change
        x, y = mixed_scale_set()
    (other_seed,) = train_probes(rows(), [Member(19)], "ridge")  # the folds follow the seed
    assert other_seed.curves["probe"]["cv_srcc"] != before.curves["probe"]["cv_srcc"]


def test_probes_run_in_a_grid_are_recorded_saved_and_reload_to_their_predictions(tmp_path):
    cache = fake_cache("clive", n=150)
    db = ResultsDB(tmp_path / "results.sqlite")
    grid = expand_grid([("clive", "clive")], "siglip2", head_choices(["ridge", "knn", "baseline"], []), [8, 19],
                       mask_ks=[100, 50], epochs=1)
    assert {(c.head, c.standardize) for c in grid} == {("ridge", True), ("knn", True), ("baseline", False)}
    configs = [c for c in grid if c.head != "baseline"]
    records = run_grid(configs, lambda name: cache, db, progress=False)
    assert all(r["status"] == "done" for r in records)
    for config, record in zip(configs, records):
        assert record["best_epoch"] == 1 and "probe" in record["curves"]
        head, saved = load_head(run_weights_path(db.path, record["key"]))
        assert saved["head"] == config.head and saved["mask_k"] == config.mask_k
        _, test_rows = run_rows(config, cache, cache)
        pred = head(torch.as_tensor(cache.embeddings[test_rows], dtype=torch.float32)[None])
        stored = float(srcc(pred, torch.as_tensor(cache.manifest.targets[test_rows])[None])[0])
        assert stored == pytest.approx(record["best_srcc"], abs=1e-9)
    masked = {(r["head"], r["mask_k"], r["seed"]): r["best_srcc"] for r in records}
    assert masked[("ridge", 50.0, 8)] != masked[("ridge", 100.0, 8)]  # masking reaches the probe
    assert len(run_grid(configs, lambda name: cache, db, progress=False)) == len(configs)  # all skipped
    unstandardized = expand_grid([("clive", "clive")], "siglip2", head_choices(["ridge"], []), [8], standardize=False)
    assert unstandardized[0].standardize is False
    with pytest.raises(ValueError, match="probes"):
        expand_grid([("clive", "clive")], "siglip2", head_choices(["knn"], []), [8], dropout="layers", keeps=[0.5])
