"""The report's figures about stored stages (`iqa extract --layers`, `iqa head --layers ... --fuse`).

- `stage_weight_figures`: a fused run's weight per stage against quality on its test rows, one panel
  per stage (SMART-IQA's Fig. 4: low-quality images spread their weight, high-quality ones lean on
  the deep stages), the weights its run recorded (`curves["stage_weights"]`, heads/training/trainer.py).
- `stage_tsne_figure`: 2-D t-SNE of each stored layer's pooled vectors, one panel per layer,
  coloured by distortion type (Life-IQA's Fig. 10), from the stores alone (no head is trained).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iqa.cache.location import backbone_label  # noqa: E402
from iqa.heads.report.figures import QUALITY_BUCKETS, quality_bucket, stem  # noqa: E402
from iqa.heads.report.tables import dataset_column  # noqa: E402

STAGE_POINTS = 600  # images per stage t-SNE: exact t-SNE of every panel stays within seconds
MAX_STAGE_PANELS = 12  # layers shown, evenly spaced, where a store holds more (a 24-block ViT)


def _stage_groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["status"] == "done" and (run.get("curves") or {}).get("stage_weights"):
            key = (run["backbone"], run.get("tag"), dataset_column(run), run["head"], tuple(run["layers"]))
            groups.setdefault(key, []).append(run)
    return groups


def stage_weight_figures(runs: list[dict]) -> list[tuple[str, object]]:
    """One figure per (backbone, dataset, head, stages) of fused runs, seeds pooled: per stage (in layer
    order) its weight on each test image against the image's target, and the mean weight per quality bucket."""
    figures = []
    for (backbone, tag, dataset, head, layers), members in sorted(_stage_groups(runs).items(), key=str):
        weights = np.concatenate([np.asarray(r["curves"]["stage_weights"]["weights"]) for r in members])
        targets = np.concatenate([np.asarray(r["curves"]["stage_weights"]["target"]) for r in members])
        buckets = quality_bucket(targets)
        centres = (np.arange(QUALITY_BUCKETS) + 0.5) / QUALITY_BUCKETS
        order = np.argsort(layers)
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), squeeze=False, sharey=True)
        for ax, i in zip(axes[0], order):
            ax.scatter(targets, weights[:, i], s=6, alpha=0.35, linewidths=0, color="tab:blue")
            means = [weights[buckets == b, i].mean() if (buckets == b).any() else np.nan for b in range(QUALITY_BUCKETS)]
            ax.plot(centres, means, color="tab:red", marker="o", label="mean per quality bucket")
            ax.axhline(1 / len(layers), color="grey", lw=0.8, ls="--", label="equal weights")
            ax.set_title(f"stage {layers[i]}", fontsize=10)
            ax.set_xlabel("quality (target)")
            ax.set_xlim(0, 1)
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("stage weight")
        axes[0, 0].set_ylim(0, 1)
        axes[0, -1].legend(fontsize=7)
        seeds = sorted(r["seed"] for r in members)
        label = f"{backbone_label(backbone, tag)}, {dataset}, {head}, stages {'+'.join(map(str, layers))}"
        fig.suptitle(f"stage weights against quality: {label} (test images, seeds {seeds} pooled)", fontsize=10)
        fig.tight_layout()
        figures.append((stem("stage_weights", backbone, tag or "", dataset, head, *layers), fig))
    return figures


def stage_points(layers: list[int], valid: np.ndarray, count: int = STAGE_POINTS, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """The layers to show (all, or MAX_STAGE_PANELS evenly spaced from the first to the last) and the
    sorted rows to embed: at most `count` of the valid ones, drawn with `seed`."""
    if len(layers) > MAX_STAGE_PANELS:
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, MAX_STAGE_PANELS).round().astype(int)]
    rows = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    return layers, np.sort(rng.choice(rows, min(count, len(rows)), replace=False))


def stage_tsne_figure(title: str, panels: list[tuple[int, np.ndarray]], types: list[str]):
    """panels: (layer, 2-D points [n, 2]); `types` the distortion type of each point, one colour per type."""
    names = sorted(set(types))
    palette = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.2 * rows), squeeze=False, layout="constrained")
    kinds = np.asarray(types)
    for ax, (layer, xy) in zip(axes.ravel(), panels):
        for name in names:
            mine = kinds == name
            ax.scatter(xy[mine, 0], xy[mine, 1], s=7, alpha=0.8, linewidths=0, color=colour[name], label=name)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7, markerscale=2, title="distortion type",
               title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
