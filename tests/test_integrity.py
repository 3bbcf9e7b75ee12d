"""Nothing lost, nothing silently wrong: what iqa replaces, what it keeps on a full disk, what it
refuses to train on."""

import errno
import os
import sqlite3

import pytest
from typer.testing import CliRunner

from iqa.cache.atomic import remove_stale
from iqa.cli import app
from iqa.heads.report import MARK, write_report
from iqa.heads.results import ResultsDB
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
    dead = tmp_path / ".rep.tmp-999999999-abc"  # no such process
    live = tmp_path / f".rep.tmp-{os.getpid()}-def"  # a concurrent report still building
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
    import iqa.heads.results as results

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
    import iqa.heads.results as results

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
