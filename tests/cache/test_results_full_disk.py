"""A full disk keeps the runs just trained: the results database spills them beside itself and imports them next time."""

import errno
import sqlite3

import pytest

from iqa.cache.results import ResultsDB
from helpers import record


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
