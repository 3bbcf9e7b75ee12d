"""`iqa report --paper`: zero-shot runs sit in Table 5a beside the published methods, measured, never judged."""

from types import SimpleNamespace

import pytest

from iqa.cache.results import ResultsDB
from iqa.heads.report.paper import compare

from helpers import db_row


def zeroshot_row(dataset, seed, srcc, evaluated_on="test"):
    config = dict(train_dataset=dataset, test_dataset=dataset, backbone="clip", prompts="pyiqa", head="zeroshot",
                  act1="zeroshot", act2="zeroshot", seed=seed, regime="frozen", evaluated_on=evaluated_on)
    result = SimpleNamespace(status="done", best_epoch=None, best_srcc=srcc, best_plcc=srcc, last_srcc=srcc,
                             last_plcc=srcc, diverged_epoch=None, curves={}, gates=None)
    return db_row(config, "fp", result)


def test_zero_shot_runs_are_placed_in_table_5a_above_the_papers_own_rows(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.record([zeroshot_row("clive", 8, 0.60), zeroshot_row("clive", 19, 0.62), zeroshot_row("clive", None, 0.99, "all")])
    table = next(t for t in compare(db.runs()) if t.tid == "5a")
    labels = [label for label, _ in table.rows]
    at = labels.index("iqa zeroshot (clip, pyiqa prompts)")
    assert labels[at + 1] == "B"
    clive_srcc = table.rows[at][1][table.headers.index("clive SRCC")]
    assert clive_srcc.measured == pytest.approx(0.61) and clive_srcc.seeds == 2  # the seeds' test rows, not the whole set
    assert clive_srcc.verdict == "no published value"
