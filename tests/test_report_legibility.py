"""What a reader of the report and the tables is told: legends beside the axes labelled by what differs,
and the test-split size behind every correlation, with a warning where it is too small to rank on."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

from iqa.cache.results import ResultsDB
from iqa.heads.report import figures
from iqa.heads.report.tables import SMALL_TEST, results_table, small_test_warning
from iqa.heads.training.grid import expand_grid, head_choices, run_grid

from test_heads_grid import fake_cache


def masking_run(dataset, head, k, seed, srcc):
    return dict(train_dataset=dataset, test_dataset=dataset, backbone="nss", head=head, act1="relu", act2="relu",
                mask_k=k, dropout=None, keep=1.0, seed=seed, regime="frozen", epochs=15, standardize=True,
                status="done", best_srcc=srcc, key=f"{dataset}{head}{k}{seed}")


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
