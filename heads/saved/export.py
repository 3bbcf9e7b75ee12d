"""`iqa export`: a finished run (cached head or fine-tuning) as a self-contained model folder.

The folder holds config.json (backbone and how its weights were obtained, the preprocessing recipe
its fingerprint recorded, the head, the training set's target scale and its map back to MOS, split,
seed, selection rule, metrics, package versions), model.safetensors (the kept epoch's head), for a
fine-tuning run its tuning (adapter/ in PEFT's format, or backbone.safetensors), every file checked
by sha256 on load, and README.md, a model card with the Hugging Face metadata header. `iqa.load_model` reads it back.
"""

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np

from iqa.cache.atomic import building_folder
from iqa.cache.location import backbone_label
from iqa.cache.store import EmbeddingStore, store_path
from iqa.cache.manifest import file_sha256, read_manifest
from iqa.heads.training.config import complete_run
from iqa.extract.registry import tag_weights
from iqa.heads.saved.config import (BackboneConfig, Bundle, HeadConfig, Metrics, ModelConfig, MosMap, Targets,
                                    TrainingConfig, Tuning, WeightsFile, write_config)
from iqa.heads.saved.weights import ADAPTER_DIR, BACKBONE_FILE, FINGERPRINT_FILE, load_head, run_weights_path

WEIGHTS_FILE = "model.safetensors"  # the head, under the name the Hugging Face Hub shows as a model's weights
CARD_FILE = "README.md"
PACKAGES = ("torch", "transformers", "numpy", "safetensors")


def find_run(runs: list[dict], prefix: str) -> dict:
    """The run whose key starts with `prefix`; refuses none or several."""
    found = [r for r in runs if r["key"].startswith(prefix)]
    if not found:
        raise LookupError(f"no run key starts with {prefix!r}; `iqa results --runs` lists them")
    if len(found) > 1:
        raise LookupError(f"{len(found)} run keys start with {prefix!r}; give more of the key")
    return found[0]


def best_run(runs: list[dict], dataset: str, backbone: str | None = None, head: str | None = None,
             select: str | None = None) -> tuple[dict, str]:
    """The run to keep for `dataset`, and the rule that chose it: among finished runs trained and tested on
    it (of `backbone`, `head`, `select` where given), the highest validation SRCC at the kept epoch where every
    candidate has a validation part (no test image chooses), else the highest test SRCC (optimistic: said so)."""
    found = [r for r in runs if r["train_dataset"] == dataset == r["test_dataset"] and r["status"] == "done"
             and r.get("best_srcc") is not None and r["best_srcc"] == r["best_srcc"]
             and all(value is None or r.get(field) == value for field, value in
                     (("backbone", backbone), ("head", head), ("select", select)))]
    if not found:
        wanted = ", ".join(f"{f} {v}" for f, v in (("backbone", backbone), ("head", head), ("select", select)) if v)
        raise LookupError(f"no finished run trained and tested on {dataset}{' with ' + wanted if wanted else ''}; "
                          "`iqa results --runs` lists them")
    validated = all((r.get("curves") or {}).get("val_srcc") for r in found)
    if validated:
        def val_at_kept(run):
            return run["curves"]["val_srcc"][run["best_epoch"] - 1]
        chosen = max(found, key=lambda r: (val_at_kept(r), r["key"]))
        return chosen, (f"the highest validation SRCC at the kept epoch ({val_at_kept(chosen):.4f}) of {len(found)} "
                        "runs: no test image chose it")
    chosen = max(found, key=lambda r: (r["best_srcc"], r["key"]))
    return chosen, (f"the highest test SRCC ({chosen['best_srcc']:.4f}) of {len(found)} runs: the test set chose it, "
                    "so its test numbers are optimistic (train with --select val for an honest choice)")


def mos_map(scores: np.ndarray, targets: np.ndarray) -> MosMap:
    """mos = scale * target + offset, fitted on the training set (exact for its linear normalisations)."""
    scale, offset = np.polyfit(targets, scores, 1)
    return MosMap(float(scale), float(offset))


def export_run(cache: Path, db_path: Path, run: dict, out: Path, bundle: bool = False) -> Path:
    """Write `run`'s model folder to `out` (a new or empty folder: nothing iqa did not write is replaced).
    It is built in a temporary folder beside `out` and renamed when complete: a killed or failed export
    leaves no `out` (the next export removes the temporary), never half a model.

    The folder names its base backbone weights by Hugging Face id and revision, never by a path of this
    machine; `bundle` copies the weights themselves into `backbone/` (a local checkpoint's folder or file,
    or a hub checkpoint from this machine's Hugging Face cache), so the folder loads anywhere, offline."""
    run = complete_run(run)
    weights = run_weights_path(db_path, run["key"])
    if not weights.exists():
        raise FileNotFoundError(f"run {run['key'][:12]} kept no weights ({weights} is missing); train it again")
    load_head(weights)  # refuses a head saved without the input statistics it was trained with
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    manifest = read_manifest(cache, run["train_dataset"])
    kept = weights.parent
    if (kept / FINGERPRINT_FILE).is_file():  # a fine-tuning run: the base backbone it started from
        fingerprint = json.loads((kept / FINGERPRINT_FILE).read_text())
    else:
        fingerprint = EmbeddingStore(store_path(cache, run["train_dataset"], run["backbone"], run["tag"])).fingerprint
        if "tuned" in fingerprint:  # the folder would rebuild the base backbone, not the tuned one the head read
            raise ValueError(f"run {run['key'][:12]} is a head on {backbone_label(run['backbone'], run['tag'])}, a fine-tuned "
                             "backbone's store: export the fine-tuning run itself, whose folder carries its tuning")
    with building_folder(out) as building:
        write_model_folder(building, run, weights, fingerprint, manifest, bundle)
    return out


BUNDLE_DIR = "backbone"
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # weights formats that run code on load: never copied or read


def local_checkpoint(model_id: str | None) -> Path | None:
    """The local folder or file a backbone was loaded from, or None for a hub id (or none at all)."""
    return Path(model_id) if model_id and Path(model_id).is_absolute() else None


def bundle_backbone(out: Path, fingerprint: dict) -> Bundle:
    """Copy the base weights into out/backbone/ (safetensors and configs only)."""
    model_id, local = fingerprint.get("model_id"), local_checkpoint(fingerprint.get("model_id"))
    if local is None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            local = Path(snapshot_download(model_id, revision=fingerprint.get("revision"), local_files_only=True))
        except (LocalEntryNotFoundError, ValueError) as error:
            raise ValueError(f"cannot bundle {model_id}: its weights are not in this machine's Hugging Face "
                                    f"cache ({type(error).__name__}); export without bundling") from None
    if not local.exists():
        raise ValueError(f"cannot bundle the backbone: {local}, where it was loaded from, is gone")
    target = out / BUNDLE_DIR
    target.mkdir()
    sources = [p for p in sorted(local.rglob("*")) if p.is_file()] if local.is_dir() else [local]
    for path in sources:
        if path.suffix in PICKLED:
            continue
        relative = path.relative_to(local) if local.is_dir() else Path(path.name)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / relative)  # the content behind a hub cache's symlinks
    files = {str(p.relative_to(out)): file_sha256(p) for p in sorted(target.rglob("*")) if p.is_file()}
    return Bundle(BUNDLE_DIR if local.is_dir() else f"{BUNDLE_DIR}/{local.name}", files)


def write_model_folder(out: Path, run: dict, weights: Path, fingerprint: dict, manifest, bundle: bool = False) -> None:
    kept = weights.parent
    shutil.copyfile(weights, out / WEIGHTS_FILE)
    if (kept / ADAPTER_DIR).is_dir():
        shutil.copytree(kept / ADAPTER_DIR, out / ADAPTER_DIR)
    if (kept / BACKBONE_FILE).is_file():
        shutil.copyfile(kept / BACKBONE_FILE, out / BACKBONE_FILE)
    tuned = {str(path.relative_to(out)): file_sha256(path)
             for path in sorted([*(out / ADAPTER_DIR).rglob("*"), out / BACKBONE_FILE]) if path.is_file()}
    config = ModelConfig(
        run_key=run["key"],
        backbone=BackboneConfig(
            key=run["backbone"], tag=run["tag"], weights=tag_weights(run["tag"]),
            **{k: fingerprint.get(k) for k in ("revision", "weights_sha256", "pooling", "dim", "resolution",
                                                "preprocess", "resample", "preprocessing", "compute_dtype")},
            tuning=Tuning(run.get("regime", "frozen"), run.get("lora_rank"), tuned),
            **backbone_source(out, run, fingerprint, bundle),
            layers=list(run["layers"]) if run["layers"] else None,  # the head reads these stored layers
            spatial=run.get("spatial")),
        head=HeadConfig(**{k: run[k] for k in ("head", "act1", "act2", "mask_k", "dropout", "keep", "l2norm")},
                        probe=run["curves"].get("probe"), fuse=run["fuse"] or None,
                        **{k: run.get(k) for k in ("prompts", "prompt_pairs", "template", "context")}),  # a text head's
        training=TrainingConfig(**{k: run[k] for k in (
            "train_dataset", "test_dataset", "split_by", "seed", "epochs", "lr", "batch_size", "select", "val_fraction",
            "regime", "backbone_lr", "physical_batch", "accumulate")}),
        targets=Targets(manifest.score_scale, mos_map(manifest.scores, manifest.targets)),
        metrics=Metrics(**{k: run[k] for k in ("best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")}),
        weights=WeightsFile(WEIGHTS_FILE, file_sha256(out / WEIGHTS_FILE)),
        packages={name: version(name) for name in PACKAGES},
    )
    write_config(out, config.to_dict())
    (out / CARD_FILE).write_text(model_card(config))


def backbone_source(out: Path, run: dict, fingerprint: dict, bundle: bool) -> dict:
    """Where a loader finds the base weights: the hub id (kept), a bundled copy, or, for a local checkpoint
    not bundled, only its name (a path of this machine would not exist on the next)."""
    local = local_checkpoint(fingerprint.get("model_id"))
    fields = {"model_id": local.name if local else fingerprint.get("model_id"), "local_checkpoint": bool(local)}
    if bundle and tag_weights(run["tag"]) == "pretrained":  # random weights rebuild from the registry: none to carry
        fields["bundled"] = bundle_backbone(out, fingerprint)
    return fields


def card_header(config: ModelConfig) -> str:
    """The model card's YAML header as the Hugging Face Hub reads it: library, tags, datasets, and the
    test metrics with their values (model-index)."""
    from huggingface_hub import EvalResult, ModelCardData

    t, m = config.training, config.metrics
    results = [EvalResult(task_type="image-quality-assessment", task_name="No-reference image quality assessment",
                          dataset_type=t.test_dataset, dataset_name=t.test_dataset, metric_type=metric,
                          metric_name=metric.upper(), metric_value=round(float(value), 4))
               for metric, value in (("srcc", m.best_srcc), ("plcc", m.best_plcc)) if value is not None]
    data = ModelCardData(library_name="iqa", tags=["image-quality-assessment", "no-reference-iqa", config.backbone.key],
                         datasets=sorted({t.train_dataset, t.test_dataset}), metrics=["srcc", "plcc"],
                         model_name=config.label, eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n\n"


def model_card(config: ModelConfig) -> str:
    b, h, t, m = config.backbone, config.head, config.training, config.metrics
    untrained = {"tiny": "a tiny random-init test model", "random-init": "a random-init model"}.get(b.weights)
    notes = [f"The backbone is {untrained}: it rebuilds deterministically from its config, not from pretrained weights."] if untrained else []
    regime = b.tuning.regime
    if regime != "frozen":
        notes.append(f"The backbone was fine-tuned end to end ({regime}"
                     f"{', rank ' + str(b.tuning.lora_rank) if regime == 'lora' else ''}); its tuning is in this "
                     f"folder ({'adapter/, PEFT format' if regime == 'lora' else 'backbone.safetensors'}) and is applied on load.")
    if h.fuse:
        notes.append(f"The head weighs the stored stages {b.layers} per image ({h.fuse} fusion"
                     f"{f', location by location on their {b.spatial} x {b.spatial} maps' if b.spatial else ''}) "
                     "before the head reads them; the weights come from the deepest stage.")
    if h.prompt_pairs is not None:
        learned = f", behind {h.context} context vectors learned per prompt (CLIP-IQA+)" if h.context else ""
        notes.append(f"The head is the backbone's own text tower: the image's two-way softmax against each pair of the "
                     f"`{h.prompts}` prompts, averaged over pairs (CLIP-IQA){learned}; its text embeddings, logit "
                     "scale and bias are in head.safetensors.")
    elif h.probe:
        chosen = {k: v for k, v in h.probe.items() if k != "cv_srcc"}
        notes.append(f"The head is a {h.head} probe fitted in closed form, {chosen} chosen by "
                     "cross-validation on the training rows; it has no epochs.")
    elif t.select == "test":
        notes.append("The epoch was chosen by best test SRCC (the paper's protocol): the test metrics are optimistic.")
    trained = h.head != "zeroshot"  # a zero-shot head learns nothing: no epoch, no training rows
    rows = "every image" if t.seed is None else f"the test rows of seed {t.seed} ({t.split_by} split)"
    return card_header(config) + "\n".join([
        f"# {backbone_label(b.key, b.tag)} + {h.head} head, {'trained' if trained else 'evaluated'} on {t.train_dataset}",
        "",
        f"Backbone: {b.key} weights from {'the local checkpoint ' if b.local_checkpoint else ''}"
        f"`{b.model_id}`{' (bundled in this folder)' if b.bundled else ''}, a {b.dim}-wide embedding at {b.resolution} px.",
        "",
        f"Run `{config.run_key}`; seed {t.seed}, {t.split_by} split, epoch {m.best_epoch} of {t.epochs} kept "
        f"by the `{t.select}` rule." if trained else f"Run `{config.run_key}`: zero-shot, nothing trained; "
        f"evaluated on {rows} of {t.test_dataset}.",
        "",
        f"| test set | SRCC | PLCC |\n|---|---|---|\n| {t.test_dataset} | {m.best_srcc:.4f} | {m.best_plcc:.4f} |",
        "",
        f"Scores are on the training targets' scale, [0, 1] for the images of {t.train_dataset}; the head's last "
        "layer is linear and unclipped, so an image unlike them can score below 0 or above 1. On the MOS scale of "
        f"{t.train_dataset} ({config.targets.score_scale}): mos = scale * score + offset with config.json's targets.mos.",
        "",
        *notes,
        "",
        "```python\nimport iqa\nmodel = iqa.load_model('THIS_FOLDER')\nmodel.score(['image.png'])\n```",
        "",
    ])
