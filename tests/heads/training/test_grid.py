"""Grids: expansion, stacking, skipping finished runs, resuming after a kill; the results tables."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import iqa.heads.training.grid as grid
from iqa.data.splits import split_indices
from iqa.heads.training.grid import expand_grid, head_choices, run_grid, run_rows
from iqa.heads.training import config as run_config
from iqa.cache.results import SCHEMA, SCHEMA_VERSION, ResultsDB, ResultsDBError
from iqa.heads.report.tables import results_table
from iqa.heads.training.config import RunConfig, rows_digest, run_key
from helpers import db_row, fake_cache, small_grid


def test_expand_grid_every_combination():
    configs = small_grid()
    assert len(configs) == 3 * 2 * 2
    assert {c.head for c in configs} == {"baseline", "sig", "sigmoid+gelu"}
    assert {(c.act1, c.act2) for c in configs if c.head == "sigmoid+gelu"} == {("sigmoid", "gelu")}
    assert all(c.regime == "frozen" for c in configs)
    with pytest.raises(ValueError, match="unknown head"):
        head_choices(["fancy"], [])


def test_rows_follow_the_split_drop_failed_images_and_cross_dataset_tests_on_everything():
    train, test = fake_cache("koniq10k"), fake_cache("clive", n=50)
    (config,) = expand_grid([("koniq10k", "clive")], "clip", head_choices(["baseline"], []), [8])
    train_rows, test_rows = run_rows(config, train, test)
    split_train, _ = split_indices(train.manifest.paths, 8)
    assert list(train_rows) == [i for i in split_train if i != 5]
    assert list(test_rows) == [i for i in range(50) if i != 5]


def test_grid_trains_in_stacks_records_results_and_skips_finished_runs(tmp_path, monkeypatch):
    db = ResultsDB(tmp_path / "results.sqlite")
    loads = []
    caches = {"clive": fake_cache("clive")}
    load = lambda name: loads.append(name) or caches[name]
    configs = small_grid()
    calls = []
    real_train = grid.train_stack
    monkeypatch.setattr(grid, "train_stack", lambda data, members, *a, **k: calls.append(len(members)) or real_train(data, members, *a, hidden=32, **{**k}))
    records = run_grid(configs, load, db, stack_size=3, progress=False)
    assert loads == ["clive"]
    assert sorted(calls) == [1, 1, 1, 3, 3, 3]  # 3 heads x (4 runs = one stack of 3 + one of 1)
    assert [r["seed"] for r in records] == [c.seed for c in configs]
    assert all(r["status"] == "done" and 1 <= r["best_epoch"] <= 2 and len(r["curves"]["srcc"]) == 2 for r in records)
    gated_free = records[0]
    assert gated_free["gates"] is None

    calls.clear()
    again = run_grid(configs, load, db, stack_size=3, progress=False)
    assert calls == [] and [r["key"] for r in again] == [r["key"] for r in records]

    caches["clive"] = fake_cache("clive", fingerprint="fp2")  # a re-extracted cache trains afresh
    run_grid(configs[:2], load, db, stack_size=3, progress=False)
    assert calls == [2]


def test_killed_grid_resumes_where_it_stopped(tmp_path, monkeypatch):
    db = ResultsDB(tmp_path / "results.sqlite")
    load = lambda name: fake_cache(name)
    configs = small_grid()
    real_train = grid.train_stack
    finished_stacks = []

    def dies_on_third_stack(data, members, *a, **k):
        if len(finished_stacks) == 2:
            raise KeyboardInterrupt
        finished_stacks.append(len(members))
        return real_train(data, members, *a, hidden=32, **k)

    monkeypatch.setattr(grid, "train_stack", dies_on_third_stack)
    with pytest.raises(KeyboardInterrupt):
        run_grid(configs, load, db, stack_size=4, progress=False)
    assert len(db.finished_keys()) == 8  # two whole stacks were committed, nothing of the third

    trained = []
    monkeypatch.setattr(grid, "train_stack", lambda data, members, *a, **k: trained.append(len(members)) or real_train(data, members, *a, hidden=32, **k))
    records = run_grid(configs, load, db, stack_size=4, progress=False)
    assert trained == [4] and len(records) == 12 and len(db.finished_keys()) == 12


def fake_run(dataset, head, k, seed, srcc, plcc, status="done", backbone="siglip2"):
    config = dict(train_dataset=dataset, test_dataset=dataset, backbone=backbone, head=head, mask_k=k, seed=seed, regime="frozen")
    result = SimpleNamespace(status=status, best_epoch=3, best_srcc=srcc, best_plcc=plcc, last_srcc=srcc - 0.1,
                             last_plcc=plcc - 0.1, diverged_epoch=None, curves={}, gates=None)
    return db_row(config, "fp", result)


def test_results_tables_mean_std_delta_and_diverged(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    runs = []
    for dataset, base in (("agiqa1k", 0.8), ("kadid10k", 0.9), ("clive", 0.7), ("koniq10k", 0.85)):
        for k, drop in ((100.0, 0.0), (50.0, 0.1)):
            for seed, noise in ((8, 0.0), (19, 0.02)):
                runs.append(fake_run(dataset, "baseline", k, seed, base - drop + noise, base - drop))
    runs.append(fake_run("clive", "sig", 100.0, 8, 0.9, 0.9, status="diverged"))
    runs.append(fake_run("clive", "sig", 100.0, 19, 0.9, 0.9))
    db.record(runs)
    assert len(db.finished_keys()) == len(runs)

    md = results_table(db.runs(), layout="masking", fmt="md")
    lines = md.splitlines()
    assert lines[1].startswith("| head | mask_k | agiqa1k SRCC | agiqa1k PLCC | kadid10k SRCC")
    assert "Δ Group 1 SRCC" in lines[1] and "Δ Group 2 SRCC" in lines[1]
    base_row = next(l for l in lines if l.startswith("| baseline | 100 |"))
    assert f"{0.81:.3f} ± {np.std([0.8, 0.82], ddof=1):.3f}" in base_row
    half_row = next(l for l in lines if l.startswith("| baseline | 50 |"))
    assert half_row.count("-0.100") == 4  # Δ SRCC and PLCC of both groups: every dataset dropped 0.1
    sig_row = next(l for l in lines if l.startswith("| sig | 100 |"))
    assert "—" in sig_row  # one seed diverged: the paper's dash

    csv = results_table(db.runs(), layout="backbones", fmt="csv", which="last").splitlines()
    assert csv[0].startswith("backbone,head,mask_k,agiqa1k SRCC mean,agiqa1k SRCC std")
    row = next(l.split(",") for l in csv if l.startswith("siglip2,baseline,100,"))
    assert float(row[3]) == pytest.approx(0.71)  # last epoch = best - 0.1 in the fake runs

    latex = results_table(db.runs(), layout="variants", fmt="latex")
    assert "\\begin{tabular}" in latex and "\\pm" in latex and "---" in latex


def test_run_key_changes_with_config_data_rows_recipe_and_trainer_version(monkeypatch):
    config = RunConfig("clive", "clive", "siglip2", "sig", "sigmoid", "lrelu", 8)
    key = run_key(config, "a", "rows")
    assert key != run_key(config, "b", "rows") and key != run_key(config, "a", "other rows")
    assert key != run_key(replace(config, regime="lora"), "a", "rows")
    assert key != run_key(replace(config, train_dataset="koniq10k", test_dataset="koniq10k"), "a", "rows") != key
    # what the code decides: a fixed trainer or another recipe constant makes every old result stale
    monkeypatch.setattr(run_config, "TRAINER_VERSION", run_config.TRAINER_VERSION + 1)
    assert run_key(config, "a", "rows") != key
    monkeypatch.undo()
    monkeypatch.setattr(run_config, "MARGIN_SCALE", 0.5)
    assert run_key(config, "a", "rows") != key
    monkeypatch.undo()
    assert run_key(config, "a", "rows") == key
    assert rows_digest(np.arange(4), np.arange(4, 6)) != rows_digest(np.arange(3), np.arange(4, 6))


def test_a_run_on_a_store_with_rows_missing_is_not_served_for_the_complete_store(tmp_path):
    """A store whose extraction was cut short trains on fewer rows; once complete, the run trains afresh."""
    db = ResultsDB(tmp_path / "results.sqlite")
    partial, complete = fake_cache("clive"), fake_cache("clive")
    partial.valid[60:] = False  # rows an interrupted extraction never wrote
    (config,) = expand_grid([("clive", "clive")], "siglip2", head_choices(["baseline"], []), [8], epochs=2)
    (on_partial,) = run_grid([config], lambda _: partial, db, progress=False)
    (on_complete,) = run_grid([config], lambda _: complete, db, progress=False)
    assert on_partial["key"] != on_complete["key"] and len(db.finished_keys()) == 2
    assert on_partial["best_srcc"] != on_complete["best_srcc"]
    (again,) = run_grid([config], lambda _: complete, db, progress=False)
    assert again["finished_at"] == on_complete["finished_at"] and len(db.finished_keys()) == 2


def test_results_database_schema_is_versioned(tmp_path):
    import sqlite3

    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:  # a database from before versioning, one run in it
        db.execute(SCHEMA)
        db.execute("INSERT INTO runs VALUES ('k', 'fp', 'frozen', '{\"seed\": 8, \"regime\": \"frozen\"}', 'done', 1, 0.5, "
                   "0.5, 0.5, 0.5, NULL, '{}', NULL, 'now')")
    runs = ResultsDB(old).runs()
    assert [r["key"] for r in runs] == ["k"] and runs[0]["seed"] == 8
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ResultsDBError, match="newer than this iqa"):
        ResultsDB(old)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE runs (key TEXT, score REAL)")
    with pytest.raises(ResultsDBError, match="not an iqa results database"):
        ResultsDB(other)


def test_official_split_trains_on_training_tests_on_test_and_selects_on_validation():
    from iqa.heads.training.grid import stack_inputs

    cache = fake_cache("koniq10k", n=100)
    cache.manifest.extras["set"] = ["training"] * 70 + ["validation"] * 10 + ["test"] * 20
    (config,) = expand_grid([("koniq10k", "koniq10k")], "siglip2", head_choices(["baseline"], []), [8],
                            split_by="official", select="val")
    train_rows, test_rows = run_rows(config, cache, cache)
    assert list(train_rows) == [i for i in range(70) if i != 5] and list(test_rows) == list(range(80, 100))
    data, _ = stack_inputs([config], [(train_rows, test_rows)], cache, cache)
    assert data.val_rows.tolist() == [list(range(70, 80))] and data.train_rows.tolist() == [list(train_rows)]
    clive = fake_cache("clive", n=30)  # across datasets: the published training rows, all of the other set
    (cross,) = expand_grid([("koniq10k", "clive")], "siglip2", head_choices(["baseline"], []), [8], split_by="official")
    assert list(run_rows(cross, cache, clive)[0]) == list(train_rows)


def test_one_training_set_against_several_test_sets_in_one_call():
    from iqa.heads.training.grid import dataset_pairs

    assert dataset_pairs([], ["koniq10k"], ["spaq", "kadid10k", "agiqa3k"]) == [
        ("koniq10k", "spaq"), ("koniq10k", "kadid10k"), ("koniq10k", "agiqa3k")]
    assert dataset_pairs(["clive"], ["a", "b"], ["c", "d"]) == [("clive", "clive"), ("a", "c"), ("b", "d")]
    with pytest.raises(ValueError, match="come in pairs"):
        dataset_pairs([], ["a", "b"], ["c", "d", "e"])
    with pytest.raises(ValueError, match="give dataset"):
        dataset_pairs([], [], [])


def test_default_stacks_hold_no_more_members_than_fit_in_memory_and_train_the_same(tmp_path, monkeypatch):
    """Without --stack-size, a stack holds as many members as the device's memory takes (its parameters built on
    the meta device, BYTES_PER_PARAMETER each); members train as if alone, so the split changes no number."""
    from iqa.heads.training.trainer import make_stack

    caches = {"clive": fake_cache("clive")}
    configs = [c for c in small_grid() if c.head == "sig"]  # 4 seeds of one head: one shape
    with torch.device("meta"):
        parameters = sum(p.numel() for p in make_stack(caches["clive"].embeddings.shape[1], [0], *grid.HEADS["sig"],
                                                       [100.0], None, [1.0]).parameters())
    budget = grid.memory_budget
    assert budget("cpu") > 0 and budget("cuda") is None  # no GPU here (under Ray, the workers' devices decide)
    calls = []
    real_train = grid.train_stack
    monkeypatch.setattr(grid, "train_stack", lambda data, members, *a, **k: calls.append(len(members)) or real_train(data, members, *a, **k))
    monkeypatch.setattr(grid, "STACK_SIZE", {"cpu": 4})
    monkeypatch.setattr(grid, "memory_budget", lambda device: int(2.5 * parameters * grid.BYTES_PER_PARAMETER))
    fitted = run_grid(configs, caches.__getitem__, ResultsDB(tmp_path / "fitted.sqlite"), progress=False)
    assert calls == [2, 2]  # two members fit, not the device's default four
    calls.clear()
    given = run_grid(configs, caches.__getitem__, ResultsDB(tmp_path / "given.sqlite"), stack_size=4, progress=False)
    assert calls == [4]  # a --stack-size given is kept
    assert [(r["key"], r["best_srcc"], r["curves"]["srcc"]) for r in fitted] == [
        (r["key"], r["best_srcc"], r["curves"]["srcc"]) for r in given]
