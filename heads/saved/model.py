"""A model folder back as a torch module (`iqa.load_model`), and `iqa score` over image files.

Images go through the very path extraction uses (ImageRows decodes and resizes, Embedder
normalises and runs the backbone), so a score equals the head on the stored embedding.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from iqa.cache.atomic import atomic_path, replaceable_file
from iqa.cache.location import plain_name
from iqa.extract.backbones import BackboneLoadError, PooledBackbone, family_of, load_backbone, weights_sha256
from iqa.extract.preprocess import decode_image, resize_uint8, to_rgb
from iqa.extract.registry import get_spec
from iqa.extract.run import Embedder, ImageRows, default_batch_size, pooling_rule
from iqa.heads.saved.export import CHECKSUM_FIELD, CONFIG_FILE, FORMAT, config_checksum, file_sha256
from iqa.heads.saved.weights import ADAPTER_DIR, BACKBONE_FILE, load_head

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
        pictures = [self._decoded(i) if isinstance(i, (str, Path)) else to_rgb(ImageOps.exif_transpose(i)) for i in images]
        spec = self.spec
        if family_of(spec).in_worker:
            return torch.from_numpy(np.stack([np.asarray(spec.features_in_worker(p), dtype=np.float32) for p in pictures]))
        return torch.stack([resize_uint8(p, spec.resolution, spec.resample, spec.shortest_side()) for p in pictures])

    @staticmethod
    def _decoded(path) -> Image.Image:
        image, reason, _ = decode_image(Path(path))
        if image is None:
            raise ValueError(f"cannot read {path}: {reason}")
        return image

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """[B, D] pooled embeddings; a tensor is taken as already decoded (uint8 pixels, or features for NSS).
        A head trained on stored layers gets those layers' vectors, concatenated, without the default embedding."""
        return self.head_inputs(self.embedder(self._inputs(images)).cpu())

    def head_inputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """The columns of the backbone's output the head reads: all of them, or, for a head trained on
        stored layers, the layers' vectors that follow the default embedding."""
        return pooled[:, self.config["backbone"]["dim"]:] if self.config["backbone"].get("layers") else pooled

    def unit_length(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input [B, D] from its columns: unit length for a model trained with --l2norm."""
        return nn.functional.normalize(x, dim=-1) if self.config.get("head", {}).get("l2norm") else x

    @torch.no_grad()
    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.head.state_dict().values())).device  # probes hold buffers, no parameters
        return self.head(self.unit_length(embeddings.float())[None].to(device))[0].cpu()

    def score(self, images) -> torch.Tensor:
        """[B] predicted quality on the training set's target scale, where its images lie in [0, 1]; the head's
        last layer is linear, unclipped (as the paper trains it), so an image unlike them can score outside
        (`to_mos` maps a score back to the MOS scale)."""
        return self.score_embeddings(self.embed(images))

    def to_mos(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        m = self.config["targets"]["mos"]
        return m["scale"] * np.asarray(scores, dtype=np.float64) + m["offset"]

    def forward(self, images) -> torch.Tensor:
        return self.score(images)


def load_model(folder: str | Path, device: str = "cpu", source: str | None = None) -> IqaModel:
    """The model in an `iqa export` folder; refuses a missing or altered file, naming it. The base
    weights come from where training took them (config.json's model_id) unless `source` (an HF id
    or a local folder) says otherwise; either way they must be the ones trained on (checksum)."""
    folder = Path(folder)
    config = checked_config(folder)
    try:
        return build_model(folder, config, device, source)
    except (BackboneLoadError, ModelFolderError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, SafetensorError) as error:
        # checksums that match contents iqa never wrote (a config without a backbone, unknown keys, other tensors)
        raise ModelFolderError(f"{folder} does not hold a model iqa can rebuild ({type(error).__name__}: "
                               f"{message_line(error)}); export the run again") from None


def message_line(error: Exception) -> str:
    return (str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)).splitlines()[0][:200]


def checked_config(folder: Path) -> dict:
    """config.json, refused unless its own checksum and the head's match and the head is a safetensors file."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFolderError(f"{config_path} is missing: not an iqa model folder")
    try:
        config = json.loads(config_path.read_text())
        weights = folder / plain_name(config["weights"]["file"], "weights file")
        expected = config["weights"]["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{config_path} is not a valid model config ({message_line(err)})") from None
    if config.get(CHECKSUM_FIELD) != config_checksum(config):
        raise ModelFolderError(f"{config_path} does not match its checksum: edited or corrupt "
                               "(the recipe decides every score); export the run again instead of editing it")
    lacking = [k for k in ("format", "backbone", "head", "targets", "weights") if not isinstance(config.get(k), (dict, str))]
    if lacking or config["format"] != FORMAT:
        raise ModelFolderError(f"{config_path} is not an {FORMAT} config (lacking {', '.join(lacking) or 'its format'}); "
                               "export the run again")
    if weights.suffix != ".safetensors":
        raise ModelFolderError(f"{weights} is not a .safetensors file: iqa loads no other (pickled) weights")
    if not weights.is_file():
        raise ModelFolderError(f"{weights} is missing")
    if file_sha256(weights) != expected:
        raise ModelFolderError(f"{weights} does not match the checksum in {config_path}: altered or corrupt")
    return config


def build_model(folder: Path, config: dict, device: str, source: str | None) -> IqaModel:
    b = config["backbone"]
    tiny, random_init = b["tag"] == "tiny", b["tag"] == "random-init"
    spec = get_spec(b["key"], tiny=tiny)
    backbone = load_backbone(spec, source=source or (None if tiny or random_init else b.get("model_id")),
                             random_init=random_init, tiny=tiny, resolution=b.get("resolution"),
                             preprocess=b.get("preprocess") or "square")
    if b.get("weights_sha256") and weights_sha256(backbone) != b["weights_sha256"]:
        raise ModelFolderError(f"the {b['key']} backbone loaded here differs from the one the model was trained on")
    if b.get("pooling") and b["pooling"] != pooling_rule(backbone.spec):
        raise ModelFolderError(f"the model was trained on {b['key']} features pooled as {b['pooling']}, "
                               f"this iqa pools them as {pooling_rule(backbone.spec)}")
    backbone = apply_tuning(backbone, folder, b.get("tuning") or {"regime": "frozen"})
    if b.get("layers"):
        if family_of(backbone.spec).in_worker:
            raise ModelFolderError(f"{folder / CONFIG_FILE} names stored layers, but {b['key']} computes fixed features with none")
        backbone.use_layers(tuple(b["layers"]))
    head, _ = load_head(folder / config["weights"]["file"])
    dtype = getattr(torch, b.get("compute_dtype") or "float32")
    return IqaModel(config, Embedder(backbone.spec, backbone, device, dtype), head.to(device))


def apply_tuning(backbone: PooledBackbone, folder: Path, tuning: dict) -> PooledBackbone:
    """The base backbone with a fine-tuning run's adapter merged in, or its full weights loaded;
    each file checked against config.json's checksum first, and only safetensors weights read."""
    for name, sha in tuning.get("files", {}).items():
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ModelFolderError(f"{folder / CONFIG_FILE} names a tuning file outside the folder: {name}")
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing")
        if file_sha256(path) != sha:
            raise ModelFolderError(f"{path} does not match the checksum in {folder / CONFIG_FILE}: altered or corrupt")
    pickled = [p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickled:
        raise ModelFolderError(f"{folder} holds pickled weights ({', '.join(sorted(pickled))}): iqa loads only "
                               "safetensors; remove them or export the run again")
    if tuning["regime"] == "lora":
        from peft import PeftModel  # imports in ~2 s: only for a LoRA model

        from iqa.extract.tuning import lora_layout

        if not (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file():
            raise ModelFolderError(f"{folder / ADAPTER_DIR / 'adapter_model.safetensors'} is missing")
        return PeftModel.from_pretrained(lora_layout(backbone), str(folder / ADAPTER_DIR)).merge_and_unload().eval()
    if tuning["regime"] == "full":
        backbone.load_state_dict(load_file(str(folder / BACKBONE_FILE)))
    return backbone


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
    if not paths:
        raise ValueError("no images to score: the files and folders given hold none (.jpg, .png, ...)")
    rows = ImageRows(Path("/"), [str(Path(p).resolve()) for p in paths], model.spec)
    loader = DataLoader(rows, batch_size=batch_size or default_batch_size(model.embedder.device), num_workers=workers)
    out: list[Scored] = []
    width = model.embedder(rows.blank[None]).shape[1]  # the default embedding, then any stored layers
    for index, inputs, reasons, _ in tqdm(loader, total=len(loader), unit="batch", disable=not progress, desc="scoring"):
        embeddings = model.head_inputs(torch.from_numpy(model.embedder.batch(inputs, list(reasons), width)))
        readable = ~torch.isnan(embeddings).any(1)
        scores = torch.full((len(reasons),), float("nan"))
        if readable.any():
            scores[readable] = model.score_embeddings(embeddings[readable])
        mos = model.to_mos(scores.numpy())
        for i, reason, s, m in zip(index.tolist(), reasons, scores.tolist(), mos.tolist()):
            out.append(Scored(str(paths[i]), None if reason else s, None if reason else m, reason or ""))
    return out


SCORES_HEADER = "path,score,mos"  # the first line of every scores file iqa writes: how it knows its own


def is_scores_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\r\n") == SCORES_HEADER.encode()
    except OSError:
        return False


def write_scores(scored: list[Scored], out: Path) -> Path:
    """The scored rows as a CSV file, written whole or not at all: a new file, or one an earlier
    `iqa score --out` wrote (its header line says so); anything else is refused (NotOurs)."""
    replaceable_file(out, is_scores_file, "--out")
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SCORES_HEADER.split(","))
        writer.writerows([s.path, f"{s.score:.6f}", f"{s.mos:.6f}"] for s in scored if not s.reason)
    return out


# What decides a stored embedding: a store whose fingerprint agrees on all of these holds what the
# model's own backbone would compute for the same images.
EMBEDDING_FIELDS = ("backbone", "weights_sha256", "pooling", "dim", "resolution", "preprocess", "resample",
                    "preprocessing", "compute_dtype")


def reusable_store(model: IqaModel, cache: Path, dataset: str):
    """The model's backbone's store of `dataset` if its embeddings are the ones the model would compute
    (a fine-tuned model's never are: its backbone is not the base one), else None."""
    from iqa.cache.store import load_cached, store_exists, store_path

    b = model.config["backbone"]
    if (b.get("tuning") or {}).get("regime", "frozen") != "frozen":
        return None
    if not store_exists(store_path(cache, dataset, b["key"], b["tag"])):
        return None
    cached = load_cached(cache, dataset, b["key"], b["tag"])  # refuses a stale, damaged or unfinished store
    mine = {"backbone": b["key"], **b}
    if "tuned" in cached.fingerprint or any(cached.fingerprint.get(k) != mine.get(k) for k in EMBEDDING_FIELDS):
        return None
    layers = tuple(b.get("layers") or ())
    if not layers:
        return cached
    if not set(layers) <= set(cached.fingerprint.get("layers", [])):
        return None
    return cached.select_layers(layers)  # what a head trained on stored layers reads


def score_dataset(model: IqaModel, cache: Path, dataset: str, batch_size: int | None = None, workers: int = 2,
                  progress: bool = True) -> tuple[list[Scored], str]:
    """Every image of a prepared dataset, from its embedding store where that matches the model (no
    backbone pass), else from the images; and which of the two it was."""
    from iqa.cache.manifest import read_manifest

    manifest = read_manifest(cache, dataset)
    root = Path(manifest.image_root)
    cached = reusable_store(model, cache, dataset)
    if cached is None:
        return score_files(model, [root / p for p in manifest.paths], batch_size, workers, progress), "images"
    scores = torch.full((len(manifest),), float("nan"))
    valid = torch.from_numpy(cached.valid)
    if valid.any():
        scores[valid] = model.score_embeddings(torch.from_numpy(cached.embeddings[cached.valid]))
    mos = model.to_mos(scores.numpy())
    out = [Scored(str(root / p), s if ok else None, m if ok else None, "" if ok else "unreadable at extraction")
           for p, s, m, ok in zip(manifest.paths, scores.tolist(), mos.tolist(), cached.valid.tolist())]
    return out, "store"
