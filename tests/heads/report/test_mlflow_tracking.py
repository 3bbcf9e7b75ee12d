"""`--mlflow`: finished runs copied to MLflow and read back with mlflow's own search."""

import pytest

from iqa.cache.results import ResultsDB
from iqa.heads.report.tracker import KEY_TAG, default_tracking_uri, log_runs
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from iqa.heads.saved.weights import run_weights_path

mlflow = pytest.importorskip("mlflow")

from helpers import fake_cache  # noqa: E402


def test_a_tiny_grid_logged_to_mlflow_reads_back_with_its_config_curves_and_weights(tmp_path, one_thread):
    db = ResultsDB(tmp_path / "results.sqlite")
    configs = expand_grid([("clive", "clive")], "siglip2", head_choices(["baseline", "gated"], []), [8, 19], epochs=3)
    records = run_grid(configs, lambda name: fake_cache(name), db, stack_size=4, progress=False)

    assert log_runs(records, db.path, tmp_path) == 4
    assert log_runs(records, db.path, tmp_path) == 0  # logged once, by key

    mlflow.set_tracking_uri(default_tracking_uri(tmp_path))
    found = mlflow.search_runs(experiment_names=["iqa"], output_format="list")
    by_key = {run.data.tags[KEY_TAG]: run for run in found}
    assert set(by_key) == {r["key"] for r in records}
    client = mlflow.MlflowClient()
    for record in records:
        run = by_key[record["key"]]
        assert run.data.params["head"] == record["head"] and run.data.params["seed"] == str(record["seed"])
        assert run.data.metrics["best_srcc"] == pytest.approx(record["best_srcc"])
        history = client.get_metric_history(run.info.run_id, "srcc")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(record["curves"]["srcc"])
        if record["head"] == "gated":
            assert len(client.get_metric_history(run.info.run_id, "g_act1_mean")) == 3
        weights = client.list_artifacts(run.info.run_id, "weights")
        assert [a.path for a in weights] == ["weights/" + run_weights_path(db.path, record["key"]).name]
    assert (tmp_path / "mlflow" / "artifacts").is_dir()  # nothing outside the cache
