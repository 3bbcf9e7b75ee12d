"""Paired comparison of two configurations: per-seed differences and a bootstrap interval over test images,
checked against a hand loop over the same draws with scipy's correlations."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from typer.testing import CliRunner

from iqa.cache.results import ResultsDB
from iqa.cli import app
from iqa.heads.report.build import write_report
from iqa.heads.report.paired import BOOTSTRAP_SEED, bootstrap_differences, compare_keys, paired_comparison, paired_table
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from helpers import fake_cache


def seeded_predictions(seeds=(8, 19, 25), n=40, noise=(0.3, 0.6)):
    """seed -> (rows, pred A, pred B, target): B's predictions noisier than A's, and ties in the targets."""
    out = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        target = np.round(rng.uniform(size=n), 1)
        out[seed] = (np.arange(seed, seed + n), *(target + s * rng.normal(size=n) for s in noise), target)
    return out


def as_runs(data: dict, side: int) -> dict[int, dict]:
    return {seed: {"rows": rows, "pred": preds[side], "target": target} for seed, (rows, *preds, target) in data.items()}


def hand_bootstrap(data: dict, correlation, resamples: int) -> np.ndarray:
    """The mean over seeds of corr(B) - corr(A) on each resample, one resample at a time."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = {seed: rng.integers(0, len(data[seed][3]), (resamples, len(data[seed][3]))) for seed in sorted(data)}
    means = []
    for r in range(resamples):
        diffs = []
        for seed in sorted(data):
            _, a, b, t = data[seed]
            i = draws[seed][r]
            diffs.append(correlation(b[i], t[i])[0] - correlation(a[i], t[i])[0])
        means.append(np.mean(diffs))
    return np.array(means)


def test_per_seed_differences_and_the_bootstrap_interval_equal_a_hand_computation():
    data = seeded_predictions()
    result = paired_comparison(as_runs(data, 0), as_runs(data, 1), lambda run: run, resamples=200)
    for i, seed in enumerate(sorted(data)):
        _, a, b, t = data[seed]
        assert result.srcc_a[i] == pytest.approx(spearmanr(a, t)[0], abs=1e-12)
        assert result.plcc_b[i] == pytest.approx(pearsonr(b, t)[0], abs=1e-12)
    hand_diff = np.mean([spearmanr(d[2], d[3])[0] - spearmanr(d[1], d[3])[0] for d in data.values()])
    assert result.srcc_diff == pytest.approx(hand_diff, abs=1e-12) and result.srcc_diff < 0  # B is noisier
    for metric, correlation in (("srcc", spearmanr), ("plcc", pearsonr)):
        hand = hand_bootstrap(data, correlation, 200)
        np.testing.assert_allclose(bootstrap_differences([d[1:] for d in data.values()], metric, 200), hand, atol=1e-12)
        assert getattr(result, f"{metric}_ci") == pytest.approx(tuple(np.percentile(hand, [2.5, 97.5])), abs=1e-12)
    assert result.srcc_ci[1] < 0  # the noisier predictions are worse on these images, beyond resampling
    same = paired_comparison(as_runs(data, 0), as_runs(data, 0), lambda run: run, resamples=50)
    assert same.srcc_diff == 0 and same.srcc_ci == (0.0, 0.0)
    assert "| mean |" in paired_table(result) and paired_table(result, "csv").count("\n") == len(data) + 2


def test_runs_on_other_images_or_other_seeds_are_refused():
    data = seeded_predictions()
    shifted = {seed: {**run, "rows": run["rows"] + 1} for seed, run in as_runs(data, 1).items()}
    with pytest.raises(ValueError, match="different images"):
        paired_comparison(as_runs(data, 0), shifted, lambda run: run)
    with pytest.raises(ValueError, match="share no seed"):
        paired_comparison(as_runs(seeded_predictions(seeds=(8,)), 0), as_runs(seeded_predictions(seeds=(19,)), 1),
                          lambda run: run)


def test_two_trained_configurations_compared_from_their_kept_weights(tmp_path):
    """The kept heads predict the test rows again: their per-seed SRCC is the recorded one."""
    cache = fake_cache("clive", n=150)
    db = ResultsDB(tmp_path / "results.sqlite")
    configs = expand_grid([("clive", "clive")], "siglip2", head_choices(["baseline", "sig"], []), [8, 19], epochs=2)
    records = run_grid(configs, lambda name: cache, db, progress=False)
    baseline = [r for r in records if r["head"] == "baseline"]
    sig = [r for r in records if r["head"] == "sig"]
    runs = db.runs()
    result = compare_keys(runs, baseline[0]["key"][:10], sig[1]["key"][:10], db.path, lambda name, backbone, tag: cache)
    assert result.seeds == [8, 19]
    assert result.srcc_a == pytest.approx([r["best_srcc"] for r in baseline], abs=1e-6)
    assert result.srcc_b == pytest.approx([r["best_srcc"] for r in sig], abs=1e-6)
    assert result.srcc_ci[0] <= result.srcc_diff <= result.srcc_ci[1]
    with pytest.raises(ValueError, match="seeds of one configuration"):
        compare_keys(runs, baseline[0]["key"], baseline[1]["key"], db.path, lambda name, backbone, tag: cache)
    summary = write_report(runs, tmp_path / "report", lambda name, backbone, tag: cache, tsne=False, progress=False,
                           results_db=db.path, paired=[(baseline[0]["key"][:10], sig[1]["key"][:10]), ("nokey", "other")])
    written = [p for p in summary.tables if p.name.startswith("paired_")]
    assert [p.suffix for p in written] == [".md", ".csv"] and written[0].read_text() == paired_table(result)
    assert "Paired comparison" in (tmp_path / "report" / "index.html").read_text()
    assert any("paired comparison nokey vs other: skipped (no run key starts with" in n for n in summary.notes)
    one = CliRunner().invoke(app, ["results", "--db", str(db.path), "--compare", baseline[0]["key"]])
    assert one.exit_code == 1 and "two run keys" in one.output and one.output.count("\n") == 1
