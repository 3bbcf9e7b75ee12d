"""Every name that becomes a path component is one plain folder name, and iqa's own folders are no dataset's."""

import pytest

from iqa.cache.location import RESERVED_NAMES, UnsafeName, dataset_dir, dataset_name, plain_name
from helpers import iqa, one_error_line, toy_dataset

UNSAFE = ["../../victim", "..", ".", "", "a/b", "/abs", ".hidden", "a\\b", "x\0y"]


@pytest.mark.parametrize("name", UNSAFE)
def test_plain_name_refuses_every_path_like_name(name):
    with pytest.raises(UnsafeName):
        plain_name(name, "tag")
    with pytest.raises(UnsafeName):
        dataset_dir("/cache", name)
    assert plain_name("lora-r4-sig-s8", "tag") == "lora-r4-sig-s8"


def test_iqa_own_folders_are_reserved_and_no_dataset_takes_them():
    from iqa.data.demo import DEMO_DIR
    from iqa.data.gridpg import GRIDPG_DIR
    from iqa.cache.results import RESULTS_FILE
    from iqa.heads.saved.weights import RUNS_DIR

    assert {DEMO_DIR, GRIDPG_DIR, RUNS_DIR, RESULTS_FILE, "report", "models"} <= RESERVED_NAMES
    for name in RESERVED_NAMES:
        with pytest.raises(UnsafeName, match="reserved"):
            dataset_name(name)


@pytest.mark.parametrize("name", ["report", "models", "runs", "gridpg", "demo-src", "../elsewhere"])
def test_data_prepare_refuses_reserved_and_unsafe_names(tmp_path, name):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.png").write_bytes(b"x")
    (tmp_path / "root" / "labels.csv").write_text("image,score\na.png,0.5\n")
    result = iqa("data", "prepare", "csv", "--root", tmp_path / "root", "--labels", "labels.csv", "--image-col", "image",
                 "--score-col", "score", "--score-range", "0,1", "--name", name, "--cache", tmp_path / "cache")
    one_error_line(result, repr(name))
    assert not (tmp_path / "cache" / name).exists() or name == "../elsewhere" and not (tmp_path / "elsewhere").exists()


def test_extract_with_a_tag_leaving_the_cache_deletes_nothing_outside_it(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    toy_dataset(cache, n=4)
    victim = tmp_path / "victim.zarr"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    result = iqa("extract", "--backbone", "nss", "--dataset", "toy", "--tag", "../../victim", "--overwrite",
                 "--device", "cpu", "--workers", "0", "--cache", cache)
    one_error_line(result, "tag", "plain")
    assert (victim / "precious.txt").read_text() == "mine" and sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    other = tmp_path / "other-cache" / "x"
    other.mkdir(parents=True)
    result = iqa("extract", "--backbone", "nss", "--dataset", "../other-cache/x", "--device", "cpu", "--cache", cache)
    one_error_line(result, "dataset")
    assert list(other.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["head", "--cached", "--backbone", "nss", "--dataset", "toy", "--tag", "../x"],
    ["head", "--cached", "--backbone", "../nss", "--dataset", "toy"],
    ["head", "--cached", "--backbone", "nss", "--dataset", "../toy"],
    ["cache", "export", "--backbone", "nss", "--dataset", "toy", "--tag", "../../x", "--out", "OUT"],
    ["cache", "export", "--backbone", "../../nss", "--dataset", "toy", "--out", "OUT"],
    ["finetune", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "../toy", "--device", "cpu"],
    ["data", "show", "../toy"],
])
def test_every_command_refuses_a_path_like_name_in_one_line(tmp_path, command):
    cache = tmp_path / "cache"
    cache.mkdir()
    toy_dataset(cache, n=4)
    result = iqa(*[str(tmp_path / "out.h5") if a == "OUT" else a for a in command], "--cache", cache)
    one_error_line(result, "plain")
    assert not (tmp_path / "out.h5").exists()
