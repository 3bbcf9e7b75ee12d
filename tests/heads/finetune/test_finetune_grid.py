"""Fine-tuning grids: one `iqa finetune` call over backbones x datasets x heads x seeds x modes with a
cross-dataset test set; a SIGKILLed grid run again equals an uninterrupted one; Table 3 fills from
tuned cross rows; a run alone equals the same run in a grid; `--select val` never looks at test labels."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import torchvision_stub  # noqa: F401 (timm imports torchvision)
from iqa.cache.manifest import Manifest, manifest_path, write_manifest
from iqa.cache.results import ResultsDB
from iqa.cli import app
from iqa.data.splits import split_indices
from iqa.heads.finetune.config import TuneRun, expand_finetune_grid, finetune_config
from iqa.heads.finetune.grid import finetune_grid
from iqa.heads.finetune.loop import Runtime, finetune
from iqa.heads.saved.weights import run_weights_path

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
DATASETS = ("koniq10k", "clive")  # named as the paper's, so Table 3's columns koniq10k->clive, clive->koniq10k fill
GRID = ["--backbone", "dinov2,siglip2", "--dataset", ",".join(DATASETS), "--head", "baseline,gated", "--seeds", "8,19",
        "--mode", "lora,frozen", "--test", ",".join(DATASETS), "--epochs", "2", "--accumulate", "2", "--lr", "1e-3", "--weights", "tiny",
        "--workers", "0", "--dtype", "float32"]
RUNS = 2 * 2 * 2 * 2 * 2  # each with its own record and one cross record


def iqa(*args):
    return runner.invoke(app, [str(a) for a in args])


def bright_images(folder: Path, name: str, n: int, seed: int, shuffle_test_of: int | None = None,
                  label_noise: float = 0.0) -> Manifest:
    """n noisy grey 24-px images whose brightness is their score (plus `label_noise`); `shuffle_test_of` a seed: the targets of
    that seed's test rows in reverse rank order (the images stay)."""
    rng = np.random.default_rng(seed)
    targets = rng.uniform(0.1, 0.9, n)
    root = folder / name
    root.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(targets):
        pixels = np.clip(b * 255 + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"im{i:02d}.png")
    paths = [f"im{i:02d}.png" for i in range(n)]
    targets = targets + rng.normal(0, label_noise, n)  # scores the images only partly explain
    if shuffle_test_of is not None:
        _, test_rows = split_indices(paths, shuffle_test_of)
        test = targets[test_rows]
        targets[test_rows] = test.max() + test.min() - test  # mirrored: every rank reversed
    return Manifest(name, str(root), paths, targets, targets, "brightness")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The two datasets' images and manifests, made once; `new_cache` copies the manifests byte for byte,
    so every cache of this module keys its runs alike."""
    folder = tmp_path_factory.mktemp("images")
    for i, name in enumerate(DATASETS):
        write_manifest(bright_images(folder, name, 10, i), folder / "manifests")
    return folder


def new_cache(images: Path, cache: Path) -> Path:
    for name in DATASETS:
        manifest_path(cache, name).parent.mkdir(parents=True)
        shutil.copyfile(manifest_path(images / "manifests", name), manifest_path(cache, name))
    return cache


@pytest.fixture(scope="module")
def grid(images, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The whole grid in one call, uninterrupted: (cache, its --json lines)."""
    cache = new_cache(images, tmp_path_factory.mktemp("grid"))
    started, threads = time.monotonic(), torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread`, which a module fixture runs before
    result = iqa("finetune", *GRID, "--json", "--cache", cache)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    print(f"grid of {RUNS} runs: {time.monotonic() - started:.1f} s")
    return cache, [json.loads(line) for line in result.stdout.splitlines()]


def stored(cache: Path) -> dict[str, dict]:
    return {r["key"]: r for r in ResultsDB(cache / "results.sqlite").runs()}


def test_one_call_trains_the_whole_grid_with_cross_records(grid):
    cache, lines = grid
    assert len(lines) == 2 * RUNS and len({line["key"] for line in lines}) == 2 * RUNS
    records = stored(cache)
    assert set(records) == {line["key"] for line in lines}
    pairs = {(r["train_dataset"], r["test_dataset"]) for r in records.values()}
    assert pairs == {("koniq10k", "koniq10k"), ("clive", "clive"), ("koniq10k", "clive"), ("clive", "koniq10k")}
    assert {(r["backbone"], r["regime"], r["head"], r["seed"]) for r in records.values()} == {
        (b, m, h, s) for b in ("dinov2", "siglip2") for m in ("lora", "frozen") for h in ("baseline", "gated") for s in (8, 19)}
    for r in records.values():
        assert r["status"] == "done" and len(r["curves"]["srcc"]) == 2
        own = r["train_dataset"] == r["test_dataset"]
        assert run_weights_path(cache / "results.sqlite", r["key"]).is_file() == own  # weights kept under the run's key
        if r["head"] == "gated":  # gate vectors per epoch, as cached runs record them
            assert len(r["curves"]["g_act1"]) == 2 and len(r["curves"]["g_act1"][0]) == 512 and r["gates"]
    # a cross record shares the run's training (loss, lr, gates) and scores all 10 images of the other set
    own = next(r for r in records.values() if r["train_dataset"] == r["test_dataset"] == "clive" and r["head"] == "gated")
    cross = next(r for r in records.values() if r["test_dataset"] == "koniq10k" and r["train_dataset"] == "clive"
                 and all(r[k] == own[k] for k in ("backbone", "regime", "head", "seed")))
    assert cross["curves"]["train_loss"] == own["curves"]["train_loss"] and cross["curves"]["g_act2"] == own["curves"]["g_act2"]
    assert cross["curves"]["srcc"] != own["curves"]["srcc"]
    # rerun: everything is finished, nothing trains, the same lines come back
    again = iqa("finetune", *GRID, "--json", "--cache", cache)
    assert again.exit_code == 0 and [json.loads(line) for line in again.stdout.splitlines()] == lines


def test_tuned_cross_rows_fill_the_cross_table_table_3_and_the_gate_figures(grid):
    cache, _ = grid
    cross = iqa("results", "--layout", "cross", "--cache", cache)
    assert cross.exit_code == 0, cross.output
    header = "| backbone | head | lora_rank | regime | clive->koniq10k SRCC | clive->koniq10k PLCC | koniq10k->clive SRCC |"
    assert header in cross.stdout
    rows = [line for line in cross.stdout.splitlines() if line.startswith(("| dinov2 |", "| siglip2 |"))]
    assert len(rows) == 8 and "| siglip2 | gated | 4 | lora |" in cross.stdout and "| siglip2 | gated |  | frozen |" in cross.stdout
    assert all(line.count(" ± ") == 4 for line in rows)  # both cross pairs, SRCC and PLCC, over 2 seeds
    report = iqa("report", "--paper", "--no-tsne", "--out", cache / "report", "--cache", cache)
    assert report.exit_code == 0, report.output
    assert "beside the paper: Table 3: cross-dataset SRCC (train->test): 4 cells compared" in report.stdout
    figures = cache / "report" / "figures"  # Fig. S7 for a LoRA run, its own split and across sets
    assert (figures / "gates_epochs_siglip2_clive_lora_gated.png").is_file()
    assert (figures / "gates_epochs_siglip2_clive_to_koniq10k_lora_gated.png").is_file()
    paper = iqa("results", "--paper", "--cache", cache)
    table3 = paper.stdout[paper.stdout.index("Table 3"):paper.stdout.index("Table 4")]
    filled = [line for line in table3.splitlines() if line.startswith(("| B |", "| B_Gated"))]
    assert len(filled) == 2, table3
    for line in filled:  # the two columns it can match have a measured value, the flive ones are not run
        cells = line.split("|")[2:-1]
        assert sum(" / 0." in c or " / -0." in c for c in cells) == 2 and sum("not run" in c for c in cells) == 3, line


def kept_tensors(cache: Path, key: str) -> dict[str, torch.Tensor]:
    folder = run_weights_path(cache / "results.sqlite", key).parent
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        out |= {f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()}
    return out


def assert_same_records(whole: Path, part: Path) -> None:
    """Every record of `part` is in `whole`, with the same metrics, curves and kept weights."""
    b = stored(part)
    a = {k: v for k, v in stored(whole).items() if k in b}
    assert a.keys() == b.keys()
    outcome = ("status", "best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc", "curves", "gates")
    for key in a:
        assert {k: a[key][k] for k in outcome} == {k: b[key][k] for k in outcome}, key
        if a[key]["train_dataset"] == a[key]["test_dataset"]:
            ta, tb = kept_tensors(whole, key), kept_tensors(part, key)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_sigkilled_grid_run_again_equals_an_uninterrupted_one(grid, images, tmp_path):
    """A part of the grid (dinov2, LoRA: 8 runs, 16 records), killed in its third run or later."""
    cache = new_cache(images, tmp_path / "cache")
    part = {"--backbone": "dinov2", "--mode": "lora"}
    args = ["finetune", *[part.get(previous, a) for previous, a in zip([None, *GRID], GRID)], "--cache", str(cache)]
    script = f"import sys; sys.argv = ['iqa', *{args!r}]; from iqa.cli import app; app()"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    db, deadline = cache / "results.sqlite", time.monotonic() + 120
    checkpoints = cache / "runs"

    def recorded() -> int:
        try:
            with sqlite3.connect(db) as c:
                return c.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        except sqlite3.Error:
            return 0

    # killed inside a run: some runs recorded, the next one checkpointed after its first epoch
    while time.monotonic() < deadline and child.poll() is None and (
            recorded() < 6 or len(list(checkpoints.rglob("checkpoint.pt"))) * 2 <= recorded()):
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = recorded()
    assert 6 <= done < 2 * RUNS, "the grid was not killed mid-run"
    result = iqa(*args)
    assert result.exit_code == 0, result.output
    assert_same_records(grid[0], cache)


def test_a_run_alone_equals_the_same_run_in_a_grid(grid, images, tmp_path):
    cache = new_cache(images, tmp_path / "cache")
    config = finetune_config("clive", "siglip2", "gated", "lora", 19, epochs=2, accumulate=2, lr=1e-3, weights="tiny")
    alone = finetune(cache, config, dtype="float32", num_workers=0, progress=False, tests=("koniq10k",))
    in_grid = stored(grid[0])
    assert [key for key, *_ in alone.rows] == [alone.key, alone.rows[1][0]]
    for key, _, _, result in alone.rows:
        assert result.curves == in_grid[key]["curves"] and result.best_srcc == in_grid[key]["best_srcc"]
    assert kept_tensors(cache, alone.key).keys() == kept_tensors(grid[0], alone.key).keys()
    assert all(torch.equal(v, kept_tensors(grid[0], alone.key)[k]) for k, v in kept_tensors(cache, alone.key).items())


def test_select_val_never_looks_at_the_test_labels(tmp_path):
    """Two sets, the same images; one with its test rows' targets in reverse rank order: selection by a
    validation part of the training split keeps the same epoch and the same weights in both, where
    selection by test SRCC would not."""
    options = dict(epochs=4, lr=1e-2, weights="tiny", select="val", val_fraction=0.25)
    kept = []
    for label, shuffled in (("plain", None), ("shuffled", 8)):
        cache = tmp_path / label
        write_manifest(bright_images(tmp_path / f"images-{label}", "koniq10k", 24, 0, shuffled, label_noise=0.2), cache)
        run = finetune(cache, finetune_config("koniq10k", "dinov2", "baseline", "lora", 8, **options), dtype="float32",
                       num_workers=0, progress=False)
        kept.append((run, kept_tensors(cache, run.key)))
    (plain, plain_weights), (shuffled, shuffled_weights) = kept
    assert plain.result.curves["val_srcc"] == shuffled.result.curves["val_srcc"]
    assert plain.result.curves["srcc"] == pytest.approx([-s for s in shuffled.result.curves["srcc"]])
    assert plain.result.best_epoch == shuffled.result.best_epoch == 1 + int(np.argmax(plain.result.curves["val_srcc"]))
    assert 1 + int(np.argmax(shuffled.result.curves["srcc"])) != shuffled.result.best_epoch  # test selection would move
    assert plain_weights.keys() == shuffled_weights.keys()
    assert all(torch.equal(v, shuffled_weights[k]) for k, v in plain_weights.items())
    assert plain.config["select"] == "val" and plain.result.best_srcc == -shuffled.result.best_srcc


def test_lora_alpha_is_its_own_option_and_in_the_key_only_when_it_changes_the_run():
    default = finetune_config("clive", "siglip2", lora_rank=4)
    assert finetune_config("clive", "siglip2", lora_rank=4, lora_alpha=8).to_dict() == default.to_dict()
    fixed = finetune_config("clive", "siglip2", lora_rank=8, lora_alpha=8)
    assert fixed.lora_alpha == 8.0 and "lora_alpha" not in default.to_dict()
    runs = expand_finetune_grid(["siglip2"], ["clive"], ["sig"], [8], ["lora", "frozen"], [2, 4], [8.0], tests=["clive", "kadid10k"])
    # rank and alpha mean nothing outside lora: one frozen run; the training set is not its own cross set
    assert [(r.config.regime, r.config.lora_rank, r.config.lora_alpha) for r in runs] == [
        ("lora", 2, 8.0), ("lora", 4, None), ("frozen", None, None)]
    assert all(r.tests == ("kadid10k",) for r in runs)


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "4,x"], "--lora-rank takes comma-separated numbers"),
    (["--mode", "lora,partial"], "--mode must be one of lora, full, frozen"),
    (["--keep", "0.5"], "--keep sets dropout's keep probability"),
    (["--test", "missing"], "no manifest for dataset 'missing'"),
    (["--backbone", "dinov2,nss"], "nss computes fixed features"),
    (["--seeds", "8,19", "--run-dir", "somewhere"], "--run-dir is the folder of one run; this grid has 2"),
])
def test_bad_grid_input_fails_in_one_line_before_any_run(images, tmp_path, args, message):
    cache = new_cache(images, tmp_path / "cache")
    options = {"--backbone": "dinov2", "--dataset": "clive", "--weights": "tiny", "--workers": "0", "--cache": cache}
    for flag, value in zip(args[::2], args[1::2]):
        options[flag] = value
    result = iqa("finetune", *[a for flag, value in options.items() for a in ((flag,) if value is None else (flag, value))])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (cache / "runs").exists()


def test_masking_and_dropout_train_inside_fine_tuning_and_resume_exactly(tmp_path):
    """The cached heads' masking and dropout in a tuned head; the dropout generators' state is checkpointed,
    so a run killed after epoch 1 ends where an uninterrupted one does."""
    from helpers import bright_dataset, straight_and_resumed
    from iqa.extract.checkpoint import load_checkpoint

    bright_dataset(tmp_path, n=20)
    options = dict(mode="lora", epochs=2, batch_size=2, accumulate=2, mask_k=50.0, dropout="layers", keep=0.5,
                   head="sigmoid+gelu", db=ResultsDB(tmp_path / "a.sqlite"))
    straight, resumed = straight_and_resumed(tmp_path, "dinov2", **options)
    assert resumed.epochs_trained == 1 and resumed.result == straight.result and resumed.key == straight.key
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert len(a["dropout_rng"]) == 1 and torch.equal(a["dropout_rng"][0], b["dropout_rng"][0])
    assert float(a["head"]["mask_k"][0]) == 50.0 and straight.config["keep"] == 0.5


def test_the_ray_engine_equals_the_local_one_and_reports_a_failing_run(images, grid, tmp_path):
    """Two runs on a local Ray's workers record what the local engine recorded in the grid; a run on a
    set with an unreadable image fails, is tried again, is reported, and the others are recorded."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'iqa[ray]')")
    from iqa.heads.finetune.ray_grid import tune_on_ray

    cache = new_cache(images, tmp_path / "cache")
    broken = bright_images(tmp_path / "images", "broken", 10, 5)
    (Path(broken.image_root) / broken.paths[3]).write_bytes(b"not a png")
    write_manifest(broken, cache)
    runs = expand_finetune_grid(["dinov2"], ["clive", "broken"], ["gated"], [8, 19], ["lora"], lrs=[1e-3], tests=["koniq10k"],
                                epochs=2, accumulate=2, weights="tiny")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        outcome = finetune_grid(cache, runs, runtime=Runtime(dtype="float32", num_workers=0, progress=False),
                                engine=tune_on_ray())
    finally:
        ray.shutdown()
    assert sorted((run.config.train_dataset, run.config.seed) for run, _ in outcome.failed) == [("broken", 8), ("broken", 19)]
    assert all("cannot read im03.png" in why for _, why in outcome.failed)
    assert len(outcome.records) == 4 and len(stored(cache)) == 4
    assert_same_records(grid[0], cache)


def test_tuned_runs_keep_their_test_features_and_the_report_draws_their_t_sne(tmp_path):
    """The kept epoch's test embeddings and head features are stored beside its weights; the kept head
    turns them into predictions whose SRCC is the recorded one; the report draws them (Fig. 4 for tuned runs)."""
    from scipy.stats import spearmanr
    from helpers import bright_dataset
    from iqa.heads.finetune.features import tuned_features
    from iqa.heads.report.build import write_report
    from iqa.heads.saved.weights import load_head

    bright_dataset(tmp_path, n=20)
    db = ResultsDB(tmp_path / "results.sqlite")
    for head in ("baseline", "gated"):
        run = finetune(tmp_path, finetune_config("bright", "dinov2", head, "lora", 8, epochs=2, lr=1e-3, weights="tiny"),
                       dtype="float32", num_workers=0, progress=False, db=db)
    kept = run_weights_path(db.path, run.key)
    features = tuned_features(kept.parent)
    assert features["hidden"].shape == (4, 512) and len(features["rows"]) == len(features["targets"]) == 4
    head, _ = load_head(kept)
    with torch.no_grad():
        from_hidden = head.layer3(torch.as_tensor(features["hidden"])[None])[0, :, 0]
        from_embeddings = head(torch.as_tensor(features["embeddings"])[None])[0]
    torch.testing.assert_close(from_hidden, from_embeddings)
    assert spearmanr(from_hidden.numpy(), features["targets"])[0] == pytest.approx(run.result.best_srcc, abs=1e-6)
    summary = write_report(db.runs(), tmp_path / "report", None, [], "cpu", tsne=True, results_db=db.path)
    assert (tmp_path / "report" / "figures" / "tsne_tuned_dinov2_tiny_bright_lora.png") in summary.figures
