"""A finished run's kept weights on disk: <cache>/runs/<key>/, next to results.sqlite.

`head.safetensors` holds the selected epoch's head as an M = 1 StackedMLP state dict (float32, so
scoring from it reproduces the recorded predictions exactly); its safetensors metadata carries the
run's config, so the head can be rebuilt from the file alone. A fine-tuning run keeps, beside it,
what it changed in the backbone at that epoch: `adapter/` (LoRA, PEFT's own format, loadable with
`PeftModel.from_pretrained`) or `backbone.safetensors` (full), and `fingerprint.json`, the base
backbone it started from. The folder is replaced whole each time a better epoch is kept.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from iqa.cache.atomic import atomic_path, building_folder
from iqa.heads.mlp import StackedMLP

RUNS_DIR = "runs"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_FILE = "backbone.safetensors"
FINGERPRINT_FILE = "fingerprint.json"


def run_weights_path(results_db: Path, key: str) -> Path:
    return Path(results_db).parent / RUNS_DIR / key / HEAD_FILE


def save_head(path: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """Write one head's state dict with its config; atomically, so a killed write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    return path


def save_tuned(folder: Path, head: dict[str, torch.Tensor], backbone, regime: str, config: dict,
               fingerprint: dict) -> Path:
    """Keep a fine-tuning run's epoch: the head, the adapter (a PEFT model) or full backbone weights, and
    the base fingerprint; built aside and swapped in, so a killed write leaves the previous epoch's folder."""
    with building_folder(folder) as building:
        save_head(building / HEAD_FILE, head, config)
        if regime == "lora":
            backbone.save_pretrained(building / ADAPTER_DIR)
        elif regime == "full":
            save_file({k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()},
                      str(building / BACKBONE_FILE))
        (building / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, sort_keys=True, indent=1))
    return folder


def load_head(path: Path) -> tuple[StackedMLP, dict]:
    """The M = 1 head stored at `path` and the config it was saved with, in eval mode."""
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    head = StackedMLP(
        state["layer1.weight"].shape[1], [config["seed"]], config["act1"], config["act2"],
        mask_k=[config["mask_k"]], dropout=config["dropout"], keep=[config["keep"]], hidden=state["layer1.weight"].shape[2],
    )
    head.load_state_dict(state)
    return head.eval(), config
