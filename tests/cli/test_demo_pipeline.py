"""A shortened `iqa demo` end to end: set, manifest, the three stores, heads, layer sweep, table, report, resume."""

import shutil
import sqlite3

import pytest
from typer.testing import CliRunner

from iqa.cli import app
from iqa.data.demo import DEMO_DIR


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, demo_labels):
    shutil.copytree(demo_labels.parent, tmp_path / DEMO_DIR)  # the session's build: the set is tested in test_demo_set
    args = ["demo", "--cache", str(tmp_path), "--seeds", "8", "--epochs", "5", "--no-tsne"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "manifest.json").exists()
    assert (tmp_path / "demo" / "nss.zarr").exists() and (tmp_path / "demo" / "dinov2@tiny.zarr").exists()
    assert (tmp_path / "report" / "index.html").stat().st_size > 0
    assert (tmp_path / "demo" / "swin-t@tiny.zarr").exists()  # the layer sweep's store: every stage
    assert (tmp_path / "report" / "figures" / "srcc_vs_layer.png").stat().st_size > 0
    assert (tmp_path / "report" / "figures" / "scatter_nss__demo.png").stat().st_size > 0  # from the kept weights
    assert "SRCC against layer" in (tmp_path / "report" / "index.html").read_text()
    assert "best NSS model exported to" in result.output and (tmp_path / "models").is_dir()

    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        runs = db.execute("SELECT config, status, best_srcc FROM runs").fetchall()
        finished = db.execute("SELECT key, finished_at FROM runs ORDER BY key").fetchall()
    assert len(runs) == 8 and all(status == "done" for _, status, _ in runs)
    sweep = sorted(config for config, _, _ in runs if '"backbone": "swin-t"' in config)
    assert len(sweep) == 2 and '"layers": [1]' in sweep[0] and '"layers": [2]' in sweep[1]
    rows = [line for line in result.output.splitlines() if line.startswith("| nss") or line.startswith("| dinov2")]
    assert len(rows) == 6 and "| swin-t" not in result.output  # the printed table is the heads' alone

    # The weight-free NSS features carry quality information a random network does not
    # (after 5 epochs the sigmoid head still lags, so compare the best and the mean).
    nss = [srcc for config, _, srcc in runs if '"backbone": "nss"' in config]
    control = [srcc for config, _, srcc in runs if '"backbone": "dinov2"' in config]
    assert max(nss) > max(control) + 0.1 and sum(nss) > sum(control)

    # Run again: the set, the stores and every finished run are reused, nothing is retrained.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT key, finished_at FROM runs ORDER BY key").fetchall() == finished
