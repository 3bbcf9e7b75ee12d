"""What the commands print: one JSON object per line where --json is given, plain numbers, confirmations,
and library errors phrased with the flag on the command line and with the keyword from Python."""

import json

import pytest
from typer.testing import CliRunner

from iqa.cli import app, message
from iqa.errors import SettingError
from iqa.heads.training.grid_request import GridRequest
from helpers import touch_images, write_csv
from helpers import extract, toy_dataset

runner = CliRunner()


def iqa(*args):
    return runner.invoke(app, [str(a) for a in args])


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy store and two baseline runs (mask k 100 and 50, one seed), trained without --cached."""
    cache = tmp_path_factory.mktemp("cache")
    toy_dataset(cache)
    extract(cache)
    result = iqa("head", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy", "--epochs", "2", "--seeds", "8",
                 "--mask-k", "100,50", "--device", "cpu", "--cache", cache, "--json")
    assert result.exit_code == 0, result.output
    return cache, json_lines(result.stdout)


def test_head_needs_no_cached_flag_and_prints_one_object_per_run(trained):
    _, runs = trained
    assert [(r["mask_k"], r["seed"], r["status"]) for r in runs] == [(100.0, 8, "done"), (50.0, 8, "done")]
    assert all(r["best_srcc"] is not None and r["layers"] is None for r in runs)


def test_results_json_is_one_object_per_run_and_the_table_prints_whole_numbers(trained):
    cache, runs = trained
    result = iqa("results", "--json", "--cache", cache)
    assert result.exit_code == 0, result.output
    listed = json_lines(result.stdout)
    assert sorted(r["mask_k"] for r in listed) == [50.0, 100.0] and all(len(r["key"]) == 64 for r in listed)
    table = iqa("results", "--layout", "masking", "--cache", cache).stdout
    assert "| baseline | 100 |" in table and "| baseline | 50 |" in table and "100.0" not in table


def test_cache_ls_and_export_and_score_speak_json_and_confirm(trained, tmp_path):
    cache, _ = trained
    [store] = json_lines(iqa("cache", "ls", "--json", "--cache", cache).stdout)
    assert (store["dataset"], store["backbone"], store["tag"], store["rows"]) == ("toy", "dinov2", "tiny", 40)
    key = json_lines(iqa("results", "--json", "--cache", cache).stdout)[0]["key"]
    exported = iqa("export", key[:12], "--out", tmp_path / "model", "--cache", cache, "--json")
    assert exported.exit_code == 0, exported.output
    assert json_lines(exported.stdout) == [{"key": key, "model": str(tmp_path / "model")}]
    image = sorted((cache / "images").iterdir())[0]
    scored = iqa("score", tmp_path / "model", image, "--out", tmp_path / "scores.csv", "--device", "cpu", "--workers", "0")
    assert scored.exit_code == 0, scored.output
    assert scored.stdout == f"1 of 1 images scored -> {tmp_path / 'scores.csv'}\n"
    assert (tmp_path / "scores.csv").read_text().splitlines()[0] == "path,score,mos"


def test_a_setting_reads_as_its_keyword_in_python_and_as_its_flag_on_the_command_line():
    with pytest.raises(SettingError) as refused:
        GridRequest("nss", datasets=("toy",), epochs=0)
    assert str(refused.value) == "epochs must be at least 1, got 0"
    assert message(refused.value) == "--epochs must be at least 1, got 0"
    with pytest.raises(SettingError, match="stack_size must be at least 1"):
        GridRequest("nss", datasets=("toy",), stack_size=0)
    with pytest.raises(SettingError, match="give dataset or train/test"):
        GridRequest("nss")


def test_csv_prepare_names_the_dataset_it_made_and_suggests_images_when_none_is_found(tmp_path):
    touch_images(tmp_path / "set" / "pics", ["a.png", "b.png"])
    write_csv(tmp_path / "set" / "l.csv", ["file", "mos"], [["a.png", 1], ["b.png", 2]])
    prepare = ["data", "prepare", "csv", "--root", tmp_path / "set", "--labels", "l.csv", "--image-col", "file",
               "--score-col", "mos", "--score-range", "0,10", "--cache", tmp_path / "cache"]
    missing = iqa(*prepare)
    assert missing.exit_code == 1 and "2 of 2 listed images are missing" in missing.stderr
    assert "name it with --images SUB" in missing.stderr
    made = iqa(*prepare, "--images", "pics")
    assert made.exit_code == 0, made.output
    assert "saved as dataset 'csv' (--name NAME gives it another)" in made.stdout
    named = iqa(*prepare, "--images", "pics", "--name", "mine")
    assert named.exit_code == 0 and "saved as dataset" not in named.stdout
