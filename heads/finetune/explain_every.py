"""Grad-CAM over training (`iqa finetune --explain-every N`, the supplement's Fig. S6): every N optimiser steps,
the tuned model's maps of a few fixed test images are kept, so the report can show how what the model looks at
changes as it trains.

The maps go beside the run's kept weights, `<cache>/runs/<key>.explain/step<NNNNNNN>.npy` ([images, R, R] at the
backbone's input side), and `images.json` names the images. Taking them changes nothing the run learns: the
model is put in eval mode for the pass (no dropout drawn) and Grad-CAM draws no random numbers, so a run gives
the same numbers with or without them.
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iqa.heads.explain.attribution import attribute

EXPLAINED_IMAGES = 3  # the first test images of the run's split, the same at every step
SUFFIX = ".explain"


def maps_folder(kept: Path) -> Path:
    """Beside the kept weights' folder (which is replaced whole whenever a better epoch is kept)."""
    return kept.with_name(kept.name + SUFFIX)


def fixed_images(plan, test_split: str) -> tuple[list[str], torch.Tensor]:
    """(names, uint8 pixels [K, 3, R, R]) of the first EXPLAINED_IMAGES test rows, decoded as training decodes."""
    test = plan.scored[test_split]
    rows = sorted(int(r) for r in test.rows)[:EXPLAINED_IMAGES]
    images = [test.images.rows[r] for r in rows]
    return [test.images.manifest.paths[r] for r in rows], torch.stack([pixels for _, pixels, _, _ in images])


class MapsOverTraining:
    """Keeps Grad-CAM maps of the fixed images every `every` optimiser steps of one run."""

    def __init__(self, plan, test_split: str, model: nn.Module, kept: Path, every: int, first_step: int):
        if every < 1:
            raise ValueError(f"`explain_every` must be at least 1 step, got {every}")
        self.model, self.every, self.step = model, every, first_step
        self.folder = maps_folder(kept)
        self.folder.mkdir(parents=True, exist_ok=True)
        names, self.pixels = fixed_images(plan, test_split)
        (self.folder / "images.json").write_text(json.dumps(names))

    def after_step(self) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self.keep()

    def keep(self) -> None:
        model = self.model
        training = model.training
        model.eval()
        try:
            def score(pooled: torch.Tensor) -> torch.Tensor:
                features = nn.functional.normalize(pooled.float(), dim=1) if model.l2norm else pooled.float()
                return model.head(features[None])[0]

            maps = attribute(model.backbone, score, self.pixels.to(next(model.parameters()).device), "gradcam")
        finally:
            model.train(training)
        np.save(self.folder / f"step{self.step:07d}.npy", maps.detach().cpu().float().numpy())


def kept_maps(folder: Path) -> tuple[list[str], list[int], np.ndarray] | None:
    """(image names, steps, maps [steps, images, R, R]) kept for a run, or None."""
    files = sorted(Path(folder).glob("step*.npy"))
    if not files or not (Path(folder) / "images.json").is_file():
        return None
    names = json.loads((Path(folder) / "images.json").read_text())
    return names, [int(f.stem[4:]) for f in files], np.stack([np.load(f) for f in files])
