"""Bad input ends in one `error:` line and a non-zero exit, never a traceback, and touches nothing."""

import os

import pytest
import torch

from iqa.cache.store import store_path
from iqa.extract.run import ExtractRequest
from helpers import extract, iqa, record, touch_images, toy_dataset, write_csv


def one_error(result, *needles):
    assert result.exit_code != 0 and (result.exception is None or isinstance(result.exception, SystemExit)), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def head(cache, *extra):
    return iqa("head", "--cached", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy", "--epochs", "2",
               "--device", "cpu", "--cache", cache, *extra)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    toy_dataset(cache)
    extract(cache)
    return cache


@pytest.mark.parametrize("extra, needle", [
    (["--seeds", "8,8"], "a seed twice"),
    (["--keep", "0.5"], "give --dropout"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--stack-size", "-3"], "--stack-size must be at least 1"),
    (["--act", ""], "names no head"),
    (["--mask-k", "abc"], "'abc'"),  # the closing quote kept
    (["--dtype", "float16"], "--dtype must be auto, float32 or bfloat16"),
    (["--micro-batch", "5"], "--micro-batch 5 must be at least 2 (the loss scores pairs) and divide the batch of 12"),
])
def test_head_refuses_bad_options(store, extra, needle):
    args = list(extra)
    if args[0] == "--epochs":
        result = iqa("head", "--cached", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy", "--device",
                     "cpu", "--cache", store, *args)
    else:
        result = head(store, *args)
    one_error(result, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["extract", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy", "--overwrite"],
    ["head", "--cached", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy"],
    ["finetune", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy"],
])
def test_cuda_on_a_machine_without_it_is_one_line_and_keeps_the_store(store, command):
    before = sorted(p.name for p in (store_path(store, "toy", "dinov2", "tiny") / "embeddings" / "c").iterdir())
    one_error(iqa(*command, "--device", "cuda", "--cache", store), "no CUDA GPU", "--device cpu")
    assert sorted(p.name for p in (store_path(store, "toy", "dinov2", "tiny") / "embeddings" / "c").iterdir()) == before


def test_extract_batch_size_below_one_is_refused(store):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ExtractRequest(store, "toy", "dinov2", weights="tiny", batch_size=-2)
    one_error(iqa("extract", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy", "--batch-size", "-2",
                  "--device", "cpu", "--cache", store), "--batch-size must be at least 1")


def test_report_to_an_unwritable_path(store, tmp_path):
    from iqa.cache.results import ResultsDB

    ResultsDB(tmp_path / "r.sqlite").record([record("clive", "baseline", 8, 0.8)])
    one_error(iqa("report", "--db", tmp_path / "r.sqlite", "--out", "/proc/iqa/report", "--no-tsne", "--profile", "",
                  "--cache", tmp_path), "cannot write under /proc/iqa/report")


def test_a_truncated_results_database_is_one_line(tmp_path):
    db = tmp_path / "results.sqlite"
    db.write_bytes(b"SQLite format 3\x00" + b"\x00" * 40)  # a header and nothing behind it
    for command in (["results"], ["report", "--no-tsne"]):
        one_error(iqa(*command, "--db", db, "--cache", tmp_path), str(db), "move it away")


def test_a_broken_manifest_is_named_damaged_not_stale(tmp_path):
    toy_dataset(tmp_path)
    extract(tmp_path)
    manifest = tmp_path / "toy" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    one_error(head(tmp_path), "manifest.json is damaged", "iqa data prepare toy")
    one_error(iqa("data", "show", "toy", "--cache", tmp_path), "is damaged")


def test_prepare_and_make_demo_under_an_unwritable_path_are_one_line(tmp_path):
    touch_images(tmp_path / "set", ["a.png", "b.png"])
    write_csv(tmp_path / "set" / "l.csv", ["file", "mos"], [["a.png", 1], ["b.png", 2]])
    prepare = ["data", "prepare", "csv", "--root", tmp_path / "set", "--labels", "l.csv", "--image-col", "file",
               "--score-col", "mos", "--score-range", "0,10"]
    one_error(iqa(*prepare, "--cache", "/proc/iqa-cache"), "cannot write under /proc/iqa-cache")
    (tmp_path / "afile").write_text("x")
    one_error(iqa(*prepare, "--cache", tmp_path / "afile"), "is a file; give --cache a folder")
    one_error(iqa("data", "make-demo", "--out", "/proc/iqa-demo"), "cannot write under /proc/iqa-demo")


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    import iqa.cache.atomic as atomic

    touch_images(tmp_path / "set", ["a.png", "b.png"])
    write_csv(tmp_path / "set" / "l.csv", ["file", "mos"], [["a.png", 1], ["b.png", 2]])

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    result = iqa("data", "prepare", "csv", "--root", tmp_path / "set", "--labels", "l.csv", "--image-col", "file",
                 "--score-col", "mos", "--score-range", "0,10", "--cache", tmp_path / "cache")
    one_error(result, "No space left on device", "free some space")
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / "csv"]


def test_a_truncated_checkpoint_names_the_file_and_how_to_start_over(tmp_path):
    from iqa.extract.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, {"epoch": 1, "w": torch.ones(100)})
    finally:
        os.umask(old)
    path = checkpoint_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="is not a readable checkpoint") as error:
        load_checkpoint(tmp_path)
    assert str(path) in str(error.value) and "delete it to start the run over" in str(error.value)


def test_constant_scores_warn_that_srcc_is_undefined(tmp_path):
    import numpy as np

    from iqa.cache.manifest import Manifest, read_manifest, write_manifest

    toy_dataset(tmp_path)
    flat = read_manifest(tmp_path, "toy")
    write_manifest(Manifest("toy", flat.image_root, flat.paths, np.full(40, 0.5), np.full(40, 0.5), "test"), tmp_path)
    extract(tmp_path)
    result = head(tmp_path, "--seeds", "8")
    assert result.exit_code == 0, result.output
    assert "warning: 1 of 1 runs have no defined SRCC" in result.stderr


def full_disk(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_extract_on_a_full_disk_is_one_line_and_keeps_the_chunks_written(tmp_path, monkeypatch):
    from iqa.cache.store import EmbeddingStore

    toy_dataset(tmp_path)
    extract(tmp_path, shard=(0, 2))  # chunks 0, 2, 4 of 5
    write_block = EmbeddingStore.write_block
    calls = []

    def fills_up(store, *args):
        calls.append(1)
        if len(calls) > 1:
            full_disk()
        write_block(store, *args)

    monkeypatch.setattr(EmbeddingStore, "write_block", fills_up)
    result = iqa("extract", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy", "--device", "cpu", "--workers", "0",
                 "--dtype", "float32", "--batch-size", "8", "--cache", tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # the rest is the progress bar
    assert len(errors) == 1 and errors[0].startswith("error: cannot write under") and "free some space" in errors[0]
    assert int(EmbeddingStore(store_path(tmp_path, "toy", "dinov2", "tiny")).done_chunks().sum()) == 4


def test_report_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import iqa.cache.atomic as atomic
    from iqa.cache.results import ResultsDB

    ResultsDB(tmp_path / "r.sqlite").record([record("clive", "baseline", 8, 0.80)])
    monkeypatch.setattr(atomic.os, "rename", full_disk)
    result = iqa("report", "--db", tmp_path / "r.sqlite", "--out", tmp_path / "rep", "--no-tsne", "--profile", "",
                 "--cache", tmp_path)
    one_error(result, "No space left on device", "free some space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.sqlite"]


def test_unwritable_db_and_a_cache_that_is_a_file_are_one_line(store, tmp_path):
    one_error(head(store, "--seeds", "8", "--db", "/proc/iqa/r.sqlite"), "cannot write a results database under /proc/iqa")
    (tmp_path / "afile").write_text("x")
    one_error(head(tmp_path / "afile", "--seeds", "8"), "is a file; give --cache a folder")
    one_error(iqa("extract", "--backbone", "dinov2", "--weights", "tiny", "--dataset", "toy", "--cache", tmp_path / "afile"),
              "is a file; give --cache a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_micro_batch_12_ranks_the_whole_batch_as_a_run_of_its_own(store, tmp_path):
    from iqa.cache.results import ResultsDB

    db = tmp_path / "results.sqlite"
    for micro in ("2", "12"):
        result = head(store, "--seeds", "8", "--micro-batch", micro, "--db", db, "--json")
        assert result.exit_code == 0, result.output
    runs = ResultsDB(db).runs()
    assert sorted(r["micro_batch"] for r in runs) == [2, 12]  # two keys: the loss differs, so may the result
    assert runs[0]["curves"]["train_loss"] != runs[1]["curves"]["train_loss"]
