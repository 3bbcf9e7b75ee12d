"""Prediction against MOS on the test split, one panel per model (SMART-IQA Fig. 5), largest errors marked.

The predictions come from each run's kept weights (heads/saved/weights.py, beside the results database)
applied to the very inputs the trainer tested on (the run's rows, layers and scaling, through
`stack_inputs`), so their SRCC is the recorded one; the panel shows both. Only frozen-backbone runs
qualify: a fine-tuned run's backbone differs from the cached embeddings.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from iqa.heads.saved.export import mos_map  # noqa: E402
from iqa.heads.training.config import RunConfig  # noqa: E402
from iqa.heads.training.grid import Cached, as_read, run_rows, stack_inputs  # noqa: E402
from iqa.heads.training.metrics import srcc  # noqa: E402
from iqa.heads.saved.weights import load_head, run_weights_path  # noqa: E402

LARGE_ERRORS = 0.1  # the share of test images drawn as large errors (the paper's top 10%)
NAMED_ERRORS = 3  # the largest errors also named by their image
COLUMNS = 3  # panels per row


def kept_predictions(run: dict, results_db: Path, train: Cached, test: Cached) -> dict:
    """The kept head of `run` on its test rows: rows, predictions and targets (both in [0, 1]) and their SRCC."""
    config = RunConfig.from_dict(run)
    if config.regime != "frozen":
        raise ValueError(f"a {config.regime} run changed its backbone; the cached embeddings are not its inputs")
    weights = run_weights_path(results_db, run["key"])
    if not weights.exists():
        raise FileNotFoundError(f"run {run['key'][:12]} kept no weights ({weights} is missing)")
    train, test = as_read(config, train, test)
    rows = run_rows(config, train, test)
    data, _ = stack_inputs([config], [rows], train, test)
    test_rows = data.test_rows[0]
    head, _ = load_head(weights)
    with torch.no_grad():
        pred = head(torch.as_tensor(data.x_test[test_rows], dtype=torch.float32)[None])[0].numpy()
    target = np.asarray(data.y_test)[test_rows]
    return {"rows": test_rows, "pred": pred, "target": target,
            "srcc": float(srcc(torch.as_tensor(pred)[None], torch.as_tensor(target)[None])[0])}


def scatter_figure(title: str, panels: list[tuple[str, dict]], test: Cached):
    """panels: (label, `kept_predictions`) per model; every panel on the same axes, the test set's MOS scale.
    The largest errors are red; the NAMED_ERRORS largest carry a number at the point and are named, by
    number, in a box inside the panel (names beside crowded points overlap and run past the axes)."""
    manifest = test.manifest
    to_mos = mos_map(manifest.scores, manifest.targets)
    columns = min(COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 5.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    drawn = [(label, p, manifest.scores[p["rows"]], to_mos.apply(p["pred"])) for label, p in panels]
    low = min(min(mos.min(), pred.min()) for _, _, mos, pred in drawn)
    high = max(max(mos.max(), pred.max()) for _, _, mos, pred in drawn)
    pad = 0.04 * (high - low or 1.0)
    limits = (low - pad, high + pad)
    for (label, p, mos, pred), ax in zip(drawn, axes.ravel()):
        error = np.abs(pred - mos)
        large = error >= np.quantile(error, 1 - LARGE_ERRORS)
        ax.scatter(mos[~large], pred[~large], s=18, alpha=0.6, linewidths=0, color="tab:blue", label="prediction")
        ax.scatter(mos[large], pred[large], s=26, alpha=0.9, linewidths=0, color="tab:red",
                   label=f"largest {LARGE_ERRORS:.0%} errors")
        named = np.argsort(-error)[:NAMED_ERRORS]
        for n, i in enumerate(named, start=1):
            ax.annotate(str(n), (mos[i], pred[i]), xytext=(3, 3), textcoords="offset points", fontsize=8,
                        color="darkred", fontweight="bold", annotation_clip=True)
        names = "\n".join(f"{n}: {Path(manifest.paths[p['rows'][i]]).name} (error {error[i]:.2f})"
                           for n, i in enumerate(named, start=1))
        ax.text(0.98, 0.02, names, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="darkred",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.plot(limits, limits, color="grey", lw=1, ls="--")
        ax.set_xlim(limits)
        ax.set_ylim(limits)
        ax.set_aspect("equal")
        ax.set_title(f"{label}\nSRCC {p['srcc']:.3f}, {len(mos)} test images", fontsize=9)
        ax.set_xlabel(f"MOS ({manifest.score_scale.split(' (')[0]})", fontsize=8)
        ax.set_ylabel("prediction (on the MOS scale)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return fig
