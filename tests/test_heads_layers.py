"""Heads on stored layers: `--layer N`, `--layer all` (a sweep) and `--layers 4,3` (a concatenation)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_extract_run import QUIET, make_dataset
from typer.testing import CliRunner

from iqa.cache.manifest import Manifest, write_manifest
from iqa.cache.results import ResultsDB
from iqa.cache.store import load_cached, load_layer
from iqa.cli import app
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.export import export_run
from iqa.heads.report.figures import layer_figure
from iqa.heads.report.tables import results_table
from iqa.heads.score import load_model, score_dataset, score_files
from iqa.heads.grid import expand_grid, head_choices, layer_choices, run_grid
from iqa.heads.run_config import RunConfig, run_key

SHARED = dict(epochs=2, tag="tiny")


@pytest.fixture
def layered_cache(tmp_path, one_thread):
    paths = make_dataset(tmp_path, n=20)
    scores = np.random.default_rng(0).uniform(1, 5, len(paths))  # varied targets: SRCC is defined
    write_manifest(Manifest("toy", str(tmp_path / "images"), paths, scores, scores / 5, "MOS 1-5, target = y/5"), tmp_path)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", tiny=True, dtype="float32", layers="all", **QUIET),
                    num_workers=0)
    return tmp_path


def test_a_layer_run_trains_on_that_layers_vectors(layered_cache, tmp_path):
    heads = head_choices(["baseline"], [])
    load = lambda name: load_cached(layered_cache, name, "swin-t", "tiny")  # noqa: E731
    on_layer = expand_grid([("toy", "toy")], "swin-t", heads, [8], layer_sets=[(1,)], **SHARED)
    by_layer = run_grid(on_layer, load, ResultsDB(tmp_path / "a.sqlite"), progress=False)
    # the same run on a loader whose default embedding *is* layer 1 gives the same numbers
    layer_one = lambda name: replace(load(name), embeddings=load_layer(layered_cache, name, "swin-t", 1, "tiny"))  # noqa: E731
    plain = expand_grid([("toy", "toy")], "swin-t", heads, [8], **SHARED)
    as_default = run_grid(plain, layer_one, ResultsDB(tmp_path / "b.sqlite"), progress=False)
    assert by_layer[0]["best_srcc"] == as_default[0]["best_srcc"] and by_layer[0]["layers"] == [1]
    assert np.isfinite(by_layer[0]["best_srcc"]) and by_layer[0]["curves"] == as_default[0]["curves"]
    assert by_layer[0]["key"] != as_default[0]["key"]


def test_an_exported_layer_model_embeds_with_those_layers(layered_cache, tmp_path):
    configs = expand_grid([("toy", "toy")], "swin-t", head_choices(["baseline"], []), [8], layer_sets=[(2, 1)], **SHARED)
    db = ResultsDB(tmp_path / "c.sqlite")
    run = run_grid(configs, lambda name: load_cached(layered_cache, name, "swin-t", "tiny"), db, progress=False)[0]
    model = load_model(export_run(layered_cache, db.path, run, tmp_path / "model"))
    paths = load_cached(layered_cache, "toy", "swin-t", "tiny").manifest.paths[:3]
    stored = np.concatenate([load_layer(layered_cache, "toy", "swin-t", n, "tiny")[:3] for n in (2, 1)], axis=1)
    np.testing.assert_allclose(model.embed([layered_cache / "images" / p for p in paths]).numpy(), stored, atol=2e-3)
    expected = model.score_embeddings(torch.from_numpy(stored))
    from_files = score_files(model, [layered_cache / "images" / p for p in paths], workers=0, progress=False)
    np.testing.assert_allclose([s.score for s in from_files], expected.numpy(), atol=2e-3)
    from_store, source = score_dataset(model, layered_cache, "toy", workers=0, progress=False)
    assert source == "store"
    np.testing.assert_allclose([s.score for s in from_store[:3]], expected.numpy(), atol=1e-6)


def test_layer_sets_sweep_and_concatenate():
    assert layer_choices(None, None, []) == [None]
    assert layer_choices("all", None, [1, 2, 3]) == [(1,), (2,), (3,)]
    assert layer_choices("2", None, []) == [(2,)] and layer_choices(None, "4,3", []) == [(4, 3)]
    for bad in [("2", "4,3"), ("4,3", None), ("x", None), ("all", None)]:
        with pytest.raises(ValueError):
            layer_choices(*bad, [])


def test_default_configs_keep_their_keys_and_layer_configs_round_trip():
    config = RunConfig("a", "a", "swin-t", "baseline", "relu", "relu", 8)
    assert "layers" not in config.as_dict()  # keys of runs made before layers existed are unchanged
    layered = replace(config, layers=(4, 3))
    assert RunConfig(**json.loads(json.dumps(layered.as_dict()))) == layered
    assert run_key(layered, "f", "r") != run_key(config, "f", "r")


def json_runs(output: str) -> list[dict]:
    """The --json lines (the progress bar, on stderr, may share the first one's line)."""
    return [json.loads(line[line.index("{"):]) for line in output.splitlines() if "{" in line]


def test_cli_layer_sweep_and_pair(layered_cache):
    common = ["head", "--backbone", "swin-t", "--cached", "--dataset", "toy", "--tag", "tiny", "--epochs", "1",
              "--seeds", "8", "--cache", str(layered_cache), "--json"]
    sweep = CliRunner().invoke(app, [*common, "--layer", "all"])
    assert sweep.exit_code == 0, sweep.output
    assert [run["layers"] for run in json_runs(sweep.output)] == [[1], [2]]
    pair = CliRunner().invoke(app, [*common, "--layers", "2,1"])
    assert pair.exit_code == 0 and [run["layers"] for run in json_runs(pair.output)] == [[2, 1]], pair.output
    runs = ResultsDB(layered_cache / "results.sqlite").runs()
    pairing = results_table(runs, layout="variants")  # the pairing table: a row per layer set, "2+1" concatenated
    assert all(f"| baseline | {row} |" in pairing for row in ("1", "2", "2+1")), pairing
    fig = layer_figure(runs)  # the sweep's two layers as one line; the 2,1 pair is not a point of it
    (line,) = fig.axes[0].containers  # one errorbar line: baseline on toy
    assert list(line.lines[0].get_xdata()) == [1, 2]
    table = CliRunner().invoke(app, [*common[:-1], "--layer", "all"])  # the sweep's table: a row per layer
    assert table.exit_code == 0 and "| baseline | 1 |" in table.output and "| baseline | 2 |" in table.output, table.output
    missing = CliRunner().invoke(app, [*common, "--layer", "7"])
    assert missing.exit_code != 0 and "not [7]" in missing.output and "Traceback" not in missing.output, missing.output



def test_a_hyper_head_on_layers_reads_the_deepest_and_its_model_scores_as_recorded(layered_cache, tmp_path):
    from iqa.heads.grid import run_rows
    from iqa.heads.metrics import srcc
    from iqa.heads.report.scatter import kept_predictions
    from iqa.heads.report.tsne import retrained_features
    from iqa.heads.weights import load_head, run_weights_path

    configs = expand_grid([("toy", "toy")], "swin-t", head_choices(["hyper"], []), [8], layer_sets=[(1, 2)], **SHARED)
    db = ResultsDB(tmp_path / "h.sqlite")
    cached = load_cached(layered_cache, "toy", "swin-t", "tiny")
    run = run_grid(configs, lambda name: cached, db, progress=False)[0]
    first, deepest = (load_layer(layered_cache, "toy", "swin-t", n, "tiny") for n in (1, 2))
    head, _ = load_head(run_weights_path(db.path, run["key"]))
    assert head.content == slice(first.shape[1], first.shape[1] + deepest.shape[1])  # layer 2, after layer 1
    assert configs[0].recipe()["hyper"]["hyper_reads"] == "the deepest of the layers"
    assert "hyper_reads" not in replace(configs[0], layers=None).recipe()["hyper"]  # one embedding: keys unchanged
    stored = torch.from_numpy(np.concatenate([first, deepest], axis=1))
    _, test_rows = run_rows(configs[0], cached, cached)
    with torch.no_grad():
        pred = head(stored[test_rows][None])
    assert float(srcc(pred, torch.as_tensor(cached.targets[test_rows])[None])[0]) == pytest.approx(run["best_srcc"], abs=1e-6)
    assert kept_predictions(run, db.path, cached, cached)["srcc"] == pytest.approx(run["best_srcc"], abs=1e-6)  # the report's scatter
    assert retrained_features(run, cached, cached)["retrained_srcc"] == pytest.approx(run["best_srcc"], abs=1e-4)  # its t-SNE
    model = load_model(export_run(layered_cache, db.path, run, tmp_path / "model"))
    scored, _ = score_dataset(model, layered_cache, "toy", workers=0, progress=False)
    with torch.no_grad():
        every_row = head(stored[None])[0]
    np.testing.assert_allclose([s.score for s in scored], every_row.numpy(), atol=1e-6)  # the model reads the same columns
