"""`iqa report`: the paper's tables, figures and compute profile from the results database, in one folder.

Layout of the report folder (default <cache>/report):
- `tables/<name>.md|.csv|.tex`: Tables 1-2, 3, 4, 6, S1, S3 from whatever runs exist;
- `figures/<name>.png|.pdf`: SRCC against k and against the LoRA rank, gate weights, learning curves, t-SNE,
  SRCC against layer, stage weights against quality and the stage-wise t-SNE (heads/report/stages.py);
  prediction against MOS on the test split (from the kept weights beside `results_db`);
- `profile.md|.csv`: Table S5 for the profiled backbones;
- `index.html`: all of it on one static page (relative links; opens from disk);
- with `paper`: `paper.html|.md|.csv`, the published numbers beside the measured (heads/report/paper.py);
- with `explanations`: `explanations.html` and `explanations/`, exported models' maps and their measures
  (heads/report/explanations.py);
- with `paired`: `paired_<key a>_<key b>.md|.csv`, two configurations compared seed by seed and image by image
  (heads/report/paired.py).
A table or figure with no runs behind it is left out and the page says why. The report is built in
a temporary folder beside its destination and swapped in at the end: a crash leaves the old one.
The folder carries a `.iqa-report` mark; only a marked folder (or an empty one) is ever replaced.
"""

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from iqa.cache.atomic import building_folder, folder_state
from iqa.cache.location import backbone_label
from iqa.extract.registry import BACKBONES, tag_weights
from iqa.data.distortion_types import distortion_types
from iqa.heads.report import figures, stages
from iqa.heads.report.explanations import ExplainedModels, write_explanations
from iqa.heads.training.config import complete_run
from iqa.heads.training.grid import Cached
from iqa.heads.models.mlp import HEADS
from iqa.heads.models.probes import PROBES
from iqa.heads.report.page import html_page
from iqa.heads.report.paper import compare, render
from iqa.heads.report.profile import profile_backbone, profile_table
from iqa.heads.report.paired import compare_keys, paired_table
from iqa.heads.report.scatter import kept_predictions, scatter_figure
from iqa.heads.report.tables import results_table
from iqa.heads.report.tsne import retrained_features, tsne_2d
from iqa.errors import SettingError
from iqa.heads.finetune.explain_every import kept_maps, maps_folder
from iqa.heads.finetune.features import tuned_features
from iqa.heads.saved.weights import run_weights_path

MARK = ".iqa-report"  # a report folder's mark: the only kind of folder a new report replaces
MAX_TSNE_HEADS = 4  # heads per t-SNE figure besides the encoder (Fig. 4 shows three)
MAX_SCATTER_MODELS = 6  # panels per prediction-against-MOS figure
Loader = Callable[[str, str, str | None], Cached]  # (dataset, backbone, tag) -> cached embeddings


def within(run: dict) -> bool:
    return run["train_dataset"] == run["test_dataset"]


def plain(run: dict) -> bool:
    """No ablation: every feature kept, no dropout."""
    return run["mask_k"] == 100 and run["dropout"] is None


def masking_grid(run: dict) -> bool:
    """A run of the masking ablation's grid (k = 100 included): within one dataset, no dropout."""
    return within(run) and run["dropout"] is None


def masked(run: dict) -> bool:
    return run["mask_k"] < 100


def dropout_grid(run: dict) -> bool:
    """A run of the dropout ablation's grid: within one dataset, dropout on, every feature kept."""
    return within(run) and run["dropout"] is not None and run["mask_k"] == 100


# (file name, title, layout, the runs it reads, what must be among them, the note when it is not)
TABLES = [
    ("table1-2_backbones", "Tables 1, 2: backbone x dataset", "backbones",
     lambda r: within(r) and plain(r), None, "no within-dataset runs without ablation"),
    ("table3_cross", "Table 3: cross-dataset (train->test)", "cross",
     lambda r: not within(r) and plain(r), None, "no cross-dataset runs (iqa head --train A --test B)"),
    ("table4_masking", "Table 4: top-k feature masking, Δ against k = 100 per group", "masking",
     masking_grid, masked, "no masking runs (--mask-k below 100)"),
    ("table6_activations", "Table 6: activation pairs (Act1, Act2)", "activations",
     lambda r: within(r) and plain(r), None, "no within-dataset runs without ablation"),
    ("tableS1_regimes", "Table S1: regimes (frozen, lora, full)", "regimes",
     lambda r: within(r) and plain(r), None, "no within-dataset runs without ablation"),
    ("tableS3_dropout", "Table S3: dropout, Δ against keep = 1.0 per group", "dropout",
     dropout_grid, None, "no dropout runs (--dropout input|layers)"),
]


@dataclass
class ReportSummary:
    out: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out, and why
    paper: list[str] = field(default_factory=list)  # with `paper`: one summary line per table beside the paper


@dataclass
class _Page:
    """What index.html shows, section by section, as (title, html) parts."""

    tables: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    profile: str = ""
    paper: list[str] = field(default_factory=list)  # one summary line per table compared with the paper
    explanations: list[str] | None = None  # with an explanations page: the models it shows


def write_report(
    runs: list[dict],
    out: Path,
    load: Loader | None = None,
    profile: list[str] = (),
    device: str = "cpu",
    tsne: bool = True,
    progress: bool = True,
    paper: bool = False,
    explanations: ExplainedModels | None = None,
    results_db: Path | None = None,
    paired: list[tuple[str, str]] = (),
) -> ReportSummary:
    """Write every table and figure the runs allow into `out`; `load` gives embeddings for t-SNE and, with
    `results_db` (the runs' database, their kept weights beside it), for the prediction-against-MOS scatters;
    `paper` adds paper.html|.md|.csv: the published numbers beside the measured ones (heads/report/paper.py);
    `explanations` adds explanations.html (heads/report/explanations.py); `paired` (pairs of run keys, with `load`
    and `results_db`) adds a paired comparison of each pair's configurations (heads/report/paired.py)."""
    out = Path(out)
    if not runs:
        raise ValueError("no runs in the results database")
    unknown = [b for b in profile if b not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown backbone(s) to profile: {', '.join(unknown)}; choose from {', '.join(BACKBONES)}")
    check_replaceable(out)
    runs = [complete_run(run) for run in runs]  # older rows: the fields they lack at their defaults
    summary, page = ReportSummary(out), _Page()
    with building_folder(out) as building:
        _tables(runs, building, summary, page)
        _figures(runs, building, summary, page, load if tsne else None, device, progress)
        if load is None or not tsne:
            summary.notes.append("t-SNE: skipped (--no-tsne)" if load is not None else "t-SNE: no embedding cache given")
        if tsne and results_db is not None:
            _tuned_tsne_figures(runs, Path(results_db), building, summary, page)
        if results_db is not None:
            _maps_over_training(runs, Path(results_db), building, summary, page)
        if load is not None and results_db is not None:
            _scatter_figures(runs, load, Path(results_db), building, summary, page)
        else:
            summary.notes.append("prediction against MOS: no embedding cache and results database given")
        if paired:
            _paired_tables(runs, paired, load, results_db, building, summary, page)
        _profile(runs, profile, building, device, summary, page, load)
        if paper:
            page.paper = summary.paper = _paper(runs, building, summary)
        if explanations is not None:
            summary.notes += [f"explanations: {n}" for n in write_explanations(explanations, building, STYLE, progress)]
            page.explanations = [s.name for s in explanations.subjects]
        (building / "index.html").write_text(_index_html(runs, page, summary.notes))
        (building / MARK).write_text("written by iqa report; a new report replaces this folder\n")
    summary.tables = [out / p.relative_to(building) for p in summary.tables]
    summary.figures = [out / p.relative_to(building) for p in summary.figures]
    return summary


def _paper(runs, folder: Path, summary: ReportSummary) -> list[str]:
    comparisons = compare(runs)
    for fmt in ("html", "md", "csv"):
        path = folder / f"paper.{fmt}"
        path.write_text(render(comparisons, fmt))
        summary.tables.append(path)
    return [t.summary() for t in comparisons]


def check_replaceable(out: Path) -> None:
    """Refuse to put a report where something else lives: only a marked report folder or an empty
    folder is replaced, so `--out` pointing at a file or a folder of one's own loses nothing."""
    state = folder_state(out, MARK)
    if state == "file":
        raise SettingError(f"`out` {out} is a file, not a report folder; give a new or empty folder")
    if state == "foreign":
        raise SettingError(f"`out` {out} holds files that are not an iqa report; give a new or empty folder")


# Tables that lay the runs of Tables 1, 2 out along one more dimension: with a single value of it they
# would repeat Tables 1, 2 row for row, so they are left out and the page says why.
ADDED_DIMENSION = {
    "table6_activations": (("act1", "act2"), "one activation pair"),
    "tableS1_regimes": (("regime",), "one regime"),
}


def _repeats_tables_1_2(name: str, runs: list[dict]) -> str | None:
    """Why the table would only repeat Tables 1, 2 (its dimension has one value), or None."""
    if name not in ADDED_DIMENSION:
        return None
    fields, what = ADDED_DIMENSION[name]
    values = {tuple(str(r.get(f)) for f in fields) for r in runs}
    return f"same rows as Tables 1, 2 ({what}: {'/'.join(next(iter(values)))})" if len(values) == 1 else None


def _tables(runs, folder: Path, summary: ReportSummary, page: _Page) -> None:
    (folder / "tables").mkdir(parents=True)
    for name, title, layout, select, needs, missing in TABLES:
        chosen = [r for r in runs if select(r)]
        if not chosen or (needs is not None and not any(needs(r) for r in chosen)):
            summary.notes.append(f"{title}: not written ({missing})")
            continue
        repeats = _repeats_tables_1_2(name, chosen)
        if repeats:
            summary.notes.append(f"{title}: not written ({repeats})")
            continue
        for fmt, suffix in (("md", "md"), ("csv", "csv"), ("latex", "tex")):
            path = folder / "tables" / f"{name}.{suffix}"
            path.write_text(results_table(chosen, layout, fmt))
            summary.tables.append(path)
        links = " ".join(f'<a href="tables/{name}.{s}">{s}</a>' for s in ("md", "csv", "tex"))
        page.tables.append((f"{title} ({links})", results_table(chosen, layout, "html")))


def _figures(runs, folder: Path, summary: ReportSummary, page: _Page, load, device: str, progress: bool) -> None:
    named: list[tuple[str, str, object]] = []  # (title, file name, figure)
    masking = [r for r in runs if masking_grid(r)]
    if any(masked(r) for r in masking):
        named.append(("SRCC against k: masking (Table 4)", "srcc_vs_k_masking", figures.ablation_figure(masking, "masking")))
    else:
        summary.notes.append("SRCC against k (masking): no masking runs")
    dropout = [r for r in runs if dropout_grid(r)]
    if dropout:
        named.append(("SRCC against k: dropout (Table S3)", "srcc_vs_k_dropout", figures.ablation_figure(dropout, "dropout")))
    else:
        summary.notes.append("SRCC against k (dropout): no dropout runs")
    lora = [r for r in runs if within(r) and plain(r) and r["regime"] == "lora"]
    if len({r["lora_rank"] for r in lora}) > 1:
        named.append(("SRCC against the LoRA rank (Fig. S4)", "srcc_vs_lora_rank", figures.ablation_figure(lora, "lora_rank")))
    else:
        summary.notes.append("SRCC against the LoRA rank: LoRA runs of fewer than two ranks (iqa finetune --lora-rank)")
    gates = figures.gate_figures([r for r in runs if plain(r)])
    named += [(f"Gate weight s(g): {n}", n, fig) for n, fig in gates]
    if not gates:
        summary.notes.append("gate weights (Fig. 2, S7): no gated runs without ablation")
    sweep = [r for r in runs if len(r["layers"] or ()) == 1]  # iqa head --layer all
    if len({r["layers"][0] for r in sweep}) > 1:
        named.append(("SRCC against layer (Fig. S5)", "srcc_vs_layer", figures.layer_figure(sweep)))
    fused = stages.stage_weight_figures(runs)
    named += [(f"Stage weights against quality (SMART-IQA Fig. 4): {n}", n, fig) for n, fig in fused]
    if not fused:
        summary.notes.append("stage weights against quality: no fused runs (iqa head --layers 4,3 --fuse attention)")
    trained = [r for r in runs if r["head"] not in PROBES]  # a probe has no epochs and no hidden features
    named += [(f"Learning curves: {n}", n, fig) for n, fig in figures.learning_curve_figures(trained)]
    for title, name, fig in named:
        _add_figure(fig, folder, name, title, summary, page)
    if load is not None:
        _tsne_figures(trained, load, folder, device, progress, summary, page)
        _stage_tsne_figures(runs, load, folder, progress, summary, page)


def _add_figure(fig, folder: Path, name: str, title: str, summary: ReportSummary, page: _Page) -> None:
    png, pdf = figures.save(fig, folder / "figures", name)
    summary.figures += [png, pdf]
    page.figures.append((title, f'<a href="figures/{pdf.name}"><img src="figures/{png.name}" alt="{html.escape(title)}"></a>'))


def _head_order(head: str) -> tuple:
    named = list(HEADS)
    return (named.index(head), "") if head in named else (len(named), head)


def _tsne_figures(runs, load: Loader, folder: Path, device: str, progress: bool, summary: ReportSummary, page: _Page) -> None:
    """Per (backbone, tag, dataset) of frozen runs without ablation: encoder, then each head, first seed.
    Runs on stored layers are left to the stage-wise t-SNE (`_stage_tsne_figures`)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if within(run) and plain(run) and run["regime"] == "frozen" and run["status"] == "done" and not run["layers"]:
            groups.setdefault((run["backbone"], run["tag"], run["train_dataset"]), []).append(run)
    if not groups:
        summary.notes.append("t-SNE: no finished frozen-backbone runs without ablation")
    for (backbone, tag, dataset), members in tqdm(sorted(groups.items(), key=str), desc="t-SNE", disable=not progress):
        seed = min(r["seed"] for r in members)
        chosen = sorted((r for r in members if r["seed"] == seed), key=lambda r: _head_order(r["head"]))
        label = f"{backbone_label(backbone, tag)}, {dataset}, seed {seed}"
        if len(chosen) > MAX_TSNE_HEADS:
            summary.notes.append(f"t-SNE {label}: showing {MAX_TSNE_HEADS} of {len(chosen)} heads")
            chosen = chosen[:MAX_TSNE_HEADS]
        try:
            cached = load(dataset, backbone, tag)
            features = [retrained_features(run, cached, cached, device) for run in chosen]
        except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
            summary.notes.append(f"t-SNE {label}: skipped ({str(error).strip(chr(39))})")
            continue
        raw_train, _, train_y = features[0]["train"]
        raw_test, _, test_y = features[0]["test"]
        panels = [("encoder only", tsne_2d(raw_test, seed), test_y, tsne_2d(raw_train, seed), train_y)]
        for run, f in zip(chosen, features):
            name = f"{run['head']} head (SRCC {f['retrained_srcc']:.3f} retrained, {run['best_srcc']:.3f} stored)"
            panels.append((name, tsne_2d(f["test"][1], seed), test_y, tsne_2d(f["train"][1], seed), train_y))
        title = f"t-SNE of the last hidden features: {label}"
        _add_figure(figures.tsne_figure(title, panels), folder, figures.stem("tsne", backbone, tag or "", dataset),
                    title, summary, page)


def _tuned_tsne_figures(runs, results_db: Path, folder: Path, summary: ReportSummary, page: _Page) -> None:
    """Per (backbone, tag, dataset, regime) of fine-tuning runs without ablation: the kept epoch's test
    embeddings, then each head's features (first seed), as `iqa finetune` stored them (heads/finetune/features.py)."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for run in runs:
        kept = tuned_features(run_weights_path(results_db, run["key"]).parent) if run.get("physical_batch") else None
        if kept is not None and within(run) and plain(run) and run["status"] == "done":
            groups.setdefault((run["backbone"], run.get("tag"), run["train_dataset"], run["regime"]), []).append((run, kept))
    for (backbone, tag, dataset, regime), members in sorted(groups.items(), key=str):
        seed = min(r["seed"] for r, _ in members)
        chosen = sorted(((r, f) for r, f in members if r["seed"] == seed), key=lambda m: _head_order(m[0]["head"]))
        chosen = chosen[:MAX_TSNE_HEADS]
        first = chosen[0][1]
        panels = [("encoder only", tsne_2d(first["embeddings"], seed), first["targets"], None, None)]
        panels += [(f"{r['head']} head (SRCC {r['best_srcc']:.3f})", tsne_2d(f["hidden"], seed), f["targets"], None, None)
                   for r, f in chosen]
        label = f"{backbone}{'@' + tag if tag else ''}, {dataset}, {regime}, seed {seed}"
        title = f"t-SNE of the tuned model's last hidden features (test split, kept epoch): {label}"
        _add_figure(figures.tsne_figure(title, panels), folder,
                    figures.stem("tsne_tuned", backbone, tag or "", dataset, regime), title, summary, page)


def _maps_over_training(runs, results_db: Path, folder: Path, summary: ReportSummary, page: _Page) -> None:
    """Fig. S6: the Grad-CAM maps a fine-tuning run kept every N steps (`iqa finetune --explain-every`), a strip each."""
    for run in runs:
        kept = kept_maps(maps_folder(run_weights_path(results_db, run["key"]).parent))
        if kept is None:
            continue
        names, steps, maps = kept
        label = f"{backbone_label(run['backbone'], run['tag'])}, {run['train_dataset']}, {run['regime']}, {run['head']}, seed {run['seed']}"
        title = f"Grad-CAM over training (Fig. S6): {label}"
        _add_figure(figures.maps_strip(title, names, steps, maps), folder,
                    figures.stem("gradcam_training", run["key"][:12]), title, summary, page)


def _stage_tsne_figures(runs, load: Loader, folder: Path, progress: bool, summary: ReportSummary, page: _Page) -> None:
    """Per (backbone, tag, dataset) whose stored layers runs trained on, where the file names give the
    distortion types (KADID-10k, the demo set): every stored layer's vectors, one t-SNE panel each."""
    groups = sorted({(r["backbone"], r["tag"], d) for r in runs if r["layers"] and r["regime"] == "frozen"
                     for d in (r["train_dataset"], r["test_dataset"])}, key=str)
    shown = 0
    for backbone, tag, dataset in tqdm(groups, desc="stage t-SNE", disable=not progress):
        label = f"{backbone_label(backbone, tag)}, {dataset}"
        try:
            cached = load(dataset, backbone, tag)
            types = distortion_types(dataset, cached.manifest.paths)
            if types is None:
                continue
            layers, rows = stages.stage_points(list(cached.fingerprint.get("layers", [])), cached.valid)
            panels = [(n, tsne_2d(cached.select_layers((n,)).embeddings[rows])) for n in layers]
        except ImportError as error:  # scikit-learn missing: the rest of the report stands
            summary.notes.append(f"stage t-SNE: skipped ({error})")
            return
        except (FileNotFoundError, ValueError, KeyError) as error:
            summary.notes.append(f"stage t-SNE {label}: skipped ({str(error).strip(chr(39))})")
            continue
        title = f"t-SNE of stored layer features by distortion type: {label} ({len(rows)} images)"
        _add_figure(stages.stage_tsne_figure(title, panels, [types[i] for i in rows]), folder,
                    figures.stem("tsne_stages", backbone, tag or "", dataset), title, summary, page)
        shown += 1
    if not shown:
        summary.notes.append("stage t-SNE (Life-IQA Fig. 10): no runs on stored layers of KADID-10k or the demo set")


def _scatter_figures(runs, load: Loader, results_db: Path, folder: Path, summary: ReportSummary, page: _Page) -> None:
    """Per (backbone, tag, train->test, layers) of finished frozen runs without ablation: each model, first seed."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if plain(run) and run["regime"] == "frozen" and run["status"] == "done":
            key = (run["backbone"], run["tag"], run["train_dataset"], run["test_dataset"], run["layers"] or ())
            groups.setdefault(key, []).append(run)
    if not groups:
        summary.notes.append("prediction against MOS: no finished frozen-backbone runs without ablation")
    for (backbone, tag, train, test, layers), members in sorted(groups.items(), key=str):
        seed = min(r["seed"] for r in members)
        chosen = sorted((r for r in members if r["seed"] == seed), key=lambda r: _head_order(r["head"]))
        data = train if train == test else f"{train}->{test}"
        label = f"{backbone_label(backbone, tag)}{' layers ' + '+'.join(map(str, layers)) if layers else ''}, {data}, seed {seed}"
        if len(chosen) > MAX_SCATTER_MODELS:
            summary.notes.append(f"prediction against MOS {label}: showing {MAX_SCATTER_MODELS} of {len(chosen)} models")
            chosen = chosen[:MAX_SCATTER_MODELS]
        heads = [r["head"] for r in chosen]
        try:
            cached = {name: load(name, backbone, tag) for name in (train, test)}
            panels = [(f"{r['head']}{' ' + r['key'][:6] if heads.count(r['head']) > 1 else ''} (recorded {r['best_srcc']:.3f})",
                       kept_predictions(r, results_db, cached[train], cached[train] if train == test else cached[test]))
                      for r in chosen]
        except (FileNotFoundError, ValueError, KeyError) as error:
            summary.notes.append(f"prediction against MOS {label}: skipped ({str(error).strip(chr(39))})")
            continue
        title = f"Prediction against MOS on the test split: {label}"
        _add_figure(scatter_figure(title, panels, cached[test]), folder,
                    figures.stem("scatter", backbone, tag or "", data, *layers), title, summary, page)


def _paired_tables(runs, pairs: list[tuple[str, str]], load: Loader | None, results_db: Path | None, folder: Path,
                   summary: ReportSummary, page: _Page) -> None:
    """paired_<a>_<b>.md|csv and a table on the page per pair of run keys; a pair that cannot be compared is a note."""
    for key_a, key_b in pairs:
        if load is None or results_db is None:
            summary.notes.append(f"paired comparison {key_a} vs {key_b}: no embedding cache and results database given")
            continue
        try:
            result = compare_keys(runs, key_a, key_b, Path(results_db), load)
        except (LookupError, ValueError, FileNotFoundError) as error:
            summary.notes.append(f"paired comparison {key_a} vs {key_b}: skipped ({str(error).strip(chr(39))})")
            continue
        for fmt in ("md", "csv"):
            path = folder / f"{figures.stem('paired', key_a, key_b)}.{fmt}"
            path.write_text(paired_table(result, fmt))
            summary.tables.append(path)
        page.tables.append((f"Paired comparison: {html.escape(key_a)} (A) and {html.escape(key_b)} (B)",
                            paired_table(result, "html")))


def _profile(runs, backbones: list[str], folder: Path, device: str, summary: ReportSummary, page: _Page,
             load: Loader | None = None) -> None:
    if not backbones:
        summary.notes.append("compute profile: no backbone named (--profile siglip2,...)")
        return
    rows = []
    for backbone in backbones:
        own = [r for r in runs if r["backbone"] == backbone]
        for tag in sorted({r["tag"] for r in own}, key=str) or [None]:
            tagged = [r for r in own if r["tag"] == tag]
            heads = sorted({r["head"] for r in tagged if r["head"] not in PROBES}, key=_head_order) or list(HEADS)
            rows += profile_backbone(backbone, heads, device, tag, _checkpoint_of(tagged, load))
    (folder / "profile.md").write_text(profile_table(rows, "md"))
    (folder / "profile.csv").write_text(profile_table(rows, "csv"))
    page.profile = profile_table(rows, "html")


def _checkpoint_of(runs: list[dict], load: Loader | None) -> str | None:
    """The weights a tagged store was embedded with (its fingerprint's model_id), where the store can be read."""
    if not runs or load is None or runs[0]["tag"] is None or tag_weights(runs[0]["tag"]) != "pretrained":
        return None
    try:
        return load(runs[0]["train_dataset"], runs[0]["backbone"], runs[0]["tag"]).fingerprint.get("model_id")
    except (FileNotFoundError, ValueError):  # a store moved or rebuilt since: the registry's model is profiled
        return None


def default_profile(runs: list[dict]) -> list[str]:
    """The registry backbones the runs used."""
    return sorted({r["backbone"] for r in runs if r["backbone"] in BACKBONES})


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0 1.5em;
font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}
td.not-run,td.incomplete{color:#999}td.diverged{color:#b00}img{max-width:100%;border:1px solid #eee}
caption{caption-side:bottom;font-size:12px;color:#666;text-align:left}"""


def _index_html(runs: list[dict], page: _Page, notes: list[str]) -> str:
    regimes = sorted({r["regime"] for r in runs})
    parts = [
        "<h1>iqa report</h1>",
        f"<p>{len(runs)} runs ({sum(r['status'] == 'done' for r in runs)} finished, "
        f"{sum(r['status'] != 'done' for r in runs)} diverged); regimes: {', '.join(regimes)}.</p>",
    ]
    if page.paper:
        parts += ['<h2>Beside the paper</h2><p><a href="paper.html">paper.html</a>: every published cell beside '
                  'the measured one (<a href="paper.md">md</a> <a href="paper.csv">csv</a>)</p>', "<ul>",
                  *(f"<li>{html.escape(line)}</li>" for line in page.paper), "</ul>"]
    if page.explanations is not None:
        parts.append(f'<h2>Explanations</h2><p><a href="explanations.html">explanations.html</a>: Grad-CAM maps and '
                     f'their pointing game and deletion AUC for {html.escape(", ".join(page.explanations))}</p>')
    parts.append("<h2>Tables</h2>")
    for title, table in page.tables:
        parts += [f"<h3>{title}</h3>", table]
    parts.append("<h2>Figures</h2>")
    for title, img in page.figures:
        parts += [f"<h3>{html.escape(title)}</h3>", f"<p>{img}</p>"]
    if page.profile:
        parts += ["<h2>Compute profile (Table S5)</h2>",
                  '<p>Batch 1; MACs counted with torch FlopCounterMode (FLOPs / 2) <a href="profile.md">md</a> '
                  '<a href="profile.csv">csv</a></p>', page.profile]
    if notes:
        parts += ["<h2>Not in this report</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes), "</ul>"]
    return html_page("iqa report", STYLE, parts)
