"""A finished run's kept weights on disk: <cache>/runs/<key>/, next to results.sqlite.

`head.safetensors` holds the selected epoch's head as an M = 1 StackedMLP (or StackedHyper, or a
StackedFusion in front of either) state dict (float32, so scoring from it reproduces the recorded
predictions exactly), plus
`input_mean`/`input_std` for a run trained with `standardize`; a probe's file holds its state dict
(heads/models/probes.py), a zero-shot or learned-prompts run's its text embeddings, logit scale and bias
(heads/zeroshot/scoring.TextHead). Its safetensors metadata carries the run's config, so the head can be rebuilt
from the file alone. A fine-tuning run keeps, beside it, what it changed in the backbone at that
epoch: `adapter/` (LoRA, PEFT's own format, loadable with `PeftModel.from_pretrained`) or
`backbone.safetensors` (full), and `fingerprint.json`, the base backbone it started from. The
folder is replaced whole each time a better epoch is kept.
"""

import errno
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from iqa.cache.atomic import atomic_path, building_folder
from iqa.heads.models.mlp import StackedMLP
from iqa.heads.models.probes import PROBES, probe_from_state
from iqa.heads.training.trainer import make_stack
from iqa.heads.zeroshot.scoring import TEXT_HEADS, TextHead

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
        write_safetensors(tmp, state, {"config": json.dumps(config, sort_keys=True)})
    return path


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """save_file, its failed write (safetensors' own error) raised as the OSError it is."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)
    except SafetensorError as error:
        full = "No space left" in str(error)
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      f"cannot write {path}: {'the disk is full; free some space and run again' if full else error}") from None


def save_tuned(folder: Path, head: dict[str, torch.Tensor], backbone, regime: str, config: dict,
               fingerprint: dict) -> Path:
    """Keep a fine-tuning run's epoch: the head, the adapter (a PEFT model) or full backbone weights, and
    the base fingerprint; built aside and swapped in, so a killed write leaves the previous epoch's folder."""
    with building_folder(folder) as building:
        save_head(building / HEAD_FILE, head, config)
        if regime == "lora":
            backbone.save_pretrained(building / ADAPTER_DIR)
        elif regime == "full":
            write_safetensors(building / BACKBONE_FILE, backbone.state_dict())
        (building / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, sort_keys=True, indent=1))
    return folder


class StandardizedHead(nn.Module):
    """A head trained on z-scored inputs: x [1, B, D] is scaled with its run's training statistics first."""

    def __init__(self, head: StackedMLP, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean[:, None]) / self.std[:, None])


def load_head(path: Path) -> tuple[nn.Module, dict]:
    """The M = 1 head stored at `path` and the config it was saved with, in eval mode."""
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    if config["head"] in PROBES:
        return probe_from_state(config["head"], state), config
    if config["head"] in TEXT_HEADS:  # zero-shot or learned prompts: the backbone's own text embeddings
        return TextHead.from_state(state).eval(), config
    scaling = [state.pop(name, None) for name in ("input_mean", "input_std")]
    if config.get("standardize") and scaling[0] is None:
        raise ValueError(f"{path} was saved without its input statistics (before they were kept); train the run again")
    fuse = config.get("fuse")
    inner = "head." if fuse else ""  # a fusion's own head sits under "head."
    mlp = f"{inner}layer1.weight" in state
    # [1, in, out]: the MLP's first layer, the hyper head's projection, or (eq16: no projection) its first generated layer
    first = state[f"{inner}layer1.weight" if mlp else f"{inner}project.weight" if f"{inner}project.weight" in state
                  else f"{inner}w1"]
    hidden = first.shape[2] if mlp else None
    content = tuple(state["content_columns"][0].tolist()) if "content_columns" in state else None
    stages = None
    if fuse:  # (layer, width) of each stage, from its projection [1, width, FUSE_WIDTH]
        stages = tuple((n, state[f"project.{i}.weight"].shape[1]) for i, n in enumerate(config["layers"]))
    spatial = config.get("spatial")  # fused stages read as spatial x spatial maps
    in_dim = first.shape[1] if stages is None else sum(w for _, w in stages) * (spatial or 1) ** 2
    head = make_stack(in_dim, [config["seed"]], config["act1"], config["act2"], [config["mask_k"]],
                      config["dropout"], [config["keep"]], *([hidden] if hidden else []), fuse=fuse, stages=stages,
                      content=content, hyper_target=config.get("hyper_target"), spatial=spatial)
    head.load_state_dict(state)
    if scaling[0] is not None:
        head = StandardizedHead(head, *scaling)
    return head.eval(), config
