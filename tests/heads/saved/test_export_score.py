"""Runs keep their weights; `iqa export` folders score images from disk as the run predicted them."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import iqa
from iqa.cache.load import load_cached
from iqa.cli import app
from iqa.data.demo import DEMO_DIR, LABELS_FILE, make_demo
from iqa.data.prepare import prepare_dataset
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.training.grid import expand_grid, head_choices, run_grid, run_rows
from iqa.heads.training.metrics import srcc
from iqa.cache.results import ResultsDB, default_db
from iqa.heads.saved.export import export_run
from iqa.heads.saved.weights import load_head, run_weights_path


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The demo set, its manifest and its NSS store."""
    cache = tmp_path_factory.mktemp("cache")
    make_demo(cache / DEMO_DIR, photos=["astronaut", "chelsea", "coffee", "rocket", "camera", "moon"])  # a fast subset
    prepare_dataset("csv", cache / DEMO_DIR, cache, labels=LABELS_FILE, image_col="image", score_col="score",
                    score_range="0,1", group_col="ref", name="demo")
    assert extract_dataset(ExtractRequest(cache, "demo", "nss", progress=False)).ok
    return cache


def train(cache, select="test", epochs=6):
    configs = expand_grid([("demo", "demo")], "nss", head_choices(["gated"], []), [8], epochs=epochs,
                          split_by="group", select=select)
    (record,) = run_grid(configs, partial(load_cached, cache, backbone="nss"), ResultsDB(default_db(cache)), progress=False)
    return configs[0], record


def test_exported_gated_run_scores_disk_images_as_the_head_predicted(demo_cache, tmp_path):
    config, run = train(demo_cache)
    cached = load_cached(demo_cache, "demo", "nss")
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", run["key"][:10], "--out", str(out), "--cache", str(demo_cache)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}

    _, test_rows = run_rows(config, cached, cached)
    paths = [f"{cached.manifest.image_root}/{cached.manifest.paths[i]}" for i in test_rows]
    scored = CliRunner().invoke(app, ["score", str(out), *paths, "--json", "--workers", "0"])
    assert scored.exit_code == 0, scored.output
    rows = [json.loads(line) for line in scored.output.splitlines() if line.startswith("{")]
    assert [r["path"] for r in rows] == paths
    scores = torch.tensor([r["score"] for r in rows])

    head, _ = load_head(run_weights_path(default_db(demo_cache), run["key"]))
    with torch.no_grad():
        expected = head(torch.as_tensor(cached.embeddings[test_rows], dtype=torch.float32)[None])[0]
    assert torch.allclose(scores, expected, atol=1e-4)
    targets = torch.as_tensor(cached.manifest.targets[test_rows], dtype=torch.float32)
    assert abs(float(srcc(expected[None], targets[None])[0]) - run["best_srcc"]) < 1e-4  # the kept epoch's weights
    # from disk, predictions differ at float rounding (other batch shapes), which can swap a near-tie
    assert abs(float(srcc(scores[None], targets[None])[0]) - run["best_srcc"]) < 5e-3
    assert np.allclose([r["mos"] for r in rows], scores.numpy(), atol=1e-6)  # demo scores are already in [0, 1]

    model = iqa.load_model(out)  # the Python API gives the same numbers
    assert torch.allclose(model.score(paths[:3]), expected[:3], atol=1e-4)


def test_val_selection_ignores_test_labels(demo_cache, tmp_path):
    config, run = train(demo_cache, select="val")
    cached = load_cached(demo_cache, "demo", "nss")
    assert "val_srcc" in run["curves"]
    assert run["best_epoch"] == int(np.argmax(run["curves"]["val_srcc"])) + 1
    weights = load_head(run_weights_path(default_db(demo_cache), run["key"]))[0].state_dict()

    # The same run with the test labels shuffled: same epoch, same weights.
    from iqa.heads.training.grid import stack_inputs
    from iqa.heads.training.trainer import train_stack_model

    _, test_rows = run_rows(config, cached, cached)
    shuffled = cached.manifest.targets.copy()
    shuffled[test_rows] = np.random.default_rng(0).permutation(shuffled[test_rows])
    data, members = stack_inputs([config], [run_rows(config, cached, cached)], cached, cached)
    data.y_test = shuffled
    _, (again,) = train_stack_model(data, members, "gated", "gated", None, config.epochs, config.batch_size,
                                    config.micro_batch, select="val")
    assert again.best_epoch == run["best_epoch"]
    assert all(torch.equal(again.weights[k], weights[k]) for k in weights)


def test_bad_images_are_reported_and_skipped_and_altered_weights_refused(demo_cache, tmp_path):
    _, run = train(demo_cache)
    out = tmp_path / "model"
    assert CliRunner().invoke(app, ["export", run["key"], "--out", str(out), "--cache", str(demo_cache)]).exit_code == 0
    unwritable = CliRunner().invoke(app, ["export", run["key"], "--out", "/proc/iqa-model", "--cache", str(demo_cache)])
    assert unwritable.exit_code == 1 and unwritable.stderr.startswith("error: ") and "/proc/iqa-model" in unwritable.stderr
    assert len(unwritable.stderr.strip().splitlines()) == 1
    folder = tmp_path / "images"
    folder.mkdir()
    cached = load_cached(demo_cache, "demo", "nss")
    (folder / "good.png").write_bytes((demo_cache / "demo" / "..").resolve().joinpath(
        cached.manifest.image_root, cached.manifest.paths[0]).read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    csv = tmp_path / "scores.csv"
    failed = CliRunner().invoke(app, ["score", str(out), str(folder), "--out", str(csv), "--workers", "0"])
    assert failed.exit_code == 1 and "broken.png" in failed.output and "not an image" in failed.output
    lines = csv.read_text().splitlines()
    assert lines[0] == "path,score,mos" and any("good.png" in l for l in lines[1:])
    skipped = CliRunner().invoke(app, ["score", str(out), str(folder), "--skip-bad", "--workers", "0"])
    assert skipped.exit_code == 0, skipped.output

    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    refused = CliRunner().invoke(app, ["score", str(out), str(folder)])
    assert refused.exit_code != 0 and refused.output.count("\n") == 1 and "model.safetensors" in refused.output
    (out / "model.safetensors").unlink()
    refused = CliRunner().invoke(app, ["score", str(out), str(folder)])
    assert refused.exit_code != 0 and "model.safetensors is missing" in refused.output


def test_results_runs_lists_keys_metrics_and_kept_weights(demo_cache):
    _, run = train(demo_cache)
    listed = CliRunner().invoke(app, ["results", "--runs", "--json", "--cache", str(demo_cache)])
    assert listed.exit_code == 0, listed.output
    rows = {r["key"]: r for r in map(json.loads, listed.output.splitlines())}
    assert rows[run["key"]]["weights"] is True and rows[run["key"]]["best_srcc"] == run["best_srcc"]
    table = CliRunner().invoke(app, ["results", "--runs", "--cache", str(demo_cache)])
    assert run["key"][:12] in table.output and "yes" in table.output


def test_head_command_refuses_an_unknown_selection_rule(demo_cache):
    result = CliRunner().invoke(app, ["head", "--cached", "--dataset", "demo", "--backbone", "nss", "--select", "best",
                                      "--cache", str(demo_cache)])
    assert result.exit_code == 1 and "unknown selection rule 'best'" in result.output


@pytest.mark.parametrize("untrained, l2norm", [("tiny", False), ("random-init", False), ("tiny", True)])
def test_a_run_on_an_untrained_transformer_store_exports_and_scores_from_disk(tmp_path, untrained, l2norm, monkeypatch):
    """The backbone rebuilds deterministically from its config: disk scores equal the head on the stored
    rows (scaled to unit length for an --l2norm run)."""
    from iqa.extract import registry
    from helpers import toy_dataset

    if untrained == "random-init":  # the full-size architecture is minutes on a CPU: shrink its config, not the code path
        spec = registry.get_spec("dinov2")
        monkeypatch.setitem(registry.BACKBONES, "dinov2", registry.replace(
            spec, config=spec.tiny_config, dim=spec.tiny_config["hidden_size"], resolution=registry.TINY_RESOLUTION))
    paths = toy_dataset(tmp_path, n=24)
    request = ExtractRequest(tmp_path, "toy", "dinov2", weights=untrained,
                             dtype="float32", store_dtype="float32", progress=False)
    extract_dataset(request, num_workers=0)
    load = partial(load_cached, tmp_path, backbone="dinov2", tag=untrained)
    configs = expand_grid([("toy", "toy")], "dinov2", head_choices(["sig"], []), [8], epochs=3, tag=untrained,
                          l2norm=l2norm)
    (run,) = run_grid(configs, load, ResultsDB(default_db(tmp_path)), progress=False)
    out = tmp_path / "model"
    assert CliRunner().invoke(app, ["export", run["key"], "--out", str(out), "--cache", str(tmp_path)]).exit_code == 0
    assert "rebuilds deterministically" in (out / "README.md").read_text()

    model = iqa.load_model(out)
    scores = model.score([tmp_path / "images" / p for p in paths])
    head, _ = load_head(run_weights_path(default_db(tmp_path), run["key"]))
    stored = torch.as_tensor(load("toy").embeddings)
    with torch.no_grad():
        expected = head((torch.nn.functional.normalize(stored, dim=1) if l2norm else stored)[None])[0]
    assert torch.allclose(scores, expected, atol=1e-5)


def test_score_dataset_reuses_a_matching_store_else_reads_the_images(demo_cache, tmp_path):
    import shutil

    _, run = train(demo_cache)
    out = tmp_path / "model"
    assert CliRunner().invoke(app, ["export", run["key"], "--out", str(out), "--cache", str(demo_cache)]).exit_code == 0
    command = ["score", str(out), "--dataset", "demo", "--json", "--workers", "0", "--cache"]
    from_store = CliRunner().invoke(app, [*command, str(demo_cache)])
    assert from_store.exit_code == 0 and "demo: scored from its embedding store" in from_store.stderr
    scores = torch.tensor([json.loads(line)["score"] for line in from_store.stdout.splitlines()])
    cached = load_cached(demo_cache, "demo", "nss")
    head, _ = load_head(run_weights_path(default_db(demo_cache), run["key"]))
    with torch.no_grad():
        assert torch.equal(scores, head(torch.as_tensor(cached.embeddings)[None])[0])

    elsewhere = tmp_path / "cache"  # the same manifest, no store: computed from the images
    shutil.copytree(demo_cache / "demo", elsewhere / "demo", ignore=shutil.ignore_patterns("*.zarr"))
    shutil.copytree(demo_cache / "demo-src", elsewhere / "demo-src")  # images inside a cache travel with it
    from_images = CliRunner().invoke(app, [*command, str(elsewhere)])
    assert from_images.exit_code == 0 and "scored from its images" in from_images.stderr, from_images.output
    computed = torch.tensor([json.loads(line)["score"] for line in from_images.stdout.splitlines()])
    assert torch.allclose(computed, scores, atol=5e-3)  # the store holds float16
    neither = CliRunner().invoke(app, ["score", str(out)])
    assert neither.exit_code == 1 and "one of the two" in neither.stderr


def test_probes_and_standardized_heads_export_and_score_from_disk_as_recorded(demo_cache, tmp_path):
    """Ridge, kNN and a --standardize MLP head: the model folder carries the input statistics."""
    configs = [*expand_grid([("demo", "demo")], "nss", head_choices(["ridge", "knn"], []), [8], split_by="group"),
               *expand_grid([("demo", "demo")], "nss", head_choices(["baseline"], []), [8], epochs=2, split_by="group",
                            standardize=True)]
    records = run_grid(configs, partial(load_cached, demo_cache, backbone="nss"), ResultsDB(default_db(demo_cache)),
                       progress=False)
    cached = load_cached(demo_cache, "demo", "nss")
    for config, run in zip(configs, records):
        out = tmp_path / run["head"]
        exported = CliRunner().invoke(app, ["export", run["key"], "--out", str(out), "--cache", str(demo_cache)])
        assert exported.exit_code == 0, exported.output
        _, test_rows = run_rows(config, cached, cached)
        model = iqa.load_model(out)
        expected = model.score_embeddings(torch.as_tensor(cached.embeddings[test_rows]))
        targets = torch.as_tensor(cached.manifest.targets[test_rows])
        assert float(srcc(expected[None], targets[None])[0]) == pytest.approx(run["best_srcc"], abs=1e-4)
        paths = [f"{cached.manifest.image_root}/{cached.manifest.paths[i]}" for i in test_rows[:3]]
        # decoded and embedded from disk: the stored embeddings are those, rounded to float16
        assert torch.allclose(model.score_embeddings(model.embed(paths).half()), expected[:3], atol=1e-5)
        assert torch.allclose(model.score(paths), expected[:3], atol=2e-3)
    assert "probe fitted in closed form" in (tmp_path / "ridge" / "README.md").read_text()

    # a standardized head saved before its statistics were kept is refused, not scored on raw features
    from safetensors.torch import load_file, save_file

    weights = run_weights_path(default_db(demo_cache), records[-1]["key"])
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("input_")}
    save_file(state, str(weights), metadata={"config": json.dumps(records[-1] | {"curves": None})})
    refused = CliRunner().invoke(app, ["export", records[-1]["key"], "--out", str(tmp_path / "old"), "--cache", str(demo_cache)])
    assert refused.exit_code == 1 and "without its input statistics" in refused.output


def test_head_command_passes_loss_optimizer_and_standardize_to_the_stored_runs(demo_cache):
    args = ["head", "--cached", "--dataset", "demo", "--backbone", "nss", "--seeds", "8", "--epochs", "1",
            "--split-by", "group", "--cache", str(demo_cache)]
    result = CliRunner().invoke(app, [*args, "--act", "baseline,ridge,knn", "--loss", "l1", "--optimizer", "adamw",
                                      "--weight-decay", "0.01"])
    assert result.exit_code == 0, result.output
    assert "ridge" in result.output and "knn" in result.output
    runs = ResultsDB(default_db(demo_cache)).runs()
    chosen = {r["head"]: r for r in runs if r["loss"] == "l1" and r["epochs"] == 1}
    assert {h: (r["standardize"], r["optimizer"], r["weight_decay"]) for h, r in chosen.items()} == {
        "baseline": (False, "adamw", 0.01), "ridge": (True, "adamw", 0.01), "knn": (True, "adamw", 0.01)}
    result = CliRunner().invoke(app, [*args, "--act", "ridge", "--no-standardize"])
    assert result.exit_code == 0, result.output
    assert any(r["head"] == "ridge" and r["standardize"] is False for r in ResultsDB(default_db(demo_cache)).runs())
    for bad, why in ((["--loss", "huber"], "unknown loss 'huber'"), (["--optimizer", "sgd"], "unknown optimizer"),
                     (["--act", "ridge", "--dropout", "layers", "--keep", "0.5"], "take none"),
                     (["--split-by", "official"], "published split")):
        refused = CliRunner().invoke(app, [*args, *bad])
        assert refused.exit_code == 1 and why in refused.output and "Traceback" not in refused.output, refused.output


def test_a_model_without_spatial_features_gets_a_note_on_the_explanations_page(demo_cache, tmp_path):
    from iqa.data.gridpg import make_gridpg
    from iqa.heads.report.explanations import load_explained

    _, run = train(demo_cache, epochs=1)
    folder = export_run(demo_cache, default_db(demo_cache), run, tmp_path / "nss-model")
    grids = make_gridpg(tmp_path / "grids", grids=2, cell_side=32).parent
    chosen = load_explained([folder], demo_cache, grids)
    assert chosen.subjects == [] and len(chosen.notes) == 1
    assert chosen.notes[0].startswith("nss-model: not explained") and "no spatial features" in chosen.notes[0]


def test_every_input_a_user_holds_gives_the_same_score_and_the_model_reads_as_pyiqa_models_do(demo_cache, tmp_path):
    from PIL import Image

    _, run = train(demo_cache, epochs=2)
    out = export_run(demo_cache, default_db(demo_cache), run, tmp_path / "model")
    model = iqa.load_model(out)
    cached = load_cached(demo_cache, "demo", "nss")
    path = Path(cached.manifest.image_root) / cached.manifest.paths[3]
    alone = tmp_path / "one"
    alone.mkdir()
    (alone / path.name).write_bytes(path.read_bytes())
    picture = Image.open(path)
    array = np.asarray(picture.convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255  # torchvision's ToTensor layout
    expected = model.score([path])
    assert expected.shape == (1,)
    for given in (str(path), path, alone, [str(path)], picture, array, array[None], tensor, tensor[None], [picture]):
        assert torch.equal(model(given), expected), type(given)
    assert torch.allclose(model.score([path, picture]), expected.repeat(2), atol=1e-6)  # a batch of two: rounding only

    assert model.lower_better is False and model.score_range == (0.0, 1.0)
    assert model.mos_range == pytest.approx(tuple(model.to_mos(np.array([0.0, 1.0]))))
    assert isinstance(model.to_mos(expected), torch.Tensor) and isinstance(model.to_mos(expected.numpy()), np.ndarray)
    for bad, error in ((123, TypeError), (tensor * 255, ValueError), (array.astype(np.float32), ValueError)):
        with pytest.raises(error):
            model.score(bad)


def test_save_pretrained_and_from_pretrained_round_trip_and_a_hub_id_offline_is_one_clear_error(demo_cache, tmp_path, monkeypatch):
    from iqa.heads.saved.model import IqaModel, ModelFolderError

    _, run = train(demo_cache, epochs=2)
    model = iqa.load_model(export_run(demo_cache, default_db(demo_cache), run, tmp_path / "model"))
    model.save_pretrained(tmp_path / "saved")
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= saved
    card = (tmp_path / "saved" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: iqa" in card and "model-index" in card
    assert f"value: {round(run['best_srcc'], 4)}" in card  # the test metric with its value
    again = IqaModel.from_pretrained(tmp_path / "saved")
    cached = load_cached(demo_cache, "demo", "nss")
    images = [Path(cached.manifest.image_root) / p for p in cached.manifest.paths[:2]]
    assert torch.equal(again.score(images), model.score(images)) and again.config == model.config
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "saved")  # a folder with files in it is never written over

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFolderError, match="not a model folder here, and the Hugging Face Hub cannot give it"):
        IqaModel.from_pretrained("someone/no-such-iqa-model")
