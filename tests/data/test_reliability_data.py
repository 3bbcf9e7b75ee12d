"""Changed images are noticed, score ranges are finite, odd manifests and copied caches are one line or work."""

import os
import shutil

import pytest
import numpy as np
import zarr

from iqa.cache.store import EmbeddingStore, store_path
from iqa.cache.verify import verify_store
from iqa.extract.run import ExtractRequest, extract_dataset
from helpers import iqa, one_error_line
from helpers import toy_dataset


def nss_store(cache, n=8):
    toy_dataset(cache, n=n)
    assert extract_dataset(ExtractRequest(cache, "toy", "nss", chunk_rows=4, progress=False), num_workers=0).ok
    return store_path(cache, "toy", "nss")


def rewrite_keeping_size_and_mtime(path):
    """Other bytes of the same length, the old mtime put back (an archive extracted with preserved mtimes)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.unlink()  # a new file (new inode), as tar and unzip write them
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


# ---- item 7 ----
def test_an_image_changed_with_its_size_and_mtime_kept_is_noticed(tmp_path):
    store = nss_store(tmp_path)
    assert verify_store(store) == []
    rewrite_keeping_size_and_mtime(tmp_path / "images" / "im01.png")
    problems = verify_store(store)
    assert len(problems) == 1 and "im01.png changed" in problems[0]
    one_error_line(iqa("cache", "verify", "--cache", tmp_path), "1 of 1 stores")
    head = iqa("head", "--cached", "--backbone", "nss", "--dataset", "toy", "--seeds", "8", "--epochs", "1",
               "--device", "cpu", "--cache", tmp_path)
    one_error_line(head, "im01.png")


def test_copying_the_images_changes_nothing(tmp_path):
    store = nss_store(tmp_path)
    shutil.copytree(tmp_path / "images", tmp_path / "copy")  # new mtimes, ctimes and inodes; the same bytes
    shutil.rmtree(tmp_path / "images")
    (tmp_path / "copy").rename(tmp_path / "images")
    assert verify_store(store) == []


def test_rehash_finds_what_a_three_column_store_cannot_see(tmp_path):
    store = nss_store(tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    old = group["image_stamps"][:, :3]  # a store written before ctime and inode were kept
    del group["image_stamps"]
    group.create_array("image_stamps", shape=old.shape, dtype="int64", chunks=(4, 3), fill_value=0)[:] = old
    image = tmp_path / "images" / "im02.png"
    rewrite_keeping_size_and_mtime(image)
    assert verify_store(store) == []  # size and mtime agree: a stat cannot tell
    assert "im02.png changed" in verify_store(store, rehash=True)[0]
    one_error_line(iqa("cache", "verify", "--rehash", "--cache", tmp_path), "1 of 1 stores")
    assert EmbeddingStore(store).stamps().shape == (8, 3)


# ---- item 9 ----
@pytest.mark.parametrize("score_range", ["-inf,inf", "0,inf", "nan,1", "0,1e400"])
def test_non_finite_score_ranges_are_refused(tmp_path, score_range):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.png").write_bytes(b"x")
    (tmp_path / "root" / "labels.csv").write_text("image,score\na.png,0.5\n")
    result = iqa("data", "prepare", "csv", "--root", tmp_path / "root", "--labels", "labels.csv", "--image-col", "image",
                 "--score-col", "score", f"--score-range={score_range}", "--cache", tmp_path / "cache")
    one_error_line(result, "finite")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("manifest.json"))


# ---- tracebacks: data show on an empty manifest ----
def test_data_show_on_an_empty_manifest_is_one_line(tmp_path):
    toy_dataset(tmp_path, n=4)
    import json

    from iqa.cache.manifest import manifest_path

    raw = json.loads(manifest_path(tmp_path, "toy").read_text())
    raw.update(paths=[], scores=[], targets=[])
    manifest_path(tmp_path, "toy").write_text(json.dumps(raw))
    one_error_line(iqa("data", "show", "toy", "--cache", tmp_path), "no images")
    manifest_path(tmp_path, "toy").write_text("[]")
    one_error_line(iqa("data", "show", "toy", "--cache", tmp_path), "damaged")


def test_an_absolute_labels_path_gives_the_manifest_a_relative_one_gives(tmp_path):
    from iqa.cache.manifest import manifest_path

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.png").write_bytes(b"x")
    (tmp_path / "root" / "labels.csv").write_text("image,score\na.png,0.5\n")
    written = []
    for labels in ("labels.csv", tmp_path / "root" / "labels.csv"):
        result = iqa("data", "prepare", "csv", "--root", tmp_path / "root", "--labels", labels, "--image-col", "image",
                     "--score-col", "score", "--score-range", "0,1", "--name", "t", "--cache", tmp_path / "cache")
        assert result.exit_code == 0, result.output
        written.append(manifest_path(tmp_path / "cache", "t").read_bytes())
    assert written[0] == written[1]


# ---- tracebacks: a copied cache ----
def test_a_copied_cache_reads_its_own_images_and_keeps_its_stores(tmp_path):
    from iqa.cache.manifest import manifest_path, read_manifest
    from iqa.cache.load import load_cached

    cache = tmp_path / "cache"
    nss_store(cache)
    assert '"image_root": "images"' in manifest_path(cache, "toy").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy, symlinks=True)  # cp -a
    shutil.rmtree(cache / "images")  # the copy must not read the original's images
    assert read_manifest(copy, "toy").image_root == str(copy / "images")
    assert load_cached(copy, "toy", "nss").valid.all()
    assert verify_store(store_path(copy, "toy", "nss")) == []
    again = extract_dataset(ExtractRequest(copy, "toy", "nss", chunk_rows=4, progress=False), num_workers=0)
    assert again.ok and again.rows_computed == 0


def test_an_absolute_root_already_on_disk_keeps_its_spelling(tmp_path):
    import json

    from iqa.cache.manifest import manifest_path, read_manifest, write_manifest

    nss_store(tmp_path)
    path = manifest_path(tmp_path, "toy")
    raw = json.loads(path.read_text())
    raw["image_root"] = str(tmp_path / "images")  # as manifests were written before
    path.write_text(json.dumps(raw, sort_keys=True))
    before = path.read_bytes()
    write_manifest(read_manifest(tmp_path, "toy"), tmp_path)
    assert path.read_bytes() == before


# ---- smaller: under --split-by group, --select val carves validation by group ----
def test_group_split_carves_validation_by_whole_groups():
    from iqa.heads.training.selection import carve_validation

    groups = [f"photo{i // 5}" for i in range(100)]
    train_rows = np.arange(0, 80)
    for seed in (8, 19, 25):
        fit, val = carve_validation(train_rows, seed, 0.1, groups)
        assert {groups[r] for r in fit}.isdisjoint({groups[r] for r in val})
        assert len(val) >= 8 and len(val) % 5 == 0 and sorted([*fit, *val]) == list(train_rows)
    plain = carve_validation(train_rows, 8, 0.1)  # a random split carves rows, as before
    assert len(plain[1]) == 8


def test_a_grouped_val_grid_trains_seeds_whose_validation_sizes_differ(tmp_path):
    from functools import partial

    from iqa.cache.manifest import Manifest, write_manifest
    from iqa.cache.results import ResultsDB, default_db
    from iqa.cache.load import load_cached
    from iqa.heads.training.grid import expand_grid, head_choices, run_grid
    from helpers import make_dataset

    paths = make_dataset(tmp_path, n=24)
    targets = np.linspace(0.1, 0.9, 24)
    write_manifest(Manifest("toy", str(tmp_path / "images"), paths, targets, targets, "test",
                            groups=[f"g{j}" for j, size in enumerate([2, 2, 3, 3, 4, 4, 6]) for _ in range(size)]), tmp_path)
    assert extract_dataset(ExtractRequest(tmp_path, "toy", "nss", progress=False), num_workers=0).ok
    load = partial(load_cached, tmp_path, backbone="nss")
    configs = expand_grid([("toy", "toy")], "nss", head_choices(["baseline"], []), [8, 19, 25], epochs=2,
                          split_by="group", select="val", val_fraction=0.2)
    records = run_grid(configs, load, ResultsDB(default_db(tmp_path)), progress=False)
    assert len(records) == 3 and all(r["status"] == "done" and "val_srcc" in r["curves"] for r in records)
    assert len({r["key"] for r in records}) == 3


# ---- smaller: two extractions adding the same layers at once ----
def test_two_concurrent_layer_extensions_both_finish(tmp_path):
    from helpers import extract

    toy_dataset(tmp_path, n=16)
    extract(tmp_path)  # dinov2@tiny, chunks of 8 rows
    path = store_path(tmp_path, "toy", "dinov2", "tiny")
    first = EmbeddingStore(path, mode="r+")
    first.add_layers({2: 8})
    second = EmbeddingStore(path, mode="r+")  # a second process, opened while the first is extending
    assert second.extending == [2]

    def rows(store, chunk):  # the stored default embedding, then the new layer's columns
        stored = store.embeddings[chunk * 8 : (chunk + 1) * 8].astype(np.float32)
        return np.concatenate([stored, np.ones((8, 8), np.float32)], axis=1)

    for chunk in (0, 1):
        first.write_layers(chunk, rows(first, chunk))
    assert first.finish_extension()
    second.write_layers(1, rows(second, 1))  # the extension is gone under it
    assert second.finish_extension()
    assert EmbeddingStore(path).extending == [] and verify_store(path) == []
