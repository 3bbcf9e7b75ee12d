"""The report as its reader sees it: index.html opened in a real (headless) browser."""

from iqa.heads.report.build import write_report

from helpers import browser, check_page, masking_run


def test_the_report_page_loads_every_image_and_link_in_a_browser(tmp_path):
    browser()
    runs = [{**masking_run(d, h, k, s, 0.6 + 0.01 * s - k / 1000), "best_plcc": 0.6, "best_epoch": 3, "last_srcc": 0.6,
             "last_plcc": 0.6, "diverged_epoch": None, "curves": {"srcc": [0.5, 0.6], "train_loss": [0.2, 0.1]},
             "gates": None, "lr": 1e-4}
            for d in ("clive", "koniq10k") for h in ("baseline", "gated") for k in (100, 50) for s in (8, 19)]
    summary = write_report(runs, tmp_path / "report", progress=False)
    assert summary.figures
    loaded = check_page(tmp_path / "report" / "index.html", "report-index")
    assert loaded["images"] == len([p for p in summary.figures if p.suffix == ".png"])
