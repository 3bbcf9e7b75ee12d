"""Finished runs logged to MLflow (`--mlflow`), where many researchers already compare experiments.

The results database stays the source of truth: this module only copies finished runs out of it. Each
run becomes one MLflow run tagged with its key (`iqa.key`), so logging the same grid again adds nothing:
params are the run config, metrics the per-epoch curves (step = epoch) and the kept epoch's figures, and
artifacts the run's kept weights folder (`<cache>/runs/<key>/`).

MLflow's file store (`./mlruns`) is refused by current MLflow, so the default tracking store is an SQLite
file inside the cache, `<cache>/mlflow/mlflow.db`, with artifacts beside it in `<cache>/mlflow/artifacts`:
no server, and nothing written outside the cache. Any other tracking URI (a server, another database) is
used as given.
"""

from pathlib import Path

from iqa.heads.saved.weights import RUNS_DIR

EXPERIMENT = "iqa"
TRACKING_DIR = "mlflow"
KEY_TAG = "iqa.key"
OUTCOME = ("best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")
NOT_PARAMS = {"key", "curves", "gates", "fingerprint_id", "finished_at", "status", *OUTCOME, "diverged_epoch"}


class TrackerUnavailable(ImportError):
    """MLflow is an optional extra."""


def default_tracking_uri(cache: Path) -> str:
    return f"sqlite:///{(Path(cache) / TRACKING_DIR / 'mlflow.db').resolve()}"


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise TrackerUnavailable("MLflow is not installed; pip install 'iqa[mlflow]'") from None
    return mlflow


def run_name(run: dict) -> str:
    data = run.get("train_dataset", "?")
    if run.get("test_dataset") not in (None, data):
        data = f"{data}->{run['test_dataset']}"
    return f"{run.get('backbone', '?')}/{data}/{run.get('head', '?')}/seed{run.get('seed', '?')}"


def run_params(run: dict) -> dict[str, str]:
    """The run's config as MLflow params (strings; MLflow caps a value at 6000 characters)."""
    return {name: str(value)[:6000] for name, value in sorted(run.items()) if name not in NOT_PARAMS}


def epoch_metrics(curves: dict) -> list[tuple[str, float, int]]:
    """(name, value, epoch) for every per-epoch number of the run's curves. A per-epoch vector (a gated
    head's gate weights, one per channel) is logged as its mean, `<name>_mean`; nested records (stage
    weights) and missing values are left out."""
    out = []
    for name, values in curves.items():
        if not isinstance(values, list):
            continue
        for epoch, value in enumerate(values, start=1):
            if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                out.append((f"{name}_mean", sum(value) / len(value), epoch))
            elif isinstance(value, (int, float)) and value == value:
                out.append((name, float(value), epoch))
    return out


def _experiment_id(client, cache: Path, uri: str) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    artifacts = (Path(cache) / TRACKING_DIR / "artifacts").resolve() if uri == default_tracking_uri(cache) else None
    return client.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri() if artifacts else None)


def logged_keys(client, experiment_id: str) -> set[str]:
    """The run keys already in the experiment, page by page."""
    keys, token = set(), None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        keys |= {run.data.tags[KEY_TAG] for run in page if KEY_TAG in run.data.tags}
        token = page.token
        if not token:
            return keys


def log_runs(runs: list[dict], results_db: Path, cache: Path, uri: str | None = None) -> int:
    """Log each finished run not yet in the tracking store; returns how many were logged. The tracking URI is
    the client's alone: MLflow's process-wide URI is left as the caller set it."""
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param

    uri = uri or default_tracking_uri(cache)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = _experiment_id(client, cache, uri)
    done = logged_keys(client, experiment)
    logged = 0
    for run in runs:
        if run.get("status") != "done" or run["key"] in done:
            continue
        created = client.create_run(experiment, run_name=run_name(run), tags={KEY_TAG: run["key"]})
        run_id = created.info.run_id
        metrics = [Metric(name, value, 0, step) for name, value, step in epoch_metrics(run.get("curves") or {})]
        metrics += [Metric(name, float(run[name]), 0, 0) for name in OUTCOME
                    if isinstance(run.get(name), (int, float)) and run[name] == run[name]]
        params = [Param(name, value) for name, value in run_params(run).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        client.set_tag(run_id, "iqa.regime", str(run.get("regime")))
        kept = Path(results_db).parent / RUNS_DIR / run["key"]
        if kept.is_dir():
            client.log_artifacts(run_id, str(kept), artifact_path="weights")
        client.set_terminated(run_id)
        logged += 1
    return logged
