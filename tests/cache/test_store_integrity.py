"""An unfinished, damaged or stale store is named and refused, and the next extraction repairs it;
`cache verify` never says nothing; temporaries of killed runs go on the next run."""

import json
import os

import numpy as np
import pytest

from iqa.cache.store import DamagedStore, EmbeddingStore, IncompleteStore, store_path
from iqa.cache.load import load_cached, load_layer
from iqa.cache.verify import verify_store
from iqa.cache.results import ResultsDB
from iqa.extract.run import ExtractRequest, extract_dataset
from helpers import extract, head, iqa, toy_dataset


@pytest.fixture
def half_store(tmp_path):
    """A store whose extraction stopped partway: chunks 0, 2, 4 of 5 written (a killed run keeps whole chunks)."""
    toy_dataset(tmp_path)
    assert extract(tmp_path, shard=(0, 2)).chunks_missing == 2
    return tmp_path


def test_head_refuses_an_unfinished_store_in_one_line(half_store):
    result = head(half_store)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "unfinished: 24 of 40 rows done" in result.stderr
    assert "iqa extract --backbone dinov2 --dataset toy --weights tiny" in result.stderr
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
    request = ExtractRequest(tmp_path, "toy", "dinov2", weights="tiny", dtype="float32", chunk_rows=8, batch_size=8,
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
    assert "iqa extract --backbone dinov2 --dataset toy --weights tiny` recomputes those chunks" in result.stderr
    assert load_cached(tmp_path, "toy", "dinov2", "tiny").valid.all(), "runs on the embeddings do not read layer2"

    summary = extract_dataset(request, num_workers=0)
    assert summary.repaired == {1: summary.repaired[1]} and summary.rows_computed == 8
    assert verify_store(store) == []
    np.testing.assert_array_equal(load_layer(tmp_path, "toy", "dinov2", 2, "tiny"), good)


def test_export_h5_carries_the_layer_arrays(tmp_path):
    import h5py

    from iqa.cache.export_h5 import export_h5

    toy_dataset(tmp_path, n=10)
    extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", weights="tiny", dtype="float32", store_dtype="float32",
                                   chunk_rows=4, layers="2,1", progress=False), num_workers=0)
    out = export_h5(store_path(tmp_path, "toy", "dinov2", "tiny"), tmp_path / "toy.h5")
    with h5py.File(out) as f:
        assert json.loads(f.attrs["fingerprint"])["layers"] == [2, 1]
        for n in (1, 2):
            np.testing.assert_array_equal(f[f"layer{n}"][:], load_layer(tmp_path, "toy", "dinov2", n, "tiny"))
        np.testing.assert_array_equal(f["embeddings"][:], load_cached(tmp_path, "toy", "dinov2", "tiny").embeddings)


# ---- an image changed or deleted after extraction is noticed ----
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


# ---- cache verify never says nothing ----
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
