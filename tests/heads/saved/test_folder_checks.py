"""Model folders and results databases iqa did not write (or that were edited) are refused in one line."""

import json
import shutil
import sqlite3

import pytest
import torch
from safetensors.torch import save_file

from iqa.cache.results import ResultsDB, ResultsDBError
from iqa.heads.saved.export import file_sha256, write_config
from iqa.heads.saved.model import ModelFolderError, load_model
from helpers import iqa, nss_model, one_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    folder, _ = nss_model(cache, cache.parent / f"{cache.name}-model")
    return cache, folder


# ---- item 5: read-only commands never write into someone else's SQLite file ----
def foreign_db(path):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    return path.read_bytes()


@pytest.mark.parametrize("command", [["results"], ["results", "--runs"], ["report"], ["export", "abc", "--out", "OUT"]])
def test_read_only_commands_refuse_a_foreign_database_and_write_nothing(tmp_path, command):
    db = tmp_path / "foreign.sqlite"
    before = foreign_db(db)
    result = iqa(*[str(tmp_path / "out") if a == "OUT" else a for a in command], "--db", db, "--cache", tmp_path)
    one_error_line(result, "not an iqa results database")
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["foreign.sqlite"]


def test_a_training_command_refuses_a_foreign_database_too(tmp_path):
    db = tmp_path / "foreign.sqlite"
    before = foreign_db(db)
    with pytest.raises(ResultsDBError, match="not an iqa results database"):
        ResultsDB(db)
    assert db.read_bytes() == before
    assert ResultsDB(tmp_path / "new.sqlite").runs() == []  # a new (empty) file is still made ours


def test_read_only_open_keeps_an_older_schema_unmigrated(model):
    cache, _ = model
    path = cache / "results.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 0")
    before = path.read_bytes()
    assert len(ResultsDB(path, read_only=True).runs()) == 1
    assert path.read_bytes() == before


# ---- item 8: an edited config.json is refused ----
@pytest.mark.parametrize("edit", [
    lambda c: c["backbone"].update(preprocess="native"),
    lambda c: c["backbone"].update(resolution=64),
    lambda c: c["head"].update(l2norm=True),
    lambda c: c["targets"]["mos"].update(scale=7.0),
])
def test_an_edited_model_config_is_refused(model, tmp_path, edit):
    _, folder = model
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    edit(config)
    (edited / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(ModelFolderError, match="does not match its checksum"):
        load_model(edited)
    one_error_line(iqa("score", edited, folder, "--device", "cpu"), "config.json", "checksum")


# ---- tracebacks: checksums that match, contents iqa never wrote ----
def resealed(folder, tmp_path, change_config=None, head_state=None, metadata=True, files=None):
    """A copy of the model folder with a changed config or head whose checksums are recomputed."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    if head_state is not None:
        save_file(head_state, str(bad / "model.safetensors"), metadata={"config": "{}"} if metadata else None)
        config["weights"]["sha256"] = file_sha256(bad / "model.safetensors")
    for name, data in (files or {}).items():
        (bad / name).parent.mkdir(parents=True, exist_ok=True)
        (bad / name).write_bytes(data)
    if change_config:
        change_config(config)
    write_config(bad, config)
    return bad


def drop_backbone(c):
    del c["backbone"]


def wrong_head_file(c):
    c["weights"]["file"] = "head.bin"


def full_regime(c):
    c["backbone"]["tuning"] = {"regime": "full", "files": {}}


@pytest.mark.parametrize("case, words", [
    (dict(change_config=drop_backbone), ["backbone"]),
    (dict(change_config=lambda c: c["backbone"].update(key="no-such-backbone")), ["no-such-backbone"]),
    (dict(change_config=lambda c: c.pop("targets")), ["lacking targets"]),
    (dict(change_config=lambda c: c.update(format="other-9")), ["iqa-model-1"]),
    (dict(change_config=wrong_head_file), ["not a .safetensors file"]),
    (dict(head_state={"x": torch.zeros(2)}, metadata=False), ["export the run again"]),
    (dict(head_state={"x": torch.zeros(2)}), ["export the run again"]),
    (dict(change_config=lambda c: c["backbone"].update(layers=[1, 2])), ["fixed features"]),
    (dict(change_config=full_regime, files={"pytorch_model.bin": b"pickle"}), ["pickled"]),
    (dict(files={"adapter/adapter_model.bin": b"pickle"}), ["pickled"]),
])
def test_model_folders_with_matching_checksums_but_bad_contents_are_one_line(model, tmp_path, case, words):
    _, folder = model
    bad = resealed(folder, tmp_path, **case)
    result = iqa("score", bad, folder / "config.json", "--device", "cpu", "--workers", 0)
    one_error_line(result, *words)
