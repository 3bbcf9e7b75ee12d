"""`iqa data prepare` and `iqa data show` through the real command, and the custom csv adapter."""

import json

import numpy as np

from iqa.cache.manifest import read_manifest
from iqa.data.splits import split_indices
from helpers import iqa, kadid_release, touch_images, write_csv


def test_prepare_then_show_json_is_one_object_with_counts_and_splits(tmp_path):
    rows = kadid_release(tmp_path / "kadid")
    cache = tmp_path / "cache"
    result = iqa("data", "prepare", "kadid10k", "--root", tmp_path / "kadid", "--cache", cache)
    assert result.exit_code == 0, result.output
    assert "kadid10k: 30 images" in result.stdout
    assert "warning: kadid10k: 30 images, the release has 10,125" in result.stderr

    result = iqa("data", "show", "kadid10k", "--cache", cache, "--seeds", "8,19", "--split-by", "group", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    targets = [(r[2] - 1) / 4 for r in rows]
    assert summary["count"] == 30 and summary["groups"] == 6
    assert summary["target_min"] == min(targets) and summary["target_max"] == max(targets)
    assert summary["score_min"] == min(r[2] for r in rows) and summary["score_max"] == max(r[2] for r in rows)
    assert "(y-1)/4" in summary["score_scale"] and summary["split_by"] == "group"
    manifest = read_manifest(cache, "kadid10k")
    for seed in (8, 19):
        train, test = split_indices(manifest.paths, seed, by="group", groups=manifest.groups)
        assert summary["splits"][str(seed)] == {"train": len(train), "test": len(test)}
    assert set(summary["splits"]) == {"8", "19"}


def test_show_text_lists_each_paper_seed(tmp_path):
    kadid_release(tmp_path / "kadid")
    iqa("data", "prepare", "kadid10k", "--root", tmp_path / "kadid", "--cache", tmp_path / "cache")
    result = iqa("data", "show", "kadid10k", "--cache", tmp_path / "cache")
    assert result.exit_code == 0
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("split")] == [
        "split (random) seed 8", "split (random) seed 19", "split (random) seed 25"]
    assert "24 train / 6 test" in result.stdout


def test_cache_comes_from_iqa_cache_variable(tmp_path, monkeypatch):
    kadid_release(tmp_path / "kadid")
    monkeypatch.setenv("IQA_CACHE", str(tmp_path / "env-cache"))
    assert iqa("data", "prepare", "kadid10k", "--root", tmp_path / "kadid").exit_code == 0
    assert (tmp_path / "env-cache" / "kadid10k" / "manifest.json").is_file()


def test_bad_input_exits_non_zero_with_one_clear_line(tmp_path):
    cases = [
        (["data", "prepare", "kadid10k", "--root", tmp_path], "label file not found"),
        (["data", "prepare", "nope", "--root", tmp_path], "unknown dataset 'nope'"),
        (["data", "prepare", "csv", "--root", tmp_path, "--labels", "x.csv"], "needs --image-col"),
        (["data", "show", "kadid10k", "--cache", tmp_path / "cache"], "no manifest for dataset 'kadid10k'"),
        (["data", "show", "kadid10k", "--seeds", "8,x"], "--seeds must be comma-separated integers"),
        (["data", "show", "kadid10k", "--split-by", "content"], "--split-by must be random, group, official"),
    ]
    for args, message in cases:
        result = iqa(*args)
        assert result.exit_code != 0, args
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def write_custom_set(root):
    """A DMOS-like set (0-10, lower is better) with a scene column, images in photos/."""
    rows = [[f"photos/{i:03d}.jpg", 10.0 * (i % 11) / 10, f"scene{i % 4}"] for i in range(40)]
    write_csv(root / "ratings.csv", ["file", "dmos", "scene"], rows)
    touch_images(root, [r[0] for r in rows])
    return rows


def test_custom_csv_lower_better_and_group_column(tmp_path):
    rows = write_custom_set(tmp_path / "mine")
    cache = tmp_path / "cache"
    result = iqa("data", "prepare", "csv", "--root", tmp_path / "mine", "--cache", cache, "--labels", "ratings.csv",
                 "--image-col", "file", "--score-col", "dmos", "--score-range", "0,10", "--lower-better",
                 "--group-col", "scene", "--name", "mine")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # a custom set has no release count to differ from
    manifest = read_manifest(cache, "mine")
    assert manifest.paths == [r[0] for r in rows] and manifest.groups == [r[2] for r in rows]
    np.testing.assert_allclose(manifest.targets, [(10 - r[1]) / 10 for r in rows])
    assert "lower is better" in manifest.score_scale and "(10-y)/10" in manifest.score_scale
    summary = json.loads(iqa("data", "show", "mine", "--cache", cache, "--split-by", "group", "--json").stdout)
    assert summary["groups"] == 4 and summary["target_max"] == 1.0 and summary["target_min"] == 0.0


def test_custom_csv_higher_better_with_absolute_labels_and_default_name(tmp_path):
    rows = write_custom_set(tmp_path / "mine")
    result = iqa("data", "prepare", "csv", "--root", tmp_path / "mine", "--cache", tmp_path / "cache",
                 "--labels", tmp_path / "mine" / "ratings.csv", "--image-col", "file", "--score-col", "dmos",
                 "--score-range", "0,20")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "cache", "csv")
    np.testing.assert_allclose(manifest.targets, [r[1] / 20 for r in rows])
    assert manifest.groups is None
