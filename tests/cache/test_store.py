import h5py
import json

import numpy as np
import pytest

from iqa.cache.store import FingerprintMismatch, store_path
from iqa.cache.create import open_for_writing
from iqa.cache.export_h5 import export_h5
from iqa.cache.listing import describe_store, list_stores
from iqa.cache.load import load_cached
from iqa.cache.verify import verify_store
from iqa.cache.manifest import Manifest, manifest_checksum, write_manifest

N, D = 7, 4


def prepared(tmp_path):
    paths = [f"img{i}.png" for i in range(N)]
    write_manifest(Manifest("toy", str(tmp_path), paths, np.arange(N), np.linspace(0, 1, N), "test"), tmp_path)
    fingerprint = {"model_id": "m", "pooling": "mean_patch", "manifest_sha256": manifest_checksum(tmp_path, "toy")}
    return paths, fingerprint


def test_blocks_round_trip_through_load_cached(tmp_path):
    paths, fingerprint = prepared(tmp_path)
    store = open_for_writing(store_path(tmp_path, "toy", "bb"), fingerprint, paths, D, chunk_rows=3)
    assert store.n_chunks == 3 and list(store.rows_of_chunk(2)) == [6]
    values = np.arange(N * D, dtype=np.float32).reshape(N, D) / 8
    for chunk in range(3):
        rows = store.rows_of_chunk(chunk)
        reasons = ["not an image" if r == 4 else "" for r in rows]
        store.write_block(chunk, values[rows.start : rows.stop], reasons)
    cached = load_cached(tmp_path, "toy", "bb")
    assert cached.embeddings.dtype == np.float32 and cached.embeddings.shape == (N, D)
    assert cached.valid.tolist() == [i != 4 for i in range(N)]
    np.testing.assert_array_equal(cached.embeddings[cached.valid], values[cached.valid])  # exact in float16
    assert np.isnan(cached.embeddings[4]).all()
    assert cached.fingerprint == fingerprint and len(cached.fingerprint_id) == 12
    np.testing.assert_array_equal(cached.targets, np.linspace(0, 1, N))
    assert verify_store(store.path) == []
    assert describe_store(store.path).invalid == [("img4.png", "not an image")]


def test_different_fingerprint_is_refused_naming_the_field(tmp_path):
    paths, fingerprint = prepared(tmp_path)
    path = store_path(tmp_path, "toy", "bb", tag="seed8")
    assert path.name == "bb@seed8.zarr"
    open_for_writing(path, fingerprint, paths, D, chunk_rows=3).write_block(0, np.ones((3, D)), [""] * 3)
    with pytest.raises(FingerprintMismatch, match=r"pooling: store has 'mean_patch', now 'cls'.*--overwrite"):
        open_for_writing(path, dict(fingerprint, pooling="cls"), paths, D)
    rebuilt = open_for_writing(path, dict(fingerprint, pooling="cls"), paths, D, chunk_rows=3, overwrite=True)
    assert not rebuilt.done_chunks().any() and rebuilt.fingerprint["pooling"] == "cls"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_verify_finds_incomplete_damaged_and_stale(tmp_path):
    paths, fingerprint = prepared(tmp_path)
    store = open_for_writing(store_path(tmp_path, "toy", "bb"), fingerprint, paths, D, chunk_rows=3)
    store.write_block(0, np.ones((3, D)), [""] * 3)
    assert verify_store(store.path) == ["incomplete: 2 of 3 chunks not written"]
    store.write_block(1, np.ones((3, D)), [""] * 3)
    store.write_block(2, np.ones((1, D)), [""])
    store.embeddings[1] = np.nan  # a done row that lost its numbers
    problems = verify_store(store.path)
    assert len(problems) == 1 and "1 done rows hold NaN" in problems[0] and "img1.png" in problems[0]
    write_manifest(Manifest("toy", str(tmp_path), paths, np.arange(N) + 1, np.zeros(N), "changed"), tmp_path)
    assert "stale: the manifest changed since extraction" in verify_store(store.path)
    with pytest.raises(ValueError, match="stale"):
        load_cached(tmp_path, "toy", "bb")
    with pytest.raises(FileNotFoundError, match="iqa extract --backbone other --dataset toy"):
        load_cached(tmp_path, "toy", "other")


def test_list_and_export_h5(tmp_path):
    paths, fingerprint = prepared(tmp_path)
    store = open_for_writing(store_path(tmp_path, "toy", "bb"), fingerprint, paths, D, dtype="float32", chunk_rows=4)
    values = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    store.write_block(0, values[:4], [""] * 4)
    store.write_block(1, values[4:], ["", "missing file", ""])
    [info] = list_stores(tmp_path)
    assert (info.backbone, info.tag, info.rows, info.dim, info.dtype) == ("bb", None, N, D, "float32")
    out = export_h5(store.path, tmp_path / "out" / "bb.h5")
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["embeddings"][[0, 1, 2, 3, 4, 6]], values[[0, 1, 2, 3, 4, 6]])
        assert [k.decode() for k in f["keys"][:]] == paths
        assert f["reasons"][5].decode() == "missing file" and f["status"][5] == 2
        assert json.loads(f.attrs["fingerprint"]) == fingerprint
