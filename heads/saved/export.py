"""`iqa export`: a finished run (cached head or fine-tuning) as a self-contained model folder.

The folder holds config.json (backbone and how its weights were obtained, the preprocessing recipe
its fingerprint recorded, the head, the training set's target scale and its map back to MOS, split,
seed, selection rule, metrics, package versions), head.safetensors (the kept epoch's head), for a
fine-tuning run its tuning (adapter/ in PEFT's format, or backbone.safetensors), every file checked
by sha256 on load, and README.md, a short model card. `iqa.load_model` reads it back.
"""

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np

from iqa.cache.atomic import building_folder
from iqa.cache.store import EmbeddingStore, store_path
from iqa.cache.manifest import read_manifest
from iqa.heads.saved.weights import ADAPTER_DIR, BACKBONE_FILE, FINGERPRINT_FILE, HEAD_FILE, load_head, run_weights_path

CONFIG_FILE = "config.json"
CHECKSUM_FIELD = "config_sha256"
CARD_FILE = "README.md"
FORMAT = "iqa-model-1"
PACKAGES = ("torch", "transformers", "numpy", "safetensors")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_run(runs: list[dict], prefix: str) -> dict:
    """The run whose key starts with `prefix`; refuses none or several."""
    found = [r for r in runs if r["key"].startswith(prefix)]
    if not found:
        raise LookupError(f"no run key starts with {prefix!r}; `iqa results --runs` lists them")
    if len(found) > 1:
        raise LookupError(f"{len(found)} run keys start with {prefix!r}; give more of the key")
    return found[0]


def mos_map(scores: np.ndarray, targets: np.ndarray) -> dict:
    """mos = scale * target + offset, fitted on the training set (exact for its linear normalisations)."""
    scale, offset = np.polyfit(targets, scores, 1)
    return {"scale": float(scale), "offset": float(offset)}


def export_run(cache: Path, db_path: Path, run: dict, out: Path) -> Path:
    """Write `run`'s model folder to `out` (a new or empty folder: nothing iqa did not write is replaced).
    It is built in a temporary folder beside `out` and renamed when complete: a killed or failed export
    leaves no `out` (the next export removes the temporary), never half a model."""
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
    with building_folder(out) as building:
        write_model_folder(building, run, weights, fingerprint, manifest)
    return out


def write_model_folder(out: Path, run: dict, weights: Path, fingerprint: dict, manifest) -> None:
    kept = weights.parent
    shutil.copyfile(weights, out / HEAD_FILE)
    tuning = {"regime": run.get("regime", "frozen"), "lora_rank": run.get("lora_rank"), "files": {}}
    if (kept / ADAPTER_DIR).is_dir():
        shutil.copytree(kept / ADAPTER_DIR, out / ADAPTER_DIR)
    if (kept / BACKBONE_FILE).is_file():
        shutil.copyfile(kept / BACKBONE_FILE, out / BACKBONE_FILE)
    for path in sorted([*(out / ADAPTER_DIR).rglob("*"), out / BACKBONE_FILE]):
        if path.is_file():
            tuning["files"][str(path.relative_to(out))] = file_sha256(path)
    head_keys = ("head", "act1", "act2", "mask_k", "dropout", "keep", "l2norm")
    config = {
        "format": FORMAT,
        "run_key": run["key"],
        "backbone": {"key": run["backbone"], "tag": run["tag"], **{k: fingerprint.get(k) for k in (
            "model_id", "revision", "weights_sha256", "pooling", "dim", "resolution", "preprocess", "resample",
            "preprocessing", "compute_dtype")}, "tuning": tuning,
            **({"layers": run["layers"]} if run.get("layers") else {})},  # the head reads these stored layers
        "head": {k: run.get(k) for k in head_keys} | ({"probe": run["curves"]["probe"]} if "probe" in run["curves"] else {})
                | ({"fuse": run["fuse"]} if run.get("fuse") else {}),  # the stages fused, not concatenated
        "training": {k: run.get(k) for k in (
            "train_dataset", "test_dataset", "split_by", "seed", "epochs", "lr", "batch_size", "select", "val_fraction",
            "regime", "backbone_lr", "physical_batch", "accumulate")},
        "targets": {"score_scale": manifest.score_scale, "mos": mos_map(manifest.scores, manifest.targets)},
        "metrics": {k: run[k] for k in ("best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")},
        "weights": {"file": HEAD_FILE, "sha256": file_sha256(out / HEAD_FILE)},
        "packages": {name: version(name) for name in PACKAGES},
    }
    write_config(out, config)
    (out / CARD_FILE).write_text(model_card(config))


def config_checksum(config: dict) -> str:
    """sha256 of the config's canonical JSON, its own checksum field left out."""
    return hashlib.sha256(json.dumps({k: v for k, v in config.items() if k != CHECKSUM_FIELD}, sort_keys=True).encode()).hexdigest()


def write_config(folder: Path, config: dict) -> None:
    """config.json with its checksum inside: an edited recipe (preprocessing, l2norm, the MOS map) is
    refused on load like an altered weights file, instead of silently changing every score."""
    config = {**config, CHECKSUM_FIELD: config_checksum(config)}
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def model_card(config: dict) -> str:
    b, t, m = config["backbone"], config["training"], config["metrics"]
    untrained = {"tiny": "a tiny random-init test model", "random-init": "a random-init model"}.get(b["tag"])
    notes = [f"The backbone is {untrained}: it rebuilds deterministically from its config, not from pretrained weights."] if untrained else []
    regime = b["tuning"]["regime"]
    if regime != "frozen":
        notes.append(f"The backbone was fine-tuned end to end ({regime}"
                     f"{', rank ' + str(b['tuning']['lora_rank']) if regime == 'lora' else ''}); its tuning is in this "
                     f"folder ({'adapter/, PEFT format' if regime == 'lora' else 'backbone.safetensors'}) and is applied on load.")
    if config["head"].get("fuse"):
        notes.append(f"The head weighs the stored stages {b['layers']} per image ({config['head']['fuse']} fusion) "
                     "before the head reads them; the weights come from the deepest stage.")
    probe = config["head"].get("probe")
    if probe:
        chosen = {k: v for k, v in probe.items() if k != "cv_srcc"}
        notes.append(f"The head is a {config['head']['head']} probe fitted in closed form, {chosen} chosen by "
                     "cross-validation on the training rows; it has no epochs.")
    elif t["select"] == "test":
        notes.append("The epoch was chosen by best test SRCC (the paper's protocol): the test metrics are optimistic.")
    return "\n".join([
        f"# {b['key']}{'@' + b['tag'] if b['tag'] else ''} + {config['head']['head']} head, trained on {t['train_dataset']}",
        "",
        f"Run `{config['run_key']}`; seed {t['seed']}, {t['split_by']} split, epoch {m['best_epoch']} of {t['epochs']} kept "
        f"by the `{t['select']}` rule.",
        "",
        f"| test set | SRCC | PLCC |\n|---|---|---|\n| {t['test_dataset']} | {m['best_srcc']:.4f} | {m['best_plcc']:.4f} |",
        "",
        f"Scores are on the training targets' scale, [0, 1] for the images of {t['train_dataset']}; the head's last "
        "layer is linear and unclipped, so an image unlike them can score below 0 or above 1. On the MOS scale of "
        f"{t['train_dataset']} ({config['targets']['score_scale']}): mos = scale * score + offset with config.json's targets.mos.",
        "",
        *notes,
        "",
        "```python\nimport iqa\nmodel = iqa.load_model('THIS_FOLDER')\nmodel.score(['image.png'])\n```",
        "",
    ])
