"""What a reader of the report and the tables is told: legends beside the axes labelled by what differs,
and the test-split size behind every correlation, with a warning where it is too small to rank on."""

import matplotlib

matplotlib.use("Agg")

from iqa.cache.results import ResultsDB
from iqa.heads.report import figures
from iqa.heads.report.tables import SMALL_TEST, results_table, small_test_warning
from iqa.heads.training.grid import expand_grid, head_choices, run_grid

from helpers import fake_cache, masking_run


def test_masking_legend_sits_beside_the_axes_and_names_only_what_tells_lines_apart():
    runs = [masking_run(d, h, k, s, 0.5 + 0.01 * s + (0.1 if h == "gated" else 0) - k / 1000)
            for d in ("clive", "koniq10k") for h in ("baseline", "gated") for k in (100, 50) for s in (8, 19)]
    fig = figures.ablation_figure(runs, "masking")
    fig.canvas.draw()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert sorted(t.get_text() for t in legend.get_texts()) == ["baseline", "gated"]
        renderer = fig.canvas.get_renderer()
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # hides no line


def test_tables_give_the_test_split_size_and_a_small_split_is_warned_about(tmp_path, one_thread):
    db = ResultsDB(tmp_path / "results.sqlite")
    small = lambda name: fake_cache(name, n=60)  # 20% test: 12 images
    configs = expand_grid([("clive", "clive")], "siglip2", head_choices(["baseline"], []), [8], epochs=2)
    records = run_grid(configs, small, db, progress=False)
    n_test = records[0]["curves"]["test_images"]
    assert n_test == 12 < SMALL_TEST
    assert "clive (12 images)" in small_test_warning(records)
    assert f"test images: clive 12 (under {SMALL_TEST}" in results_table(records, "variants", "md").splitlines()[0]

    big = ResultsDB(tmp_path / "big.sqlite")
    records = run_grid(configs, lambda name: fake_cache(name, n=200), big, progress=False)
    assert small_test_warning(records) is None
    n_test = records[0]["curves"]["test_images"]
    assert n_test >= SMALL_TEST and f"test images: clive {n_test};" in results_table(records, "variants", "md")


def test_scatter_panels_share_their_axes_and_number_exactly_the_largest_errors():
    import numpy as np

    from iqa.heads.report.scatter import NAMED_ERRORS, scatter_figure

    test = fake_cache("clive", n=60)
    rows = np.arange(0, 60, 2)
    rng = np.random.default_rng(0)
    panels = []
    for spread in (0.05, 0.3):  # the second model errs much more: its points reach further
        pred = np.clip(test.manifest.targets[rows] + rng.normal(0, spread, len(rows)), 0, 1)
        panels.append((f"spread {spread}", {"rows": rows, "pred": pred, "target": test.manifest.targets[rows], "srcc": 0.5}))
    fig = scatter_figure("prediction against MOS", panels, test)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len({ax.get_xlim() for ax in shown}) == 1 and len({ax.get_ylim() for ax in shown}) == 1
    for ax, (_, p) in zip(shown, panels):
        mos, pred = test.manifest.scores[rows], p["pred"]  # targets are the scores on this synthetic set
        largest = set(np.argsort(-np.abs(pred - mos))[:NAMED_ERRORS])
        marks = {a.get_text(): a.xy for a in ax.texts if a.get_text().isdigit()}
        assert sorted(marks) == [str(n) for n in range(1, NAMED_ERRORS + 1)]
        at = {int(np.argmin(np.hypot(mos - x, pred - y))) for x, y in marks.values()}
        assert at == largest  # each number sits on one of the largest errors
        (names,) = [t for t in ax.texts if not t.get_text().isdigit()]
        assert names.get_transform() == ax.transAxes and 0 <= names.get_position()[0] <= 1  # inside the panel
        assert min(min(c.get_sizes()) for c in ax.collections) >= 18
