"""The report's figures from stored runs (matplotlib, Agg): each function returns figures, `save` writes them.

- `ablation_figure`: test SRCC against k for the masking or dropout ablation, or against the LoRA
  rank (Fig. S4), one panel per dataset group (Table 4's groups; other datasets each their own),
  one line per head variant.
- `gate_figures`: the gate weight s(g) across channels per epoch (Fig. S7) and at the final epoch (Fig. 2).
- `learning_curve_figures`: train loss and test SRCC per epoch, mean over seeds, one figure per run group.
- `tsne_figure`: 2-D maps of head features coloured by quality bucket, test left and train right (Fig. 4).
- `deletion_figure`: explanations' deletion curves, predicted score against the deleted pixel fraction, each
  model's attribution order beside its random-order control (ALOE Fig. B3).
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iqa.heads.report.tables import OUTCOME_FIELDS, dataset_column, grouped  # noqa: E402

QUALITY_BUCKETS = 5  # equal-width bins of the target in [0, 1], as in the paper's t-SNE colouring
NOT_LINE_FIELDS = OUTCOME_FIELDS | {"seed", "act1", "act2"}  # the head name spells act1/act2


def stem(*parts) -> str:
    """A file-name-safe stem: "koniq10k->clive" -> "koniq10k_to_clive"."""
    text = "_".join(str(p).replace("->", "_to_") for p in parts)
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", text)


def save(fig, folder: Path, name: str) -> list[Path]:
    """Write the figure as PNG and PDF; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


BARE_FIELDS = {"head", "backbone", "regime"}  # values that name themselves: "gated", not "head=gated"


def _label(run: dict, fields: list[str]) -> str:
    return ", ".join(f"{run.get(f)}" if f in BARE_FIELDS else f"{f}={run.get(f)}" for f in fields)


def _varying(runs: list[dict], exclude: set[str]) -> list[str]:
    """Config fields (head first) whose value differs between runs: what tells lines apart."""
    fields = [k for k in runs[0] if k not in NOT_LINE_FIELDS | exclude]
    varying = [k for k in fields if len({str(r.get(k)) for r in runs}) > 1]
    return sorted(varying, key=lambda k: k != "head")


def dataset_panels(datasets: list[str]) -> list[tuple[str, list[str]]]:
    """(title, datasets): Table 4's groups with what is present of them, then every other dataset alone."""
    return [(f"{group}: {', '.join(present)}" if group else present[0], present) for group, present in grouped(sorted(datasets))]


# ablation -> (x field, scale, x label, x axis: "descending" from k = 100 down as in Table 4, or "log2")
ABLATION_AXES = {
    "masking": ("mask_k", 1.0, "k: kept features (percentile)", "descending"),
    "dropout": ("keep", 100.0, "k: keep probability x 100", "descending"),
    "lora_rank": ("lora_rank", 1.0, "LoRA rank r", "log2"),
}


def ablation_figure(runs: list[dict], ablation: str):
    """SRCC against k; `ablation` is "masking" (k = mask_k), "dropout" (k = keep x 100) or
    "lora_rank" (k = the rank of LoRA fine-tuning runs).

    A point is the mean over the panel's datasets of each dataset's mean best SRCC over seeds,
    drawn only where every dataset of the panel has a finished (not diverged) result for that line.
    Error bars: the mean over those datasets of the std over seeds.
    """
    x_field, scale, x_label, x_axis = ABLATION_AXES[ablation]
    not_lines = {x_field, "train_dataset", "test_dataset", "mask_k" if ablation == "dropout" else ""}
    panels = dataset_panels(sorted({r["train_dataset"] for r in runs}))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.8), squeeze=False)
    for ax, (title, datasets) in zip(axes[0], panels):
        panel_runs = [run for run in runs if run["train_dataset"] in datasets]
        line_fields = _varying(panel_runs, not_lines)  # what tells this panel's lines apart, nothing more
        lines: dict[str, dict[float, dict[str, list[dict]]]] = {}
        for run in panel_runs:
            line = lines.setdefault(_label(run, line_fields) or run["head"], {})
            line.setdefault(float(run[x_field]) * scale, {}).setdefault(run["train_dataset"], []).append(run)
        for label, points in sorted(lines.items()):
            xs, ys, errs = [], [], []
            for x, by_dataset in sorted(points.items()):
                if set(by_dataset) != set(datasets) or any(r["status"] != "done" for rs in by_dataset.values() for r in rs):
                    continue
                srcc = [np.array([r["best_srcc"] for r in rs]) for rs in by_dataset.values()]
                xs.append(x)
                ys.append(np.mean([s.mean() for s in srcc]))
                errs.append(np.mean([s.std(ddof=1) if len(s) > 1 else 0.0 for s in srcc]))
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test SRCC (best epoch, mean over seeds)")
        if x_axis == "descending":
            ax.invert_xaxis()
        else:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        if ax.lines:  # beside the axes, where it hides no line
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle("SRCC against the LoRA rank" if ablation == "lora_rank" else f"SRCC against k: {ablation}", fontsize=11)
    fig.tight_layout()
    return fig


def _sigmoid(g) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(g, dtype=float)))


def gated_layers(run: dict) -> list[str]:
    return [layer for layer in ("act1", "act2") if run.get(layer) == "gated"]


def gate_figures(runs: list[dict]) -> list[tuple[str, object]]:
    """Fig. S7 per run group (backbone, dataset, regime, head): s(g) per epoch, channels of all seeds pooled.

    Then Fig. 2: the final epoch's s(g) of every group, one histogram per dataset, a panel per layer.
    Runs stored before the trainer kept per-epoch gates contribute their final gates to Fig. 2 only.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if gated_layers(run) and run.get("gates"):
            groups.setdefault((run["backbone"], dataset_column(run), run["regime"], run["head"]), []).append(run)
    figures = []
    for (backbone, dataset, regime, head), members in sorted(groups.items()):
        layers = [layer for layer in gated_layers(members[0]) if members[0]["curves"].get(f"g_{layer}")]
        if not layers:
            continue
        fig, axes = plt.subplots(len(layers), 1, figsize=(max(6.0, 0.3 * len(members[0]["curves"]["srcc"]) + 2), 3 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            epochs = max(len(r["curves"][f"g_{layer}"]) for r in members)
            per_epoch = [
                np.concatenate([_sigmoid(r["curves"][f"g_{layer}"][e]) for r in members if e < len(r["curves"][f"g_{layer}"])])
                for e in range(epochs)
            ]
            ax.boxplot(per_epoch, positions=range(1, epochs + 1), showfliers=False, widths=0.6)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{layer}: s(g) per channel")
            ticks = list(range(1, epochs + 1, max(1, epochs // 15)))
            ax.set_xticks(ticks, [str(t) for t in ticks])
        fig.suptitle(f"gate weight s(g) per epoch: {backbone}, {dataset}, {regime}, {head} ({len(members)} seeds pooled; box: quartiles, whiskers: 1.5 IQR)", fontsize=10)
        fig.tight_layout()
        figures.append((stem("gates_epochs", backbone, dataset, regime, head), fig))

    if groups:
        layers = sorted({layer for members in groups.values() for layer in gated_layers(members[0])})
        fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            final = {
                key: np.concatenate([_sigmoid(r["gates"][layer]["g"]) for r in members if layer in r["gates"]])
                for key, members in sorted(groups.items())
                if any(layer in r["gates"] for r in members)
            }
            bins = np.histogram_bin_edges(np.concatenate(list(final.values())), bins=40)
            for (backbone, dataset, regime, head), values in final.items():  # outlines: they overlap
                ax.hist(values, bins=bins, histtype="step", lw=1.5, label=f"{dataset} ({backbone}, {regime}, {head})")
            ax.axvline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(f"{layer}: s(g) at the final epoch")
            ax.set_ylabel("channels (all seeds)")
            ax.legend(fontsize=7)
        fig.suptitle("gate weight s(g): larger leans on the sigmoid branch, smaller on LeakyReLU", fontsize=10)
        fig.tight_layout()
        figures.append(("gates_final", fig))
    return figures


def learning_curve_figures(runs: list[dict]) -> list[tuple[str, object]]:
    """One figure per (backbone, train->test, regime): train loss and test SRCC per epoch, a line per config."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["backbone"], dataset_column(run), run["regime"]), []).append(run)
    figures = []
    for (backbone, dataset, regime), members in sorted(groups.items()):
        line_fields = _varying(members, {"train_dataset", "test_dataset"})
        lines: dict[str, list[dict]] = {}
        for run in members:
            lines.setdefault(_label(run, line_fields) or run["head"], []).append(run)
        fig, (loss_ax, srcc_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
        colours = plt.get_cmap("tab20" if len(lines) > 10 else "tab10")
        for i, (label, line_runs) in enumerate(sorted(lines.items())):
            for ax, key in ((loss_ax, "train_loss"), (srcc_ax, "srcc")):
                mean = _mean_curve([r["curves"].get(key, []) for r in line_runs])
                if len(mean):
                    ax.plot(range(1, len(mean) + 1), mean, color=colours(i % colours.N), label=label)
        loss_ax.set_ylabel("train loss (MSE + margin)")
        loss_ax.set_yscale("log")
        srcc_ax.set_ylabel("test SRCC")
        for ax in (loss_ax, srcc_ax):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if srcc_ax.lines:
            srcc_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        seeds = sorted({r["seed"] for r in members})
        fig.suptitle(f"learning curves: {backbone}, {dataset}, {regime} (mean over seeds {seeds})", fontsize=10)
        fig.tight_layout()
        figures.append((stem("curves", backbone, dataset, regime), fig))
    return figures


def _mean_curve(curves: list[list[float]]) -> np.ndarray:
    """Mean per epoch over the seeds that reached it (a diverged seed stops early)."""
    length = max((len(c) for c in curves), default=0)
    return np.array([np.mean([c[e] for c in curves if e < len(c)]) for e in range(length)])


def quality_bucket(targets: np.ndarray) -> np.ndarray:
    """Bucket 0 .. QUALITY_BUCKETS-1 of each target in [0, 1], equal-width."""
    return np.clip((np.asarray(targets) * QUALITY_BUCKETS).astype(int), 0, QUALITY_BUCKETS - 1)


def tsne_figure(title: str, panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
    """panels: (label, test 2-D points, test targets, train 2-D points, train targets); one row each. Train
    points None: the test side alone (a tuned run keeps its test features only)."""
    columns = 1 if panels[0][3] is None else 2
    fig, axes = plt.subplots(len(panels), columns, figsize=(4.5 * columns - 0.5 * (columns - 1), 3.4 * len(panels)),
                             squeeze=False, layout="constrained")
    colours = plt.get_cmap("viridis", QUALITY_BUCKETS)
    for (label, test_xy, test_y, train_xy, train_y), row in zip(panels, axes):
        sides = [(row[0], test_xy, test_y, "test")] + ([(row[1], train_xy, train_y, "train")] if columns == 2 else [])
        for ax, xy, y, side in sides:
            points = ax.scatter(xy[:, 0], xy[:, 1], c=quality_bucket(y), cmap=colours, vmin=-0.5,
                                vmax=QUALITY_BUCKETS - 0.5, s=8, alpha=0.8, linewidths=0)
            ax.set_title(f"{side} ({len(xy)} images)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label.replace(" (", "\n("), fontsize=9)
    bar = fig.colorbar(points, ax=axes.ravel().tolist(), ticks=range(QUALITY_BUCKETS), shrink=0.6)
    bar.set_ticklabels([f"{i / QUALITY_BUCKETS:.1f}-{(i + 1) / QUALITY_BUCKETS:.1f}" for i in range(QUALITY_BUCKETS)])
    bar.set_label("quality bucket (target)")
    fig.suptitle(title, fontsize=10)
    return fig


def layer_figure(runs: list[dict]):
    """SRCC against the layer a head was trained on (`iqa head --layer all`): a line per head and
    dataset (train->test), a point the mean best SRCC over seeds with their std as error bar.
    Runs on one stored layer only; concatenations (`--layers 4,3`) are the pairing table's."""
    lines: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        if len(run.get("layers") or []) == 1 and run["status"] == "done":
            label = f"{run['head']}, {dataset_column(run)}"
            lines.setdefault(label, {}).setdefault(run["layers"][0], []).append(run["best_srcc"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, points in sorted(lines.items()):
        layers = sorted(points)
        ax.errorbar(layers, [np.mean(points[n]) for n in layers], marker="o", capsize=3, label=label,
                    yerr=[np.std(points[n], ddof=1) if len(points[n]) > 1 else 0.0 for n in layers])
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (block or stage, from 1)")
    ax.set_ylabel("test SRCC (best epoch, mean over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title("SRCC against layer", fontsize=11)
    fig.tight_layout()
    return fig


def deletion_figure(curves: dict[str, dict]):
    """One line per model (`Evaluation.as_dict()` by name): the attribution order solid, random orders dashed."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for index, (name, measured) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        ax.plot(measured["deletion_fraction"], measured["deletion_curve"], color=colour, marker="o", ms=3,
                label=f"{name} (AUC {measured['deletion_auc']:.3f})")
        ax.plot(measured["deletion_fraction"], measured["deletion_curve_random"], color=colour, ls="--",
                label=f"{name}, random order ({measured['deletion_auc_random']:.3f})")
    fills = sorted({measured["deletion_fill"] for measured in curves.values()})
    ax.set_xlabel(f"deleted pixel fraction (16x16 blocks set to {' / '.join(fills)})")
    ax.set_ylabel("predicted score")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Deletion: a faithful map makes the score fall early")
    return fig


MAX_STRIP_STEPS = 8  # columns of a maps-over-training strip: the kept steps, evenly thinned


def maps_strip(title: str, names: list[str], steps: list[int], maps: np.ndarray):
    """maps [steps, images, R, R]: one row per image, one column per kept step (each map scaled to its maximum)."""
    shown = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), MAX_STRIP_STEPS)).round().astype(int)))
    fig, axes = plt.subplots(len(names), len(shown), figsize=(2.2 * len(shown), 2.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for column, s in enumerate(shown):
            ax = axes[row][column]
            m = maps[s, row]
            ax.imshow(m / (m.max() or 1.0), cmap="jet", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(f"step {steps[s]}", fontsize=8)
            if column == 0:
                ax.set_ylabel(Path(name).name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
