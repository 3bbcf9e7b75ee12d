"""Table 1's CDIFT +Sig row recovered from the extracted text: its printed average places the 14 values."""

from pathlib import Path

import numpy as np
import pytest

from iqa.heads.report.paper import load_paper, printed_value

PAPER_TEXT = next((p for p in (Path(__file__).resolve().parents[3] / ".." / "shared" / "paper", Path("/work/shared/paper"))
                   if p.is_dir()), Path("absent")) / "001_c5b6910a6aa3136f.txt"


def row(label: str) -> list[float | None]:
    return [printed_value(c) for c in next(r for r in load_paper()["1"]["rows"] if r["label"] == label)["cells"]]


def test_every_average_of_table_1_is_the_mean_of_its_printed_datasets():
    """The rule that places the CDIFT +Sig pairs holds on every row (within half a unit of the last digit)."""
    for r in load_paper()["1"]["rows"]:
        values = [printed_value(c) for c in r["cells"]]
        for metric in (0, 1):
            datasets = [v for v in values[metric:14:2] if v is not None]
            assert abs(np.mean(datasets) - values[14 + metric]) <= 0.0005 + 1e-12, (r["label"], metric)


def test_cdift_sig_row_holds_the_14_printed_values_with_spaq_as_the_nan_pair():
    values = row("CDIFT +Sig")
    assert values[2:4] == [None, None]  # SPAQ: the run diverged (Fig. S3; Table S2 sds 0.000 and 43.85)
    kept = [v for v in values if v is not None]
    assert len(kept) == 14
    srcc, plcc = kept[0:12:2], kept[1:12:2]
    assert (round(sum(srcc) / 6, 4), round(sum(plcc) / 6, 4)) == (0.812, 0.8513)  # by hand: 4.872 / 6, 5.108 / 6
    assert values[14:] == [0.812, 0.851]  # the printed average equals the mean of the six placed pairs
    if not PAPER_TEXT.exists():
        pytest.skip("the paper's text is not here")
    line = PAPER_TEXT.read_text().splitlines()[46]  # 001_c5b6910a6aa3136f.txt:47
    assert line.startswith("CDIFT ") and [float(v) for v in line.split()[1:]] == kept
