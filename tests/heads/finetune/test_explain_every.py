"""`iqa finetune --explain-every N`: Grad-CAM maps of fixed test images kept over training, the run unchanged."""

import json

import numpy as np
import pytest

from iqa.cache.results import ResultsDB, default_db
from iqa.heads.finetune.explain_every import kept_maps, maps_folder
from iqa.heads.saved.weights import run_weights_path

from helpers import bright_dataset, iqa

pytestmark = pytest.mark.usefixtures("one_thread")


def tune(cache, *extra):
    bright_dataset(cache, n=30)  # 24 training images: two optimiser steps of 12 an epoch
    result = iqa("finetune", "--backbone", "dinov2", "--dataset", "bright", "--weights", "tiny", "--epochs", "2", "--workers", "0",
                 "--dtype", "float32", "--json", "--cache", cache, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])


def test_maps_are_kept_every_n_steps_and_the_run_learns_the_same(tmp_path):
    plain = tune(tmp_path / "plain")
    explained = tune(tmp_path / "explained", "--explain-every", "3")
    assert explained["key"] == plain["key"] and explained["best_srcc"] == plain["best_srcc"]
    stored = {r["key"]: r for r in ResultsDB(default_db(tmp_path / "explained")).runs()}[explained["key"]]
    assert stored["curves"] == {r["key"]: r for r in ResultsDB(default_db(tmp_path / "plain")).runs()}[plain["key"]]["curves"]

    folder = maps_folder(run_weights_path(default_db(tmp_path / "explained"), explained["key"]).parent)
    names, steps, maps = kept_maps(folder)
    assert steps == [3] and len(names) == 3 and maps.shape[:2] == (1, 3)  # 4 steps in all: one kept, at step 3
    assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0  # Grad-CAM is ReLU'd, and not empty
    assert kept_maps(maps_folder(run_weights_path(default_db(tmp_path / "plain"), plain["key"]).parent)) is None


def test_the_report_draws_the_kept_maps_as_a_strip(tmp_path):
    from iqa.heads.report.build import write_report

    explained = tune(tmp_path, "--explain-every", "1")
    runs = ResultsDB(default_db(tmp_path)).runs()
    summary = write_report(runs, tmp_path / "report", tsne=False, progress=False, results_db=default_db(tmp_path))
    strip = tmp_path / "report" / "figures" / f"gradcam_training_{explained['key'][:12]}.png"
    assert strip in summary.figures
    from PIL import Image

    width, height = Image.open(strip).size
    assert width > height  # four steps across, three images down
