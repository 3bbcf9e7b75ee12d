"""A model folder back as a torch module (`iqa.load_model`), and `iqa score` over image files.

Images go through the very path extraction uses (ImageRows decodes and resizes, Embedder
normalises and runs the backbone), so a score equals the head on the stored embedding.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from iqa.extract.backbones import load_backbone, weights_sha256
from iqa.extract.preprocess import resize_uint8, to_rgb
from iqa.extract.registry import get_spec
from iqa.extract.run import Embedder, ImageRows, default_batch_size
from iqa.heads.export import CONFIG_FILE, file_sha256
from iqa.heads.weights import load_head

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class ModelFolderError(ValueError):
    """A model folder that cannot be trusted: missing or altered files."""


class IqaModel(nn.Module):
    """Backbone + head of one exported run; `.score` and `.embed` take paths, PIL images or a normalised batch."""

    def __init__(self, config: dict, embedder: Embedder, head: nn.Module):
        super().__init__()
        self.config, self.embedder, self.head = config, embedder, head
        self.backbone = embedder.model
        self.spec = embedder.spec

    def _inputs(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        pictures = [to_rgb(Image.open(i)) if isinstance(i, (str, Path)) else to_rgb(i) for i in images]
        if self.spec.features_in_worker is not None:
            return torch.from_numpy(np.stack([np.asarray(self.spec.features_in_worker(p), dtype=np.float32) for p in pictures]))
        return torch.stack([resize_uint8(p, self.spec.resolution) for p in pictures])

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """[B, D] pooled embeddings; a tensor is taken as already decoded (uint8 pixels, or features for NSS).
        A head trained on stored layers gets those layers' vectors, concatenated, without the default embedding."""
        pooled = self.embedder(self._inputs(images)).cpu()
        return pooled[:, self.config["backbone"]["dim"]:] if self.config["backbone"].get("layers") else pooled

    @torch.no_grad()
    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(embeddings.float()[None].to(next(self.head.parameters()).device))[0].cpu()

    def score(self, images) -> torch.Tensor:
        """[B] predicted quality in [0, 1] (the training set's target scale; `to_mos` maps it back)."""
        return self.score_embeddings(self.embed(images))

    def to_mos(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        m = self.config["targets"]["mos"]
        return m["scale"] * np.asarray(scores, dtype=np.float64) + m["offset"]

    def forward(self, images) -> torch.Tensor:
        return self.score(images)


def load_model(folder: str | Path, device: str = "cpu") -> IqaModel:
    """The model in an `iqa export` folder; refuses a missing or altered file, naming it."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFolderError(f"{config_path} is missing: not an iqa model folder")
    try:
        config = json.loads(config_path.read_text())
        weights = folder / config["weights"]["file"]
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{config_path} is not a valid model config ({err})") from None
    if not weights.is_file():
        raise ModelFolderError(f"{weights} is missing")
    if file_sha256(weights) != config["weights"]["sha256"]:
        raise ModelFolderError(f"{weights} does not match the checksum in {config_path}: altered or corrupt")
    b = config["backbone"]
    spec = get_spec(b["key"], tiny=b["tag"] == "tiny")
    backbone = load_backbone(spec, random_init=b["tag"] == "random-init", tiny=b["tag"] == "tiny")
    if b.get("weights_sha256") and weights_sha256(backbone) != b["weights_sha256"]:
        raise ModelFolderError(f"the {b['key']} backbone loaded here differs from the one the model was trained on")
    if b.get("layers"):
        backbone.use_layers(tuple(b["layers"]))
    head, _ = load_head(weights)
    dtype = getattr(torch, b.get("compute_dtype") or "float32")
    return IqaModel(config, Embedder(spec, backbone, device, dtype), head.to(device))


def image_files(targets: list[Path]) -> list[Path]:
    """Files named, and the image files under folders named (sorted), in the order given."""
    found = []
    for target in map(Path, targets):
        if target.is_dir():
            found += sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(target)
    return found


@dataclass
class Scored:
    path: str
    score: float | None
    mos: float | None
    reason: str = ""  # why an image could not be scored


def score_files(model: IqaModel, paths: list[Path], batch_size: int | None = None, workers: int = 2,
                progress: bool = True) -> list[Scored]:
    """One Scored per path, in order; unreadable images carry their reason, the rest are scored."""
    rows = ImageRows(Path("/"), [str(Path(p).resolve()) for p in paths], model.spec)
    loader = DataLoader(rows, batch_size=batch_size or default_batch_size(model.embedder.device), num_workers=workers)
    out: list[Scored] = []
    dim = model.embedder(rows.blank[None]).shape[1]
    for index, inputs, reasons in tqdm(loader, total=len(loader), unit="batch", disable=not progress, desc="scoring"):
        embeddings = torch.from_numpy(model.embedder.batch(inputs, list(reasons), dim))
        readable = ~torch.isnan(embeddings).any(1)
        scores = torch.full((len(reasons),), float("nan"))
        if readable.any():
            scores[readable] = model.score_embeddings(embeddings[readable])
        mos = model.to_mos(scores.numpy())
        for i, reason, s, m in zip(index.tolist(), reasons, scores.tolist(), mos.tolist()):
            out.append(Scored(str(paths[i]), None if reason else s, None if reason else m, reason or ""))
    return out
