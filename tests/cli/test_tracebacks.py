"""Bad options and failed writes of the training and scoring commands: one `error:` line, never a traceback."""

import pytest
from safetensors import SafetensorError

from helpers import iqa, nss_cache, one_error_line
from helpers import toy_dataset


@pytest.mark.parametrize("command", [
    ["extract", "--backbone", "nss", "--dataset", "toy"],
    ["head", "--cached", "--backbone", "nss", "--dataset", "toy"],
    ["score", "MODEL", "IMAGE"],
    ["explain", "MODEL", "IMAGE", "--out", "OUT"],
    ["finetune", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy"],
    ["report"],
])
def test_an_unknown_device_is_one_line(tmp_path, command):
    args = [str(tmp_path / a) if a in ("MODEL", "IMAGE", "OUT") else a for a in command]
    one_error_line(iqa(*args, "--device", "foo", "--cache", tmp_path), "--device 'foo'", "cuda:N")


@pytest.fixture
def toy(tmp_path):
    toy_dataset(tmp_path, n=8)
    return tmp_path


FINETUNE = ["finetune", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy", "--device", "cpu", "--epochs", "1", "--accumulate", "1",
            "--workers", "0"]


@pytest.mark.parametrize("extra, words", [
    (["--batch-size", "0"], ["--batch-size", "multiple"]),
    (["--batch-size", "-2"], ["--batch-size"]),
    (["--lr", "-1"], ["--lr must be a positive number"]),
    (["--mode", "full", "--backbone-lr", "0"], ["--backbone-lr must be a positive number"]),
    (["--run-dir", "FILE"], ["is a file"]),
])
def test_finetune_refuses_bad_options_in_one_line(toy, extra, words):
    (toy / "FILE").write_text("a file")
    args = [str(toy / a) if a == "FILE" else a for a in extra]
    one_error_line(iqa(*FINETUNE, *args, "--cache", toy), *words)
    assert (toy / "FILE").read_text() == "a file"


def test_head_refuses_a_negative_learning_rate(toy):
    result = iqa("head", "--cached", "--backbone", "nss", "--dataset", "toy", "--lr", "-1", "--cache", toy)
    one_error_line(result, "--lr must be a positive number")


def test_a_head_grid_on_a_full_disk_is_one_line_and_keeps_no_half_weights(tmp_path, monkeypatch):
    nss_cache(tmp_path)
    import iqa.heads.saved.weights as weights

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(weights, "save_file", full)
    result = iqa("head", "--cached", "--backbone", "nss", "--dataset", "toy", "--seeds", "19", "--epochs", "1",
                 "--device", "cpu", "--cache", tmp_path)
    one_error_line(result, "disk is full")
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and p.name.startswith(".")]


# ---- smaller: resume hints name the flags that made the store; the score range is said as it is ----
def test_the_resume_hint_of_a_tiny_store_names_tiny(tmp_path):
    from helpers import extract

    toy_dataset(tmp_path, n=16)
    assert extract(tmp_path, shard=(0, 2)).chunks_missing == 1
    result = iqa("head", "--cached", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy", "--seeds", "8",
                 "--epochs", "1", "--device", "cpu", "--cache", tmp_path)
    one_error_line(result, "iqa extract --backbone dinov2 --dataset toy --weights tiny")
    assert "--tag tiny" not in result.output


def test_the_model_card_says_scores_may_leave_zero_to_one(tmp_path):
    from helpers import nss_model

    folder, _ = nss_model(tmp_path / "cache", tmp_path / "model")
    card = (folder / "README.md").read_text()
    assert "unclipped" in card and "Scores are in [0, 1]" not in card
