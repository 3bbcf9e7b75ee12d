"""Files iqa writes are whole or absent, and it replaces only files it wrote (score --out, cache export,
iqa export); stale temporaries are recognised by iqa's exact names."""

import errno
import os

import h5py
import numpy as np
import pytest

from iqa.cache.atomic import NotOurs, atomic_path, remove_stale, replaceable_file
from iqa.cache.results import default_db
from helpers import iqa, nss_cache, nss_model, one_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    folder, run = nss_model(cache, cache.parent / f"{cache.name}-model")
    return cache, folder, run


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- item 3: score --out ----
def test_score_out_replaces_its_own_file_refuses_others_and_keeps_it_on_a_full_disk(model, tmp_path, monkeypatch):
    cache, folder, _ = model
    images = cache / "images"
    out = tmp_path / "scores.csv"
    assert iqa("score", folder, images, "--out", out, "--workers", 0, "--device", "cpu").exit_code == 0
    first = out.read_text()
    assert first.startswith("path,score,mos\n") and len(first.splitlines()) == 17
    again = iqa("score", folder, images / "im00.png", "--out", out, "--workers", 0, "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert len(out.read_text().splitlines()) == 2  # its own file is replaced

    import iqa.heads.saved.model as saved

    before = out.read_bytes()
    monkeypatch.setattr(saved.csv, "writer", full_disk)
    failed = iqa("score", folder, images, "--out", out, "--workers", 0, "--device", "cpu")
    one_error_line(failed, "No space left", "free some space")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


@pytest.mark.parametrize("place, why", [("notes", "not written by iqa"), ("folder", "is a folder"),
                                        ("notes/scores.csv", "choose a writable place")])
def test_score_out_refuses_a_foreign_file_a_folder_and_a_file_as_parent(model, tmp_path, place, why):
    cache, folder, _ = model
    notes = tmp_path / "notes"
    notes.write_text("my notes")
    (tmp_path / "folder").mkdir()
    result = iqa("score", folder, cache / "images", "--out", tmp_path / place, "--workers", 0, "--device", "cpu")
    one_error_line(result, why)
    assert notes.read_text() == "my notes" and list((tmp_path / "folder").iterdir()) == []


def test_score_out_makes_a_missing_parent_folder(model, tmp_path):
    cache, folder, _ = model
    out = tmp_path / "new" / "scores.csv"
    assert iqa("score", folder, cache / "images" / "im01.png", "--out", out, "--device", "cpu").exit_code == 0
    assert out.read_text().startswith("path,score,mos\n")


def test_score_on_an_empty_folder_is_an_error(model, tmp_path):
    _, folder, _ = model
    (tmp_path / "empty").mkdir()
    one_error_line(iqa("score", folder, tmp_path / "empty", "--device", "cpu"), "no images")


# ---- item 3 and 10 and the tracebacks of cache export / ls ----
def test_cache_export_refuses_foreign_files_folders_and_replaces_its_own(model, tmp_path):
    cache, _, _ = model
    args = ("cache", "export", "--dataset", "toy", "--backbone", "nss", "--cache", cache, "--out")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    one_error_line(iqa(*args, notes), "not written by iqa")
    assert notes.read_text() == "mine"
    one_error_line(iqa(*args, tmp_path), "is a folder")
    out = tmp_path / "emb.h5"
    assert iqa(*args, out).exit_code == 0
    assert iqa(*args, out).exit_code == 0, "an earlier export is replaced"
    with h5py.File(out) as f:
        assert f["embeddings"].shape[0] == 16 and "fingerprint_id" in f.attrs


def test_cache_export_of_an_unfinished_store_needs_allow_partial(tmp_path):
    nss_cache(tmp_path)
    from iqa.cache.store import EmbeddingStore, store_path

    group = EmbeddingStore(store_path(tmp_path, "toy", "nss"), mode="r+").group
    group["chunk_done"][1] = 0  # as a killed extraction leaves it
    args = ("cache", "export", "--dataset", "toy", "--backbone", "nss", "--cache", tmp_path, "--out", tmp_path / "e.h5")
    one_error_line(iqa(*args), "incomplete", "--allow-partial")
    assert not (tmp_path / "e.h5").exists()
    assert iqa(*args, "--allow-partial").exit_code == 0 and (tmp_path / "e.h5").exists()


@pytest.mark.parametrize("damage", ["zarr.json", "chunk"])
def test_cache_ls_and_export_on_a_broken_store_are_one_line(tmp_path, damage):
    nss_cache(tmp_path)
    store = tmp_path / "toy" / "nss.zarr"
    if damage == "zarr.json":
        (store / "zarr.json").write_text("{ not json")
    else:
        chunk = next(p for p in (store / "status").rglob("*") if p.is_file() and p.name != "zarr.json")
        chunk.write_bytes(b"garbage")
    one_error_line(iqa("cache", "ls", "--cache", tmp_path), "damaged")
    exported = iqa("cache", "export", "--dataset", "toy", "--backbone", "nss", "--cache", tmp_path,
                   "--out", tmp_path / "e.h5")
    one_error_line(exported, "nss.zarr")
    assert not (tmp_path / "e.h5").exists()


# ---- item 4: iqa export builds aside ----
def test_a_failed_export_leaves_nothing_and_the_rerun_succeeds(model, tmp_path, monkeypatch):
    cache, _, run = model
    import iqa.heads.saved.export as export

    out = tmp_path / "model"
    monkeypatch.setattr(export, "model_card", full_disk)  # the last file: everything else already written
    one_error_line(iqa("export", run["key"], "--out", out, "--cache", cache), "No space left")
    assert not out.exists() and not [p for p in tmp_path.iterdir()]
    killed = tmp_path / f".model.tmp-999999999-{'a' * 32}"  # what a kill -9 mid-export leaves
    killed.mkdir()
    (killed / "head.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    assert iqa("export", run["key"], "--out", out, "--cache", cache).exit_code == 0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the killed export's temporary is removed"


def test_demo_export_is_reused_or_rebuilt_after_a_killed_export(model, tmp_path, monkeypatch):
    import iqa.demo
    from iqa.demo import export_best_nss

    monkeypatch.setattr(iqa.demo, "DATASET", "toy")
    cache, _, run = model
    run = {**run, "status": "done"}
    (cache / "models").mkdir(exist_ok=True)
    killed = cache / "models" / f".{run['key'][:12]}.tmp-999999999-{'b' * 32}"
    killed.mkdir()
    half = cache / "models" / run["key"][:12]  # what an export killed before exports were atomic left
    half.mkdir()
    (half / "head.safetensors").write_bytes(b"cut")
    folder, (_, score) = export_best_nss(cache, default_db(cache), [run])
    assert (folder / "config.json").is_file() and np.isfinite(score) and not killed.exists()
    assert export_best_nss(cache, default_db(cache), [run])[0] == folder


# ---- item 6: stale temporaries are iqa's exact names ----
def test_stale_cleaning_touches_only_names_iqa_creates(tmp_path):
    users = [".emb.h5-2023-notes.txt", ".report.old-4242-bk", ".emb.h5-12-abc.tmp", f".emb.h5-77-{'a' * 32}.tmp.bak"]
    for name in users:
        (tmp_path / name).write_text("the user's")
    ours = tmp_path / f".emb.h5-999999999-{'c' * 32}.tmp"
    ours.write_text("half")
    with atomic_path(tmp_path / "emb.h5") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "emb.h5").read_text() == "new" and not ours.exists()
    assert all((tmp_path / name).read_text() == "the user's" for name in users)
    folder = tmp_path / f".report.old-999999999-{'d' * 32}"
    folder.mkdir()
    assert remove_stale(tmp_path, ".report.old-") == [folder]
    assert (tmp_path / ".report.old-4242-bk").exists()


def test_replaceable_file_refuses_links(tmp_path):
    (tmp_path / "target").write_text("x")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(NotOurs, match="not written by iqa"):
        replaceable_file(tmp_path / "link", lambda p: True, "--out")
