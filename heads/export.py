"""`iqa export`: a finished cached-head run as a self-contained model folder.

The folder holds config.json (backbone and how its weights were obtained, the store fingerprint's
preprocessing recipe, the head, the training set's target scale and its map back to MOS, split,
seed, selection rule, metrics, package versions), head.safetensors (the kept epoch's weights,
checked by sha256 on load) and README.md, a short model card. `iqa.load_model` reads it back.
"""

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np

from iqa.cache.store import EmbeddingStore, store_path
from iqa.cache.manifest import read_manifest
from iqa.heads.weights import HEAD_FILE, run_weights_path

CONFIG_FILE = "config.json"
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
    """Write `run`'s model folder to `out` (a new or empty folder: nothing iqa did not write is replaced)."""
    if run.get("regime", "frozen") != "frozen":
        raise ValueError(f"run {run['key'][:12]} is a {run['regime']} fine-tuning run; export handles cached-head runs")
    for option in ("standardize", "l2norm"):  # the model folder does not carry the input transform yet
        if run.get(option):
            raise ValueError(f"run {run['key'][:12]} was trained with --{option}; export handles runs without it")
    weights = run_weights_path(db_path, run["key"])
    if not weights.exists():
        raise FileNotFoundError(f"run {run['key'][:12]} kept no weights ({weights} is missing); train it again")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    manifest = read_manifest(cache, run["train_dataset"])
    fingerprint = EmbeddingStore(store_path(cache, run["train_dataset"], run["backbone"], run["tag"])).fingerprint
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / HEAD_FILE)
    head_keys = ("head", "act1", "act2", "mask_k", "dropout", "keep")
    config = {
        "format": FORMAT,
        "run_key": run["key"],
        "backbone": {"key": run["backbone"], "tag": run["tag"], **{k: fingerprint.get(k) for k in (
            "model_id", "revision", "weights_sha256", "pooling", "dim", "resolution", "preprocessing", "compute_dtype")},
            **({"layers": run["layers"]} if run.get("layers") else {})},  # the head reads these stored layers
        "head": {k: run[k] for k in head_keys},
        "training": {k: run[k] for k in (
            "train_dataset", "test_dataset", "split_by", "seed", "epochs", "lr", "batch_size", "select", "val_fraction")},
        "targets": {"score_scale": manifest.score_scale, "mos": mos_map(manifest.scores, manifest.targets)},
        "metrics": {k: run[k] for k in ("best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")},
        "weights": {"file": HEAD_FILE, "sha256": file_sha256(out / HEAD_FILE)},
        "packages": {name: version(name) for name in PACKAGES},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / CARD_FILE).write_text(model_card(config))
    return out


def model_card(config: dict) -> str:
    b, t, m = config["backbone"], config["training"], config["metrics"]
    untrained = {"tiny": "a tiny random-init test model", "random-init": "a random-init model"}.get(b["tag"])
    notes = [f"The backbone is {untrained}: it rebuilds deterministically from its config, not from pretrained weights."] if untrained else []
    if t["select"] == "test":
        notes.append("The epoch was chosen by best test SRCC (the paper's protocol): the test metrics are optimistic.")
    return "\n".join([
        f"# {b['key']}{'@' + b['tag'] if b['tag'] else ''} + {config['head']['head']} head, trained on {t['train_dataset']}",
        "",
        f"Run `{config['run_key']}`; seed {t['seed']}, {t['split_by']} split, epoch {m['best_epoch']} of {t['epochs']} kept "
        f"by the `{t['select']}` rule.",
        "",
        f"| test set | SRCC | PLCC |\n|---|---|---|\n| {t['test_dataset']} | {m['best_srcc']:.4f} | {m['best_plcc']:.4f} |",
        "",
        f"Scores are in [0, 1]; on the MOS scale of {t['train_dataset']} ({config['targets']['score_scale']}): "
        "mos = scale * score + offset with config.json's targets.mos.",
        "",
        *notes,
        "",
        "```python\nimport iqa\nmodel = iqa.load_model('THIS_FOLDER')\nmodel.score(['image.png'])\n```",
        "",
    ])
