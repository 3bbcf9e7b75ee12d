"""`iqa demo`: the whole two-stage pipeline, offline, on the demo set.

1. Build the demo set (data/demo.py) from scikit-image's bundled photographs, unless it exists.
2. Prepare its manifest through the generic csv adapter, with the source photo as content group.
3. Extract two backbones into the cache: `nss` (BRISQUE features, no weights) and a tiny
   random-init ViT (`dinov2@tiny`) as the control: a network that has learned nothing, so any
   margin over it is what real image statistics buy.
4. Train the baseline / sig / gated heads over the paper's seeds from the cache, on the
   content-held-out split (test photos are never seen in training), and lay out the results.
5. A small layer sweep: a tiny random-init Swin (`swin-t@tiny`) extracted with every stage
   stored (`--layers all`, its own store: the ViT's keeps its fingerprint and its runs their keys),
   a baseline head per stage and seed (`iqa head --layer all`).
6. Write the report of all those runs (tables, figures with SRCC against layer and prediction
   against MOS, index.html) to <cache>/report; the table returned is step 4's.

Every stage writes under the cache and resumes: running the demo again reuses the set, the
stores and every finished run in the results database.
"""

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from iqa.data.demo import DATASET
from iqa.data.splits import PAPER_SEEDS

HEADS = ("baseline", "sig", "gated")
# (backbone, weights): what each store holds
BACKBONES = (("nss", "pretrained"), ("dinov2", "tiny"))
SWEEP_BACKBONE = "swin-t"  # tiny: two stages, each stored, one baseline head per stage
HEAD_DTYPE = "float32"  # on a GPU too: the demo's runs keep the keys they were first trained under


@dataclass
class DemoResult:
    table: str  # Markdown, mean ± std over seeds
    records: list[dict]  # one per run of step 4, as stored in the results database
    sweep: list[dict]  # the layer sweep's runs
    cache: Path
    db: Path
    report: Path  # folder holding index.html
    model: Path  # the best NSS run, exported
    sample: tuple[str, float]  # (demo image, its score by that model)


def run_demo(
    cache: Path,
    seeds: tuple[int, ...] = PAPER_SEEDS,
    epochs: int = 30,
    device: str = "cpu",
    tsne: bool = True,
    progress: bool = True,
) -> DemoResult:
    # Imported here: scikit-image and the model code are slow to import for `iqa --help`.
    from iqa.cache.load import load_cached
    from iqa.data.demo import DEMO_DIR, LABELS_FILE, make_demo
    from iqa.data.prepare import prepare_dataset
    from iqa.extract.registry import weights_tag
    from iqa.extract.run import ExtractRequest, extract_dataset
    from iqa.heads.training.grid_request import GridRequest, train_grid
    from iqa.heads.report.build import default_profile, write_report
    from iqa.cache.results import default_db
    from iqa.heads.report.tables import results_table

    source = cache / DEMO_DIR
    if not (source / LABELS_FILE).exists():
        make_demo(source)
    prepare_dataset(
        "csv", source, cache, labels=LABELS_FILE, image_col="image", score_col="score",
        score_range="0,1", group_col="ref", name=DATASET,
    )
    db = default_db(cache)
    records = []
    for backbone, weights in BACKBONES:
        summary = extract_dataset(ExtractRequest(cache, DATASET, backbone, weights=weights, progress=progress), device=device)
        if not summary.ok:
            raise RuntimeError(f"extraction of {backbone} over the demo set failed: {summary}")
        request = GridRequest(backbone, datasets=(DATASET,), heads=HEADS, seeds=seeds, epochs=epochs,
                              split_by="group", tag=weights_tag(weights), dtype=HEAD_DTYPE)
        records += train_grid(request, cache, device, progress=progress)
    sweep = layer_sweep(cache, seeds, epochs, device, progress)
    report = write_report(
        records + sweep, cache / "report", partial(load_cached, cache), default_profile(records), device, tsne=tsne,
        progress=progress, results_db=db,
    )
    model, sample = export_best_nss(cache, db, records)
    return DemoResult(results_table(records, layout="backbones"), records, sweep, cache, db, report.out, model, sample)


def layer_sweep(cache: Path, seeds: tuple[int, ...], epochs: int, device: str, progress: bool) -> list[dict]:
    """Step 5: every stage of the tiny Swin stored in one pass, then a baseline head per stage and seed."""
    from iqa.extract.run import ExtractRequest, extract_dataset
    from iqa.heads.training.grid_request import GridRequest, train_grid

    extraction = ExtractRequest(cache, DATASET, SWEEP_BACKBONE, weights="tiny", layers="all", progress=progress)
    summary = extract_dataset(extraction, device=device)
    if not summary.ok:
        raise RuntimeError(f"extraction of {SWEEP_BACKBONE} over the demo set failed: {summary}")
    request = GridRequest(SWEEP_BACKBONE, datasets=(DATASET,), seeds=seeds, epochs=epochs, split_by="group",
                          tag="tiny", layer="all", dtype=HEAD_DTYPE)
    return train_grid(request, cache, device, progress=progress)


def export_best_nss(cache: Path, db: Path, records: list[dict]) -> tuple[Path, tuple[str, float]]:
    """Export the NSS run of best test SRCC (to <cache>/models/<key prefix>, reused if there) and score one demo image."""
    from iqa.cache.manifest import read_manifest
    from iqa.heads.saved.export import export_run
    from iqa.heads.saved.model import load_model

    best = max((r for r in records if r["backbone"] == "nss" and r["status"] == "done"), key=lambda r: r["best_srcc"])
    folder = cache / "models" / best["key"][:12]
    if not (folder / "config.json").exists():
        if folder.is_dir() and not folder.is_symlink():  # half an export, killed before iqa exported atomically
            shutil.rmtree(folder)
        export_run(cache, db, best, folder)
    manifest = read_manifest(cache, DATASET)
    image = Path(manifest.image_root) / manifest.paths[0]
    return folder, (str(image), float(load_model(folder).score([image])[0]))
