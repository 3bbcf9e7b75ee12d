"""Fine-tuning checkpoints: one file per run folder, replaced atomically after every epoch.

`<run_dir>/checkpoint.pt` holds what a resumed run needs to go on exactly as an uninterrupted
one would: the trained backbone weights (the LoRA adapter alone, every backbone weight in full
mode, nothing in frozen mode), the head, the optimiser, the scheduler, the grad scaler, the RNG
states (torch CPU and CUDA, numpy, python) and the curves. The data order needs no state: it is
a function of (seed, epoch). Only tensors, numbers, strings, lists and dicts are stored, so the
file loads with `weights_only=True` (no code runs on load).

A checkpoint is written to a temporary file beside the old one, flushed to disk and renamed over
it, so a run killed while saving keeps its previous checkpoint.
"""

import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from iqa.cache.atomic import atomic_path

CHECKPOINT_FILE = "checkpoint.pt"


def run_name(config: dict) -> str:
    """A run's short name, <regime>[-r<rank>[-a<alpha>]]-<head>-s<seed>[variant_suffix]: its folder's and its
    tuned store's."""
    alpha = f"-a{config['lora_alpha']:g}" if config.get("lora_alpha") is not None else ""
    mode = config["regime"] + (f"-r{config['lora_rank']}{alpha}" if config["regime"] == "lora" else "")
    return f"{mode}-{config['head']}-s{config['seed']}{variant_suffix(config)}"


def variant_suffix(config: dict) -> str:
    """What a grid varies besides the name's fields, where it is not the default: -k<mask k>, -<dropout><keep>,
    -lr<lr>, -<loss>, -sel<rule>; so the runs of one grid keep their checkpoints in folders of their own."""
    parts = [f"k{config['mask_k']:g}" if config.get("mask_k", 100.0) != 100.0 else "",
             f"{config['dropout']}{config['keep']:g}" if config.get("dropout") else "",
             f"lr{config['lr']:g}" if config.get("lr", 1e-4) != 1e-4 else "",
             config["loss"] if config.get("loss", "mse+margin") != "mse+margin" else "",
             f"sel{config['select']}" if config.get("select", "test") != "test" else ""]
    return "".join(f"-{part}" for part in parts if part)


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    target = checkpoint_path(run_dir)
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    return target


def load_checkpoint(run_dir: Path) -> dict | None:
    """The run's last checkpoint, or None when it has none; tensors stay memory-mapped until used."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:  # truncated or not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}); delete it to start the run "
                         f"over, or give --run-dir another folder") from None


def rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain ints for weights_only
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = dict(states["numpy"], state=dict(states["numpy"]["state"]))
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR) -> dict:
    state = scheduler.state_dict()
    return dict(state, milestones=dict(state["milestones"]))  # a Counter does not load with weights_only


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR, state: dict) -> None:
    scheduler.load_state_dict(dict(state, milestones=Counter(state["milestones"])))
