"""Heads on stored layers: `--layer N`, `--layer all` (a sweep) and `--layers 4,3` (a concatenation)."""

import json
import sys
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import QUIET, make_dataset
from typer.testing import CliRunner

from iqa.cache.manifest import Manifest, write_manifest
from iqa.cache.results import ResultsDB
from iqa.cache.load import load_cached, load_layer
from iqa.cli import app
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.saved.export import export_run
from iqa.data.distortion_types import distortion_types
from iqa.heads.report.build import ReportSummary, _Page, _stage_tsne_figures, write_report
from iqa.heads.report.figures import layer_figure
from iqa.heads.report.stages import stage_points, stage_weight_figures
from iqa.heads.report.tables import results_table
from iqa.heads.saved.model import load_model, score_dataset, score_files
from iqa.heads.training.grid import expand_grid, head_choices, layer_choices, run_grid
from iqa.heads.training.config import RunConfig, run_key

SHARED = dict(epochs=2, tag="tiny")


@pytest.fixture
def layered_cache(tmp_path, one_thread):
    paths = make_dataset(tmp_path, n=20)
    scores = np.random.default_rng(0).uniform(1, 5, len(paths))  # varied targets: SRCC is defined
    write_manifest(Manifest("toy", str(tmp_path / "images"), paths, scores, scores / 5, "MOS 1-5, target = y/5"), tmp_path)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", weights="tiny", dtype="float32", layers="all", **QUIET),
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
    assert "layers" not in config.to_dict() and "fuse" not in config.to_dict()  # keys made before them are unchanged
    # the key this config had before `fuse` existed (TRAINER_VERSION 2): a field left at its default adds nothing
    assert run_key(config, "f", "r") == "987571350937d50a6b9a519460c360fc7d066ce2e45f6417a02d78191cb849bf"
    layered = replace(config, layers=(4, 3))
    assert RunConfig(**json.loads(json.dumps(layered.to_dict()))) == layered
    assert run_key(layered, "f", "r") != run_key(config, "f", "r")
    fused = replace(layered, fuse="attention")
    assert RunConfig(**json.loads(json.dumps(fused.to_dict()))) == fused
    assert len({run_key(c, "f", "r") for c in (config, layered, fused)}) == 3


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


def test_a_fused_layer_model_records_stage_weights_exports_and_scores_from_disk_as_recorded(layered_cache, tmp_path):
    """--layers 2,1 --fuse attention: its own key beside the concatenation, per-image stage weights on the
    test rows in the record, and an exported model that reads the stages and scores as the head did."""
    heads = head_choices(["baseline"], [])
    concatenated = expand_grid([("toy", "toy")], "swin-t", heads, [8], layer_sets=[(2, 1)], **SHARED)
    fused = expand_grid([("toy", "toy")], "swin-t", heads, [8], layer_sets=[(2, 1)], fuse="attention", **SHARED)
    db = ResultsDB(tmp_path / "f.sqlite")
    load = lambda name: load_cached(layered_cache, name, "swin-t", "tiny")  # noqa: E731
    plain, run = run_grid(concatenated + fused, load, db, progress=False)
    assert run["fuse"] == "attention" and "fuse" not in plain and run["key"] != plain["key"]
    record = run["curves"]["stage_weights"]
    assert "stage_weights" not in plain["curves"] and record["layers"] == [2, 1]
    manifest = load("toy").manifest
    np.testing.assert_allclose(record["target"], manifest.targets[record["rows"]], atol=1e-4)
    assert np.allclose(np.sum(record["weights"], 1), 1, atol=1e-3)

    folder = export_run(layered_cache, db.path, run, tmp_path / "fused-model")
    assert json.loads((folder / "config.json").read_text())["head"]["fuse"] == "attention"
    model = load_model(folder)
    stored = np.concatenate([load_layer(layered_cache, "toy", "swin-t", n, "tiny") for n in (2, 1)], axis=1)
    with torch.no_grad():
        alpha = model.head.stage_weights(torch.from_numpy(stored[record["rows"]])[None])[0].numpy()
    np.testing.assert_allclose(alpha, record["weights"], atol=1e-4)  # the recorded weights are the exported head's
    expected = model.score_embeddings(torch.from_numpy(stored)).numpy()
    from_store, source = score_dataset(model, layered_cache, "toy", workers=0, progress=False)
    assert source == "store"
    np.testing.assert_allclose([s.score for s in from_store], expected, atol=1e-6)
    from iqa.heads.training.metrics import srcc

    test = np.array(record["rows"])
    assert float(srcc(torch.from_numpy(expected[test])[None], torch.from_numpy(manifest.targets[test])[None])[0]) == \
        pytest.approx(run["best_srcc"], abs=1e-5)  # scored from disk as recorded
    paths = [layered_cache / "images" / p for p in manifest.paths[:3]]
    from_files = score_files(model, paths, workers=0, progress=False)
    np.testing.assert_allclose([s.score for s in from_files], expected[:3], atol=2e-3)


def test_fuse_needs_two_stages_and_a_trained_head(layered_cache):
    common = ["head", "--backbone", "swin-t", "--cached", "--dataset", "toy", "--tag", "tiny", "--epochs", "1",
              "--seeds", "8", "--cache", str(layered_cache)]
    for extra, says in ((["--fuse", "attention"], "two or more"), (["--layer", "all", "--fuse", "attention"], "two or more"),
                        (["--layers", "2,1", "--fuse", "sum"], "unknown fusion"),
                        (["--layers", "2,1", "--fuse", "attention", "--act", "ridge"], "probes")):
        result = CliRunner().invoke(app, [*common, *extra])
        assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output, (extra, result.output)
    ok = CliRunner().invoke(app, [*common, "--layers", "2,1", "--fuse", "attention", "--json"])
    assert ok.exit_code == 0 and [(r["layers"], r["fuse"]) for r in json_runs(ok.output)] == [([2, 1], "attention")], ok.output


@pytest.fixture
def kadid_named_cache(tmp_path, one_thread):
    """A tiny set named like KADID-10k (I<ref>_<type>_<level>.png: types 01-03) with every Swin stage stored."""
    root = tmp_path / "images"
    root.mkdir()
    paths = [f"I{ref:02d}_{kind:02d}_{level:02d}.png" for ref in (1, 2) for kind in (1, 2, 3) for level in range(1, 6)]
    for i, path in enumerate(paths):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(root / path)
    scores = np.random.default_rng(1).uniform(1, 5, len(paths))
    write_manifest(Manifest("kadid10k", str(root), paths, scores, (scores - 1) / 4, "DMOS 1-5"), tmp_path)
    extract_dataset(ExtractRequest(tmp_path, "kadid10k", "swin-t", weights="tiny", dtype="float32", layers="all", **QUIET),
                    num_workers=0)
    return tmp_path


def test_report_shows_stage_weights_against_quality_and_stage_tsne_by_distortion_type(kadid_named_cache, tmp_path, monkeypatch):
    cache = kadid_named_cache
    configs = expand_grid([("kadid10k", "kadid10k")], "swin-t", head_choices(["baseline"], []), [8, 19],
                          layer_sets=[(2, 1)], fuse="attention", **SHARED)
    runs = run_grid(configs, lambda name: load_cached(cache, name, "swin-t", "tiny"), ResultsDB(tmp_path / "s.sqlite"),
                    progress=False)
    (name, fig), = stage_weight_figures(runs)
    assert name == "stage_weights_swin-t_tiny_kadid10k_baseline_2_1"
    first, second = fig.axes  # a panel per stage, in layer order: stage 1 then stage 2
    assert [first.get_title(), second.get_title()] == ["stage 1", "stage 2"]
    weights = np.concatenate([r["curves"]["stage_weights"]["weights"] for r in runs])[:, 1]  # stage 1: named second
    targets = np.concatenate([r["curves"]["stage_weights"]["target"] for r in runs])
    assert len(first.collections[0].get_offsets()) == len(weights) == 2 * 6  # 6 test images per seed, seeds pooled
    bucket = np.clip((targets * 5).astype(int), 0, 4)
    means = first.lines[0].get_ydata()
    for b in set(bucket):
        assert means[b] == pytest.approx(weights[bucket == b].mean())

    summary = write_report(runs, tmp_path / "report", partial(load_cached, cache), progress=False)
    names = {p.name for p in summary.figures}
    assert {"stage_weights_swin-t_tiny_kadid10k_baseline_2_1.png", "tsne_stages_swin-t_tiny_kadid10k.png"} <= names
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Stage weights against quality" in page and "t-SNE of stored layer features by distortion type" in page
    layers, rows = stage_points(list(range(1, 25)), np.arange(900) % 3 > 0)  # a 24-block store, a third failed
    assert len(layers) == 12 and layers[0] == 1 and layers[-1] == 24 and len(rows) == 600 and all(rows % 3 > 0)

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # scikit-learn missing: the report says how to get it
    without = ReportSummary(tmp_path / "report2")
    _stage_tsne_figures(runs, partial(load_cached, cache), tmp_path / "report2", False, without, _Page())
    assert not without.figures and any("pip install 'scikit-learn" in note for note in without.notes), without.notes


def test_distortion_types_from_kadid_and_demo_names():
    from iqa.data.demo import DISTORTIONS

    assert distortion_types("kadid10k", ["images/I01_05_03.png", "I81_25_01.png"]) == ["05 color shift", "25 contrast change"]
    demo = ["images/coffee.png", *(f"images/coffee_{d}_3.png" for d in DISTORTIONS)]
    assert distortion_types("demo", demo) == ["pristine", *DISTORTIONS] and len(DISTORTIONS) == 7
    assert distortion_types("clive", ["a.png"]) is None
    for dataset, bad in (("kadid10k", "I01_26_01.png"), ("kadid10k", "photo.png"), ("demo", "images/coffee_warp_2.png")):
        with pytest.raises(ValueError, match="not named like"):
            distortion_types(dataset, [bad])


def test_a_hyper_head_on_layers_reads_the_deepest_and_its_model_scores_as_recorded(layered_cache, tmp_path):
    from iqa.heads.training.grid import run_rows
    from iqa.heads.training.metrics import srcc
    from iqa.heads.report.scatter import kept_predictions
    from iqa.heads.report.tsne import retrained_features
    from iqa.heads.saved.weights import load_head, run_weights_path

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
