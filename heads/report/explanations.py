"""The report's explanations page: exported models' Grad-CAM maps on their own test images, and each
model's explanations measured (pointing game, deletion AUC) in one table.

- Maps: models that share a test set (dataset, split rule, seed) share their images: EXPLAINED_IMAGES of
  the test images on disk, spread over the target range (lowest, middle, highest), each on one page
  with every model's map of the score side by side, as `iqa explain --compare` draws them
  (heads/explain/maps.py). A model whose test images are not on disk (its dataset is not prepared in this
  cache, or the images moved) gets a note instead.
- Table: every model evaluated on one grid set (heads/explain/evaluate.py), the default set in the cache
  (built once) unless another is given: the numbers `iqa explain MODEL --evaluate --json` prints.

Layout inside the report folder: `explanations.html`, `explanations/<n>-<dataset>/` (the pages and the
raw maps, as `iqa explain` writes them), `explanations/evaluation.md|csv`, `explanations/deletion.png|pdf` (the
deletion curves).
"""

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iqa.cache.location import backbone_label
from iqa.cache.manifest import read_manifest
from iqa.data.gridpg import grid_set_or_default, read_gridpg
from iqa.data.splits import split_indices
from iqa.heads.explain.attribution import explainable_blocks
from iqa.heads.explain.maps import Subject, explain_files, model_subject
from iqa.heads.explain.evaluate import evaluate
from iqa.heads.report.figures import deletion_figure, save
from iqa.heads.report.page import csv_text, html_page, text_table

PAGE = "explanations.html"
FOLDER = "explanations"
EXPLAINED_IMAGES = 3
DELETION_FIGURE = "deletion"
COLUMNS = ("model", "folder", "backbone", "head", "trained on", "tested on", "pointing_game", "deletion_auc",
           "deletion_auc_random", "grids")


@dataclass
class ExplainedModels:
    """The models the page shows (loaded, so a bad folder is refused before the report is built), the
    cache their datasets are prepared in, and the grid set of the table."""

    folders: list[Path]
    subjects: list[Subject]
    cache: Path
    grid_set: Path
    notes: list[str] = field(default_factory=list)  # models that cannot be explained at all, and why


def load_explained(folders: list[Path], cache: Path, grid_set: Path | None = None, device: str = "cpu",
                   progress: bool = True) -> ExplainedModels:
    """Each folder as a model (refusing a missing or altered file, as `iqa score` does); a model with no
    spatial features (NSS, CleanDIFT) is kept out with a note. Names are the folder names, or the paths
    as given where two folders share a name. The grid set is `grid_set`, else the cache's default
    (built here on first use); one without its labels is refused."""
    folders = [Path(f) for f in folders]
    names = [f.name for f in folders]
    grid_set = grid_set_or_default(cache, grid_set, progress)
    read_gridpg(grid_set)
    chosen = ExplainedModels([], [], Path(cache), grid_set)
    for folder in folders:
        subject = model_subject(folder, device)
        if names.count(folder.name) > 1:
            subject.name = str(folder)
        try:
            explainable_blocks(subject.backbone)
        except ValueError as error:
            chosen.notes.append(f"{subject.name}: not explained ({error})")
            continue
        chosen.folders.append(folder)
        chosen.subjects.append(subject)
    return chosen


def shown_images(subject: Subject, cache: Path) -> tuple[str, list[tuple[Path, float]]]:
    """(dataset, [(image path, target)]): up to EXPLAINED_IMAGES of the model's test images present on disk, spread
    evenly over their targets; the test set is the seed's split within a dataset, all of it across
    datasets (as training evaluated). Raises FileNotFoundError when none is on disk."""
    training = subject.config.training
    dataset = training.test_dataset
    try:
        manifest = read_manifest(cache, dataset)
    except (FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(f"its test set {dataset} is not prepared in {cache} ({error})") from None
    if dataset == training.train_dataset:
        _, rows = split_indices(manifest.paths, training.seed, by=training.split_by or "random",
                                groups=manifest.groups, sets=manifest.extras.get("set"))
    else:
        rows = np.arange(len(manifest))
    root = Path(manifest.image_root)
    present = [r for r in rows if (root / manifest.paths[r]).is_file()]
    if not present:
        raise FileNotFoundError(f"none of its {len(rows)} test images of {dataset} is on disk under {root}")
    present.sort(key=lambda r: (manifest.targets[r], manifest.paths[r]))
    picks = sorted(set(np.linspace(0, len(present) - 1, EXPLAINED_IMAGES).round().astype(int)))
    return dataset, [(root / manifest.paths[present[i]], float(manifest.targets[present[i]])) for i in picks]


def write_explanations(models: ExplainedModels, folder: Path, style: str = "", progress: bool = True) -> list[str]:
    """explanations.html and its files into the report folder being built (bars over each group's images and
    each model's grids on stderr with `progress`); the notes (what is not shown)."""
    notes = list(models.notes)
    groups: dict[tuple, list[Subject]] = {}  # (dataset, images) -> the models tested on them
    for subject in models.subjects:
        try:
            dataset, images = shown_images(subject, models.cache)
        except FileNotFoundError as error:
            notes.append(f"{subject.name}: no maps, {error}")
            continue
        groups.setdefault((dataset, tuple(images)), []).append(subject)
    sections = []
    for index, ((dataset, images), subjects) in enumerate(groups.items()):
        out = folder / FOLDER / f"{index}-{dataset}"
        done = explain_files(subjects, [path for path, _ in images], out, targets=[target for _, target in images],
                             progress=progress)
        names = ", ".join(html.escape(s.name) for s in subjects)
        parts = [f"<h3>Test images of {html.escape(dataset)}: {names}</h3>"]
        for item, (_, target) in zip(done, images):
            if item.reason:
                notes.append(f"{item.path}: no maps ({item.reason})")
                continue
            page, name = Path(item.page).relative_to(folder).as_posix(), html.escape(Path(item.path).name)
            parts.append(f'<p>{name} (target {target:.3f})<br><img src="{page}" alt="{names} on {name}"></p>')
        sections.append("\n".join(parts))
    grid_set = models.grid_set
    measured = [evaluate(subject, grid_set, progress=progress).as_dict() for subject in models.subjects]
    rows = [evaluation_row(f, s, m) for f, s, m in zip(models.folders, models.subjects, measured)]
    (folder / FOLDER).mkdir(parents=True, exist_ok=True)
    if measured:
        save(deletion_figure({s.name: m for s, m in zip(models.subjects, measured)}), folder / FOLDER, DELETION_FIGURE)
    (folder / FOLDER / "evaluation.csv").write_text(evaluation_table(rows, "csv"))
    (folder / FOLDER / "evaluation.md").write_text(evaluation_table(rows, "md"))
    (folder / PAGE).write_text(_page(rows, grid_set, sections, notes, style))
    return notes


def evaluation_row(folder: Path, subject: Subject, measured: dict) -> dict:
    config = subject.config
    return {"model": subject.name, "folder": str(folder), "backbone": backbone_label(config.backbone.key, config.backbone.tag),
            "head": config.head.head, "trained on": config.training.train_dataset,
            "tested on": config.training.test_dataset, **{k: measured[k] for k in COLUMNS[6:]}}


def evaluation_table(rows: list[dict], fmt: str) -> str:
    """csv (full precision) or md / html (3 and 4 decimals)."""
    if fmt == "csv":
        return csv_text([list(COLUMNS), *([r[c] for c in COLUMNS] for r in rows)])
    cells = [[str(r[c]) for c in COLUMNS[:6]] + [f"{r['pointing_game']:.3f}", f"{r['deletion_auc']:.4f}",
                                                 f"{r['deletion_auc_random']:.4f}", str(r["grids"])] for r in rows]
    return text_table(list(COLUMNS), cells, fmt)


def _page(rows: list[dict], grid_set: Path, sections: list[str], notes: list[str], style: str) -> str:
    parts = [
        '<h1>Explanations</h1><p><a href="index.html">back to the report</a></p>',
        f"<h2>Measured on {html.escape(str(grid_set))}</h2>",
        "<p>Pointing game: share of the positive Grad-CAM mass for \"low quality\" inside each grid's one "
        "distorted cell (chance 0.25; grids without positive attribution discarded). Deletion: area under the "
        "predicted score as the most attributed 16x16 blocks are set to zero, beside the same for random block "
        "orders (lower than random is faithful). "
        f'(<a href="{FOLDER}/evaluation.md">md</a> <a href="{FOLDER}/evaluation.csv">csv</a>)</p>',
        evaluation_table(rows, "html"),
        f'<p><img src="{FOLDER}/{DELETION_FIGURE}.png" alt="deletion curves"></p>' if rows else "",
        "<h2>Grad-CAM of the score (what raises quality)</h2>",
        *sections,
    ]
    if notes:
        parts += ["<h2>Not shown</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes), "</ul>"]
    return html_page("iqa report: explanations", style, parts)
