"""`--l2norm`: embeddings scaled to unit length at head time, a part of the run's key."""

from types import SimpleNamespace

import numpy as np

from iqa.cache.results import ResultsDB
from iqa.heads.training.config import RunConfig
from iqa.heads.training.grid import _stack_key, stack_inputs
from helpers import extract, head, toy_dataset


def test_l2norm_at_head_time_gives_unit_rows_and_is_part_of_the_run_key():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32) * 5
    cached = SimpleNamespace(embeddings=x, manifest=SimpleNamespace(targets=np.zeros(6)))
    config = RunConfig("toy", "toy", "clip", "sigmoid", "sigmoid", "relu", 0, l2norm=True)
    data, _ = stack_inputs([config], [(np.arange(4), np.arange(4, 6))], cached, cached)
    assert np.allclose(np.linalg.norm(data.x_train, axis=1), 1.0) and not np.allclose(np.linalg.norm(x, axis=1), 1.0)
    assert _stack_key(config) != _stack_key(RunConfig("toy", "toy", "clip", "sigmoid", "sigmoid", "relu", 0))


def test_head_l2norm_option_reaches_the_run_and_its_key(tmp_path):
    toy_dataset(tmp_path)
    extract(tmp_path)
    assert head(tmp_path).exit_code == 0
    assert head(tmp_path, "--l2norm").exit_code == 0
    runs = ResultsDB(tmp_path / "results.sqlite").runs()
    assert [r["l2norm"] for r in runs] == [False, True] and runs[0]["key"] != runs[1]["key"]
    assert runs[0]["best_srcc"] != runs[1]["best_srcc"]
