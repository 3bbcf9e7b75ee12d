import json

import pytest
import torchvision_stub

from iqa.cache.load import load_cached
from iqa.heads.saved.export import write_config
from helpers import bright_dataset, iqa, one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")


def test_finetune_then_extract_with_the_adapter_then_results(tmp_path):
    bright_dataset(tmp_path)
    common = ["--dataset", "bright", "--weights", "tiny", "--workers", "0", "--cache", tmp_path]
    tuned = iqa("finetune", "--backbone", "siglip2", "--epochs", "2", *common)
    assert tuned.exit_code == 0, tuned.output
    run_dir = tmp_path / "runs" / "bright" / "siglip2@tiny-lora-r4-sig-s8"
    assert tuned.stdout.startswith("siglip2 lora sig s8 bright: best SRCC") and (run_dir / "checkpoint.pt").exists()

    extracted = iqa("extract", "--backbone", "siglip2", "--adapter", run_dir, *common)
    assert extracted.exit_code == 0, extracted.output
    cached = load_cached(tmp_path, "bright", "siglip2", tag="tiny-lora-r4-sig-s8")
    assert cached.valid.all() and cached.fingerprint["tuned"]["run"] == str(run_dir) and cached.fingerprint["tuned"]["epoch"] == 2

    on_tuned = iqa("head", "--cached", "--backbone", "siglip2", "--tag", "tiny-lora-r4-sig-s8", "--dataset", "bright",
                   "--seeds", "8", "--epochs", "1", "--device", "cpu", "--json", "--cache", tmp_path)
    assert on_tuned.exit_code == 0, on_tuned.output
    key = json.loads(on_tuned.stdout.splitlines()[0])["key"]  # a folder would rebuild the untuned base: refused
    one_error_line(iqa("export", key, "--out", tmp_path / "model", "--cache", tmp_path),
                   "siglip2@tiny-lora-r4-sig-s8, a fine-tuned backbone's store", "export the fine-tuning run itself")
    assert not (tmp_path / "model").exists()

    wrong = iqa("extract", "--backbone", "clip", "--adapter", run_dir, *common)
    assert wrong.exit_code == 1 and "tuned siglip2, not clip" in wrong.stderr

    assert iqa("finetune", "--backbone", "siglip2", "--mode", "full", "--epochs", "1", *common).exit_code == 0
    table = iqa("results", "--layout", "regimes", "--cache", tmp_path)
    assert table.exit_code == 0 and "| siglip2 | full | sig |" in table.stdout and "| siglip2 | lora | sig |" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--mode", "partial"], "--mode must be one of lora, full, frozen"),
    (["--batch-size", "3"], "--batch-size must be a multiple of --micro-batch 2"),
    (["--batch-size", "4", "--micro-batch", "3"], "--batch-size must be a multiple of --micro-batch 3"),
    (["--head", "wide"], "unknown head 'wide'"),
    (["--head", "sigmoid+wide"], "or a pair act1+act2 of lrelu, sigmoid, gelu, tanh, relu, gated"),
    (["--backbone", "nss"], "nss computes fixed features: it has no backbone weights to fine-tune"),
    (["--dataset", "missing"], "no manifest for dataset 'missing'"),
    (["--accumulate", "9"], "12 training images cannot fill one batch of 18"),
])
def test_bad_input_fails_in_one_line(tmp_path, args, message):
    bright_dataset(tmp_path)
    options = {"--backbone": "dinov2", "--dataset": "bright", "--weights": "tiny", "--workers": "0", "--cache": tmp_path}
    for flag, value in zip(args[::2], args[1::2]):
        options[flag] = value
    result = iqa("finetune", *[a for flag, value in options.items() for a in ((flag,) if value is None else (flag, value))])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("backbone, mode", [("siglip2", "lora"), ("siglip2", "full"), ("perception", "lora"),
                                            ("perception", "full")])
def test_a_finetuned_run_exports_and_scores_from_disk_as_it_was_tested(tmp_path, backbone, mode):
    """The kept epoch's head and tuning (PEFT adapter, or full weights) leave the run; scoring the test
    images from disk through the exported folder reproduces the recorded test SRCC and PLCC; perception's
    adapter goes back onto the q and k split out of its fused qkv, as it was trained."""
    import json
    import shutil

    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from iqa.cache.manifest import read_manifest
    from iqa.cache.results import ResultsDB
    from iqa.data.splits import split_indices

    torchvision_stub.install()  # perception loads through timm, which imports torchvision
    bright_dataset(tmp_path, n=30)
    common = ["--dataset", "bright", "--weights", "tiny", "--workers", "0", "--cache", tmp_path, "--dtype", "float32"]
    # timm's tiny PE gives features of about 1e-3, so its predictions would spread by 5e-5 around 1 and float32
    # rounding alone would move their PLCC by 1e-4; on unit-length features they spread by 1e-2.
    unit = ["--l2norm"] if backbone == "perception" else []
    assert iqa("finetune", "--backbone", backbone, "--mode", mode, "--epochs", "2", "--lr", "1e-3", *unit, *common).exit_code == 0
    (run,) = ResultsDB(tmp_path / "results.sqlite").runs()
    kept = tmp_path / "runs" / run["key"]
    assert (kept / ("adapter/adapter_model.safetensors" if mode == "lora" else "backbone.safetensors")).is_file()

    out = tmp_path / "model"
    exported = iqa("export", run["key"][:10], "--out", out, "--cache", tmp_path)
    assert exported.exit_code == 0, exported.output
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"]["tuning"]["regime"] == mode and "fine-tuned end to end" in (out / "README.md").read_text()

    manifest = read_manifest(tmp_path, "bright")
    _, test_rows = split_indices(manifest.paths, 8)
    images = [str(tmp_path / "images" / manifest.paths[i]) for i in test_rows]
    scored = iqa("score", out, *images, "--json", "--device", "cpu", "--workers", "0")
    assert scored.exit_code == 0, scored.output
    scores = np.array([json.loads(line)["score"] for line in scored.stdout.splitlines()])
    targets = manifest.targets[test_rows]
    assert spearmanr(scores, targets)[0] == pytest.approx(run["best_srcc"], abs=1e-4)
    assert pearsonr(scores, targets)[0] == pytest.approx(run["best_plcc"], abs=1e-4)
    if backbone == "perception":  # a model pooled at another block than this iqa taps is refused
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
        write_config(moved, dict(config, backbone=dict(config["backbone"], pooling="timm_tap:block0")))
        refused = iqa("score", moved, images[0], "--device", "cpu", "--workers", "0")
        assert refused.exit_code == 1 and "pooled as timm_tap:block0, this iqa pools them as timm_tap:block1" in refused.stderr

    key = "adapter/adapter_model.safetensors" if mode == "lora" else "backbone.safetensors"
    (out / key).write_bytes((out / key).read_bytes()[:-8] + b"\0" * 8)
    altered = iqa("score", out, images[0], "--device", "cpu", "--workers", "0")
    assert altered.exit_code == 1 and "altered or corrupt" in altered.stderr and key in altered.stderr
