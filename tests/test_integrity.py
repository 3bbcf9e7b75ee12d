"""Nothing lost, nothing silently wrong: what iqa replaces, what it keeps on a full disk, what it
refuses to train on."""

import errno
import os
import sqlite3

import pytest
from typer.testing import CliRunner

from iqa.cache.atomic import remove_stale
from iqa.cli import app
from iqa.heads.report.build import MARK
from iqa.cache.results import ResultsDB
from test_report import record

runner = CliRunner()


def iqa(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def small_db(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.record([record("clive", "baseline", 8, 0.80), record("clive", "baseline", 19, 0.84)])
    return tmp_path / "r.sqlite"


def report(db, out):
    return iqa("report", "--db", db, "--out", out, "--no-tsne", "--profile", "", "--cache", db.parent)


# ---- item 1: report --out never deletes what iqa did not write ----
def test_report_refuses_a_folder_of_ones_own_and_a_file(tmp_path, small_db):
    own = tmp_path / "u"
    (own / "sub").mkdir(parents=True)
    (own / "notes.txt").write_text("precious")
    result = report(small_db, own)
    assert result.exit_code == 1 and "not an iqa report" in result.stderr
    assert (own / "notes.txt").read_text() == "precious" and (own / "sub").is_dir()

    file = tmp_path / "f.txt"
    file.write_text("mine")
    result = report(small_db, file)
    assert result.exit_code == 1 and "is a file" in result.stderr and file.read_text() == "mine"
    assert len(result.stderr.strip().splitlines()) == 1


def test_report_replaces_its_own_marked_folder_and_an_empty_one(tmp_path, small_db):
    out = tmp_path / "rep"
    out.mkdir()  # empty: nothing to lose
    assert report(small_db, out).exit_code == 0
    assert (out / MARK).exists() and (out / "index.html").exists()
    (out / "stale.txt").write_text("from the last report")
    assert report(small_db, out).exit_code == 0, "a marked report folder is replaced whole"
    assert not (out / "stale.txt").exists() and (out / "index.html").exists()


def test_report_removes_temporaries_of_dead_runs_only(tmp_path, small_db):
    out = tmp_path / "rep"
    dead = tmp_path / f".rep.tmp-999999999-{'a' * 32}"  # no such process
    live = tmp_path / f".rep.tmp-{os.getpid()}-{'d' * 32}"  # a concurrent report still building
    dead.mkdir(), live.mkdir()
    assert report(small_db, out).exit_code == 0
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rep")) == [live.name]


def test_report_on_an_unwritable_path_is_one_line(tmp_path, small_db):
    result = report(small_db, "/proc/iqa-report")
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_remove_stale_skips_names_without_a_pid(tmp_path):
    (tmp_path / ".x.tmp-notapid").mkdir()
    assert remove_stale(tmp_path, ".x.tmp-") == [] and (tmp_path / ".x.tmp-notapid").exists()


# ---- item 2: a full disk keeps the runs just trained ----
def test_full_disk_spills_finished_runs_and_the_next_run_imports_them(tmp_path, monkeypatch):
    import iqa.cache.results as results

    db = ResultsDB(tmp_path / "r.sqlite")
    db.record([record("clive", "baseline", 8, 0.80)])
    real_write = ResultsDB._write

    def full(self, rows):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(ResultsDB, "_write", full)
    monkeypatch.setattr(results.time, "sleep", lambda s: None)
    with pytest.raises(results.ResultsSpilled) as spilled:
        db.record([record("clive", "baseline", 19, 0.84), record("clive", "sig", 8, 0.9)])
    assert spilled.value.errno == errno.ENOSPC and "2 finished runs saved to" in spilled.value.strerror
    assert spilled.value.spill.exists() and spilled.value.spill.parent == tmp_path
    assert len(db.runs()) == 1

    monkeypatch.setattr(ResultsDB, "_write", real_write)  # space again
    again = ResultsDB(tmp_path / "r.sqlite")
    assert sorted((r["head"], r["seed"], r["best_srcc"]) for r in again.runs()) == [
        ("baseline", 8, 0.80), ("baseline", 19, 0.84), ("sig", 8, 0.9)]
    assert not spilled.value.spill.exists()


def test_full_disk_retries_before_spilling(tmp_path, monkeypatch):
    import iqa.cache.results as results

    db = ResultsDB(tmp_path / "r.sqlite")
    real_write, calls = ResultsDB._write, []

    def full_once(self, rows):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, rows)

    monkeypatch.setattr(ResultsDB, "_write", full_once)
    monkeypatch.setattr(results.time, "sleep", lambda s: None)
    db.record([record("clive", "baseline", 8, 0.80)])
    assert len(calls) == 2 and len(db.runs()) == 1
    assert not list(tmp_path.glob("*.pending-*"))


def test_other_database_errors_are_not_spilled(tmp_path, monkeypatch):
    db = ResultsDB(tmp_path / "r.sqlite")
    monkeypatch.setattr(ResultsDB, "_write", lambda self, rows: (_ for _ in ()).throw(sqlite3.OperationalError("locked")))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.record([record("clive", "baseline", 8, 0.80)])
    assert not list(tmp_path.glob("*.pending-*"))


# ---- items 3 and 4: an unfinished or damaged store is refused, repaired by the next extraction ----
import json  # noqa: E402

import numpy as np  # noqa: E402

from iqa.cache.store import (DamagedStore, EmbeddingStore, IncompleteStore, load_cached, load_layer,  # noqa: E402
                             store_path, verify_store)
from iqa.cache.manifest import Manifest, write_manifest  # noqa: E402
from iqa.extract.run import ExtractRequest, extract_dataset  # noqa: E402
from test_extract_run import make_dataset  # noqa: E402


def toy_dataset(cache, n=40):
    paths = make_dataset(cache, n=n)
    targets = np.linspace(0.1, 0.9, n)
    write_manifest(Manifest("toy", str(cache / "images"), paths, targets, targets, "test"), cache)
    return paths


def extract(cache, shard=(0, 1)):
    request = ExtractRequest(cache, "toy", "dinov2", tiny=True, dtype="float32", chunk_rows=8, batch_size=8,
                             shard=shard, progress=False)
    return extract_dataset(request, num_workers=0)


@pytest.fixture
def half_store(tmp_path):
    """A store whose extraction stopped partway: chunks 0, 2, 4 of 5 written (a killed run keeps whole chunks)."""
    toy_dataset(tmp_path)
    assert extract(tmp_path, shard=(0, 2)).chunks_missing == 2
    return tmp_path


def head(cache, *extra):
    return iqa("head", "--cached", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy", "--seeds", "8",
               "--epochs", "2", "--device", "cpu", "--json", "--cache", cache, *extra)


def test_head_refuses_an_unfinished_store_in_one_line(half_store):
    result = head(half_store)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "unfinished: 24 of 40 rows done" in result.stderr
    assert "iqa extract --backbone dinov2 --dataset toy --tiny" in result.stderr
    with pytest.raises(IncompleteStore):
        load_cached(half_store, "toy", "dinov2", "tiny")


def test_grid_on_a_killed_store_then_finished_store_gives_the_full_result(half_store):
    partial = head(half_store, "--allow-partial")
    assert partial.exit_code == 0, partial.output
    partial_run = json.loads(partial.stdout.splitlines()[0])
    db = ResultsDB(half_store / "results.sqlite")
    assert [r["fingerprint_id"].endswith("-partial-24of40") for r in db.runs()] == [True]

    assert extract(half_store).chunks_missing == 0  # finish the extraction
    full = head(half_store)
    assert full.exit_code == 0, full.output
    full_run = json.loads(full.stdout.splitlines()[0])
    runs = ResultsDB(half_store / "results.sqlite").runs()
    assert len(runs) == 2, "the full store trains afresh; the partial run stays recorded as partial"
    cached = load_cached(half_store, "toy", "dinov2", "tiny")
    assert cached.valid.all() and runs[1]["fingerprint_id"] == cached.fingerprint_id
    assert runs[0]["key"] != runs[1]["key"] and full_run["status"] == partial_run["status"] == "done"
    assert np.isfinite(full_run["best_srcc"]) and full_run["best_srcc"] != partial_run["best_srcc"]


def chunk_file(cache, array, chunk):
    folder = store_path(cache, "toy", "dinov2", "tiny") / array / "c"
    return folder / str(chunk) / "0" if array == "embeddings" else folder / str(chunk)


@pytest.mark.parametrize("array, chunk, damage", [
    ("embeddings", 1, "delete"), ("status", 2, "delete"), ("keys", 0, "delete"), ("embeddings", 3, "garbage"),
])
def test_a_damaged_store_is_named_refused_and_repaired_by_the_next_extraction(tmp_path, array, chunk, damage):
    toy_dataset(tmp_path)
    extract(tmp_path)
    good = load_cached(tmp_path, "toy", "dinov2", "tiny").embeddings
    target = chunk_file(tmp_path, array, chunk)
    assert target.exists(), sorted(p.relative_to(tmp_path) for p in target.parent.rglob("*"))
    target.unlink() if damage == "delete" else target.write_bytes(b"not a zstd frame")

    with pytest.raises(DamagedStore, match="is damaged") as refused:
        load_cached(tmp_path, "toy", "dinov2", "tiny")
    assert str(store_path(tmp_path, "toy", "dinov2", "tiny")) in str(refused.value)
    assert array == "keys" or f"chunk {chunk} (rows {8 * chunk}-{8 * chunk + 7})" in str(refused.value)
    assert any("damaged" in p for p in verify_store(store_path(tmp_path, "toy", "dinov2", "tiny")))

    summary = extract(tmp_path)
    assert summary.repaired and summary.rows_computed == (0 if array == "keys" else 8)
    assert verify_store(store_path(tmp_path, "toy", "dinov2", "tiny")) == []
    np.testing.assert_allclose(load_cached(tmp_path, "toy", "dinov2", "tiny").embeddings, good, rtol=1e-3)


@pytest.mark.parametrize("damage", ["delete", "garbage", "partial"])
def test_a_damaged_layer_chunk_is_named_refused_by_a_layer_run_and_repaired(tmp_path, damage):
    toy_dataset(tmp_path, n=16)
    request = ExtractRequest(tmp_path, "toy", "dinov2", tiny=True, dtype="float32", chunk_rows=8, batch_size=8,
                             layers="all", progress=False)
    extract_dataset(request, num_workers=0)
    store = store_path(tmp_path, "toy", "dinov2", "tiny")
    good = load_layer(tmp_path, "toy", "dinov2", 2, "tiny")
    target = store / "layer2" / "c" / "1" / "0"
    if damage == "delete":
        target.unlink()
    elif damage == "garbage":
        target.write_bytes(b"not a zstd frame")
    else:  # half the chunk's rows lost, the file itself sound
        EmbeddingStore(store, mode="r+").group["layer2"][12:16] = np.nan

    problems = verify_store(store)
    assert len(problems) == 1 and "damaged: chunk 1 (rows 8-15): layer2: " in problems[0], problems
    result = head(tmp_path, "--layer", "2")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith("error: ") and str(store) in result.stderr and "layer2: " in result.stderr
    assert "iqa extract --backbone dinov2 --dataset toy --tiny` recomputes those chunks" in result.stderr
    assert load_cached(tmp_path, "toy", "dinov2", "tiny").valid.all(), "runs on the embeddings do not read layer2"

    summary = extract_dataset(request, num_workers=0)
    assert summary.repaired == {1: summary.repaired[1]} and summary.rows_computed == 8
    assert verify_store(store) == []
    np.testing.assert_array_equal(load_layer(tmp_path, "toy", "dinov2", 2, "tiny"), good)


def test_export_h5_carries_the_layer_arrays(tmp_path):
    import h5py

    from iqa.cache.store import export_h5

    toy_dataset(tmp_path, n=10)
    extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", tiny=True, dtype="float32", store_dtype="float32",
                                   chunk_rows=4, layers="2,1", progress=False), num_workers=0)
    out = export_h5(store_path(tmp_path, "toy", "dinov2", "tiny"), tmp_path / "toy.h5")
    with h5py.File(out) as f:
        assert json.loads(f.attrs["fingerprint"])["layers"] == [2, 1]
        for n in (1, 2):
            np.testing.assert_array_equal(f[f"layer{n}"][:], load_layer(tmp_path, "toy", "dinov2", n, "tiny"))
        np.testing.assert_array_equal(f["embeddings"][:], load_cached(tmp_path, "toy", "dinov2", "tiny").embeddings)


# ---- item 5: an image changed or deleted after extraction is noticed ----
def test_changed_and_deleted_images_are_reported_refused_and_recomputed(tmp_path):
    from PIL import Image

    paths = toy_dataset(tmp_path)
    extract(tmp_path)
    store = store_path(tmp_path, "toy", "dinov2", "tiny")
    before = load_cached(tmp_path, "toy", "dinov2", "tiny")
    images = tmp_path / "images"

    touched = images / paths[0]  # same bytes, new mtime (a copied dataset): not a change
    os.utime(touched, ns=(1, 1))
    assert verify_store(store) == []
    Image.new("RGB", (30, 30), (200, 10, 10)).save(images / paths[9])  # chunk 1
    (images / paths[33]).unlink()  # chunk 4

    problems = verify_store(store)
    assert len(problems) == 1 and "2 images changed since extraction" in problems[0]
    assert f"{paths[9]} changed" in problems[0] and f"{paths[33]} deleted" in problems[0]
    result = head(tmp_path)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "is stale: 2 images changed" in result.stderr and "iqa extract --backbone dinov2" in result.stderr

    summary = extract(tmp_path)
    assert summary.changed.startswith("2 images changed") and summary.rows_computed == 16
    assert summary.invalid == [(paths[33], "missing file")]
    after = load_cached(tmp_path, "toy", "dinov2", "tiny")
    assert not np.allclose(after.embeddings[9], before.embeddings[9])
    np.testing.assert_array_equal(after.embeddings[:8], before.embeddings[:8])
    assert after.fingerprint_id != before.fingerprint_id, "results on the new images get new keys"
    assert verify_store(store) == []


def test_a_store_from_before_stamps_keeps_its_keys_and_gains_the_array(tmp_path):
    import shutil

    from iqa.cache.store import EmbeddingStore, fingerprint_id

    toy_dataset(tmp_path)
    extract(tmp_path)
    store = store_path(tmp_path, "toy", "dinov2", "tiny")
    shutil.rmtree(store / "image_stamps")
    cached = load_cached(tmp_path, "toy", "dinov2", "tiny")
    assert cached.fingerprint_id == fingerprint_id(EmbeddingStore(store).fingerprint), "old results keep their keys"
    assert extract(tmp_path).rows_computed == 0 and (store / "image_stamps").is_dir()
    assert verify_store(store) == []


def test_garbage_store_metadata_is_one_line(tmp_path):
    toy_dataset(tmp_path)
    extract(tmp_path)
    (store_path(tmp_path, "toy", "dinov2", "tiny") / "zarr.json").write_text("{not json")
    result = head(tmp_path)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "is damaged" in result.stderr and "--overwrite" in result.stderr


# ---- item 7: cache verify never says nothing ----
@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_cache_verify_without_stores_is_an_error(tmp_path, kind):
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("x")
    elif kind == "empty":
        (cache / "toy").mkdir(parents=True)
    result = iqa("cache", "verify", "--cache", cache)
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert {"missing": "no cache at", "file": "is a file; give --cache a folder", "empty": "no embedding stores"}[kind] in result.stderr


def test_cache_verify_names_a_store_with_lost_keys(tmp_path):
    toy_dataset(tmp_path)
    extract(tmp_path)
    chunk_file(tmp_path, "keys", 0).unlink()
    result = iqa("cache", "verify", "--cache", tmp_path)
    assert result.exit_code == 1 and "keys do not match the manifest" in result.stdout


# ---- item 6: prepare refuses rows that escape the root, aliases of one file, and unsafe names ----
from test_data_builders import touch_images, write_csv  # noqa: E402


@pytest.mark.parametrize("names, name, needle", [
    (["a.png", "../../../../etc/passwd"], "mine", "lead outside the image folder"),
    (["a.png", "/etc/hostname"], "mine", "lead outside the image folder"),
    (["img/a.png", "./img/a.png"], "mine", "two spellings of one file"),
    (["a.png", "b.png"], "../../evil", "not a plain folder name"),
])
def test_prepare_refuses_unsafe_rows_and_names(tmp_path, names, name, needle):
    root = tmp_path / "set" / "inner"
    touch_images(root, [n for n in names if not n.startswith(("/", ".."))])
    write_csv(root / "labels.csv", ["file", "mos"], [[n, 5] for n in names])
    cache = tmp_path / "cache"
    result = iqa("data", "prepare", "csv", "--root", root, "--cache", cache, "--labels", "labels.csv", "--image-col",
                 "file", "--score-col", "mos", "--score-range", "0,10", "--name", name)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not list(tmp_path.rglob("manifest.json")), "nothing written, inside the cache or out"


# ---- tidy: temporaries of killed runs go on the next run; files follow the umask ----
def test_extract_removes_store_temporaries_of_dead_runs_and_manifests_follow_the_umask(tmp_path):
    toy_dataset(tmp_path, n=8)
    dead = tmp_path / "toy" / f".dinov2@tiny.zarr.tmp-999999999-{'a' * 32}"
    dead_manifest = tmp_path / "toy" / f".manifest.json-999999999-{'b' * 32}.tmp"
    dead.mkdir(), dead_manifest.write_text("{")
    old = os.umask(0o022)
    try:
        toy_dataset(tmp_path, n=8)
    finally:
        os.umask(old)
    assert not dead_manifest.exists()
    assert (tmp_path / "toy" / "manifest.json").stat().st_mode & 0o777 == 0o644
    extract(tmp_path)
    assert not dead.exists()
