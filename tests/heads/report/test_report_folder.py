"""`iqa report --out` never deletes what iqa did not write: it replaces only its own marked folder or an empty one."""

import os

import pytest

from iqa.cache.results import ResultsDB
from iqa.heads.report.build import MARK
from helpers import iqa, record


@pytest.fixture
def small_db(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.record([record("clive", "baseline", 8, 0.80), record("clive", "baseline", 19, 0.84)])
    return tmp_path / "r.sqlite"


def report(db, out):
    return iqa("report", "--db", db, "--out", out, "--no-tsne", "--profile", "", "--cache", db.parent)


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
