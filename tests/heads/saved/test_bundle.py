"""Model folders that travel: a local checkpoint is bundled (or named, never by a path of this machine),
and `iqa export --best` keeps the run a stated rule chooses."""

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import iqa
from iqa.cache.manifest import Manifest, write_manifest
from iqa.cache.results import ResultsDB, default_db
from iqa.cache.load import load_cached
from iqa.cli import app
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.heads.saved.export import best_run
from iqa.heads.saved.model import ModelFolderError
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from helpers import make_dataset


@pytest.fixture(scope="module")
def local_checkpoint_runs(tmp_path_factory):
    """A tiny CLIP saved as a local checkpoint, a toy set extracted with it, two heads x two seeds trained."""
    root = tmp_path_factory.mktemp("bundle")
    checkpoint = root / "my-clip"
    load_backbone(get_spec("clip"), weights="tiny").model.save_pretrained(checkpoint)
    cache = root / "cache"
    paths = make_dataset(cache, n=24)
    scores = np.linspace(1, 5, len(paths))  # make_dataset's targets are all zero: no MOS map fits them
    write_manifest(Manifest("toy", str(cache / "images"), paths, scores, (scores - 1) / 4, "MOS 1-5"), cache)
    extracted = CliRunner().invoke(app, ["extract", "--backbone", "clip", "--dataset", "toy", "--model", str(checkpoint),
                                         "--tag", "mine", "--cache", str(cache), "--workers", "0", "--device", "cpu"])
    assert extracted.exit_code == 0, extracted.output
    configs = expand_grid([("toy", "toy")], "clip", head_choices(["baseline", "sig"], []), [8, 19], epochs=2, tag="mine")
    runs = run_grid(configs, partial(load_cached, cache, backbone="clip", tag="mine"), ResultsDB(default_db(cache)), progress=False)
    return checkpoint, cache, runs


def export(cache, *args):
    return CliRunner().invoke(app, ["export", *map(str, args), "--cache", str(cache)])


def test_a_bundled_model_moved_elsewhere_loads_offline_without_its_checkpoint(local_checkpoint_runs, tmp_path, monkeypatch):
    checkpoint, cache, runs = local_checkpoint_runs
    key = runs[0]["key"]
    result = export(cache, key, "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    assert export(cache, key, "--out", tmp_path / "bundled", "--bundle").exit_code == 0
    for name in ("plain", "bundled"):
        text = (tmp_path / name / "config.json").read_text()
        assert str(checkpoint) not in text and str(tmp_path) not in text  # no path of this machine
    image = next((cache / "images").glob("*.png"))
    expected = iqa.load_model(tmp_path / "bundled").score(image)
    assert torch.allclose(expected, iqa.load_model(tmp_path / "plain", source=str(checkpoint)).score(image))

    moved_checkpoint = tmp_path / "elsewhere"
    shutil.move(checkpoint, moved_checkpoint)  # the original backbone folder is gone
    shutil.copytree(tmp_path / "bundled", tmp_path / "copied")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert torch.equal(iqa.load_model(tmp_path / "copied").score(image), expected)
        with pytest.raises(ModelFolderError, match="local checkpoint \\(my-clip\\).*--base.*--bundle"):
            iqa.load_model(tmp_path / "plain")
        scored = CliRunner().invoke(app, ["score", str(tmp_path / "plain"), str(image), "--device", "cpu"])
        assert scored.exit_code == 1 and scored.output.count("\n") == 1 and "--model" not in scored.output
    finally:
        shutil.move(moved_checkpoint, checkpoint)

    bundled = json.loads((tmp_path / "copied" / "config.json").read_text())["backbone"]["bundled"]
    weights = next(name for name in bundled["files"] if name.endswith(".safetensors"))
    (tmp_path / "copied" / weights).write_bytes(b"altered")
    with pytest.raises(ModelFolderError, match="does not match the checksum"):
        iqa.load_model(tmp_path / "copied")


def test_export_best_keeps_the_run_its_stated_rule_names(local_checkpoint_runs, tmp_path):
    _, cache, runs = local_checkpoint_runs
    top = max(runs, key=lambda r: r["best_srcc"])
    chosen, rule = best_run(runs, "toy")
    assert chosen["key"] == top["key"] and "highest test SRCC" in rule and "optimistic" in rule
    sig = max((r for r in runs if r["head"] == "sig"), key=lambda r: r["best_srcc"])
    assert best_run(runs, "toy", head="sig")[0]["key"] == sig["key"]
    validated = [{**r, "curves": {**r["curves"], "val_srcc": [0.1, 0.9 if r is runs[2] else 0.2]}, "best_epoch": 2} for r in runs]
    assert best_run(validated, "toy")[0]["key"] == runs[2]["key"]  # validation decides where every run has it

    result = export(cache, "--best", "--dataset", "toy", "--head", "sig", "--out", tmp_path / "best")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "best" / "config.json").read_text())["run_key"] == sig["key"]
    assert export(cache, "--best", "--dataset", "nope", "--out", tmp_path / "x").exit_code == 1
    assert export(cache, "--best", "--out", tmp_path / "y").output.startswith("error: --best needs --dataset")


def test_a_local_checkpoint_is_named_for_itself_and_its_own_resolution_is_announced(tmp_path):
    import transformers

    checkpoint = tmp_path / "dinov2 small-224"
    config = transformers.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       patch_size=8, image_size=224)
    transformers.Dinov2Model(config).save_pretrained(checkpoint)
    make_dataset(tmp_path, n=2)
    result = CliRunner().invoke(app, ["extract", "--backbone", "dinov2", "--dataset", "toy", "--model", str(checkpoint),
                                      "--cache", str(tmp_path), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "dinov2@dinov2-small-224.zarr" in result.output  # its own store, not the registry model's dinov2.zarr
    (note,) = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert "224 px" in note and "520 px" in note and "--resolution 224" in note
    assert not list(tmp_path.glob("**/dinov2.zarr"))
    store = json.loads(next(tmp_path.glob("**/dinov2@dinov2-small-224.zarr/zarr.json")).read_text())["attributes"]
    assert (store["fingerprint"]["resolution"], store["checkpoint_resolution"]) == (520, 224)  # both recorded


def test_the_reports_compute_profile_counts_the_checkpoint_that_ran(local_checkpoint_runs, tmp_path):
    from iqa.heads.report.build import write_report

    checkpoint, cache, runs = local_checkpoint_runs
    ran = load_backbone(get_spec("clip"), source=str(checkpoint))
    write_report(runs, tmp_path / "report", lambda d, b, t: load_cached(cache, d, b, t), ["clip"], tsne=False,
                 progress=False)
    rows = [line.split(" | ") for line in (tmp_path / "report" / "profile.md").read_text().splitlines()
            if line.startswith("| clip")]
    assert rows and all(row[0] == "| clip@mine" for row in rows)  # the store's tag names the model that ran
    million = sum(p.numel() for p in ran.parameters()) / 1e6
    for row in rows:  # params column: backbone + head; the tiny checkpoint, not the 400 M registry model
        assert float(row[3]) == pytest.approx(million + int(row[6].replace(",", "")) / 1e6, abs=0.006)
        assert row[2] == f"{ran.spec.resolution}x{ran.spec.resolution}" and "local checkpoint my-clip" in row[9]
