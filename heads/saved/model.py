"""A model folder back as a torch module (`iqa.load_model`), and `iqa score` over image files.

Images go through the very path extraction uses (ImageRows decodes and resizes, Embedder
normalises and runs the backbone), so a score equals the head on the stored embedding.
"""

import csv
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file
from huggingface_hub import ModelHubMixin
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from iqa.cache.atomic import atomic_path, replaceable_file
from iqa.cache.location import plain_name
from iqa.extract.backbones import BackboneLoadError, PooledBackbone, family_of, load_backbone, weights_sha256
from iqa.extract.preprocess import decode_image, resize_uint8, to_rgb
from iqa.extract.registry import get_spec
from iqa.extract.run import Embedder, ImageRows, default_batch_size, pooling_rule
from iqa.cache.manifest import file_sha256
from iqa.heads.saved.config import CHECKSUM_FIELD, CONFIG_FILE, FORMAT, ModelConfig, Tuning, config_checksum
from iqa.heads.saved.export import CARD_FILE
from iqa.heads.saved.weights import ADAPTER_DIR, BACKBONE_FILE, load_head
from iqa.errors import IqaError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class ModelFolderError(IqaError, ValueError):
    """A model folder that cannot be trusted: missing or altered files."""


class IqaModel(nn.Module, ModelHubMixin, library_name="iqa", tags=["image-quality-assessment", "no-reference-iqa"]):
    """Backbone + head of one exported run. `model(x)`, `.score(x)` and `.embed(x)` take any image input
    (`as_pictures`); `lower_better`, `score_range` and `mos_range` are read as pyiqa users read them.

    Shared the Hugging Face way (huggingface_hub's ModelHubMixin): `save_pretrained(dir)` writes the model
    folder (config.json, model.safetensors, the model card README.md, any tuning or bundled backbone),
    `from_pretrained(dir_or_hub_id, revision=...)` reads one back, `push_to_hub(repo_id)` uploads it."""

    lower_better = False  # a higher score is better quality, on every dataset (targets are flipped where DMOS)
    score_range = (0.0, 1.0)  # the training targets' range; a head without a bounded output can leave it a little

    def __init__(self, config: ModelConfig, embedder: Embedder, head: nn.Module, folder: Path):
        super().__init__()
        self.config, self.embedder, self.head = config, embedder, head
        self.folder = Path(folder)  # the files `save_pretrained` copies
        self.backbone = embedder.model
        self.spec = embedder.spec

    @property
    def mos_range(self) -> tuple[float, float]:
        """score_range on the MOS scale of the training set (`to_mos`)."""
        low, high = (float(v) for v in self.to_mos(np.array(self.score_range)))
        return (low, high)

    def _inputs(self, images) -> torch.Tensor:
        spec = self.spec
        pictures = as_pictures(images)
        if family_of(spec).in_worker:
            return torch.from_numpy(np.stack([np.asarray(spec.features_in_worker(p), dtype=np.float32) for p in pictures]))
        return torch.stack([resize_uint8(p, spec.resolution, spec.resample, spec.shortest_side()) for p in pictures])

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """[B, D] pooled embeddings of `images` (anything `as_pictures` takes). A head trained on stored
        layers gets those layers' vectors, concatenated, without the default embedding."""
        return self.head_inputs(self.embedder(self._inputs(images)).cpu())

    def head_inputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """The columns of the backbone's output the head reads: all of them; for a head trained on stored
        layers, the layers' vectors that follow the default embedding; for one on their maps (`spatial`),
        the maps, which follow the vectors (the layout `iqa extract` stores)."""
        b = self.config.backbone
        if b.spatial:
            return pooled[:, -self.map_width:]
        return pooled[:, b.dim:] if b.layers else pooled

    @cached_property
    def map_width(self) -> int:
        """The columns of the layers' S x S maps: S * S * channels of each (one probe pass)."""
        b, side = self.config.backbone, self.spec.resolution
        probe = torch.zeros(1, 3, side, side, device=self.embedder.device)
        sizes = self.backbone.layer_sizes(probe)
        return b.spatial ** 2 * sum(sizes[n - 1][1] for n in b.layers)

    def unit_length(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input [B, D] from its columns: unit length for a model trained with --l2norm."""
        return nn.functional.normalize(x, dim=-1) if self.config.head.l2norm else x

    @torch.no_grad()
    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.head.state_dict().values())).device  # probes hold buffers, no parameters
        return self.head(self.unit_length(embeddings.float())[None].to(device))[0].cpu()

    def score(self, images) -> torch.Tensor:
        """[B] predicted quality on the training set's target scale, where its images lie in [0, 1]; the head's
        last layer is linear, unclipped (as the paper trains it), so an image unlike them can score outside
        (`to_mos` maps a score back to the MOS scale)."""
        return self.score_embeddings(self.embed(images))

    def to_mos(self, scores):
        """Scores on the training set's MOS scale, in the type given: a tensor for a tensor (as `score`
        returns), else a numpy array."""
        m = self.config.targets.mos
        return m.apply(scores.double() if isinstance(scores, torch.Tensor) else np.asarray(scores, dtype=np.float64))

    def forward(self, images) -> torch.Tensor:
        return self.score(images)

    def save_pretrained(self, save_directory, **kwargs):
        """The model folder into `save_directory` (new or empty: nothing iqa did not write is replaced)."""
        target = Path(save_directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} exists and is not empty; save into a new or empty folder")
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Every file of the folder this model was loaded from, as it is (each is checksummed in config.json):
        the model saved is bit for bit the model loaded."""
        for name in model_files(self.folder, self.config):
            (save_directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folder / name, save_directory / name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, revision: str | None = None, device: str = "cpu",
                        source: str | None = None, **hub) -> "IqaModel":
        """A model folder on disk, or a Hugging Face Hub repository id (downloaded through huggingface_hub,
        at `revision`); `source` is where to find a frozen backbone's base weights if not where training did."""
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        if Path(pretrained_model_name_or_path).is_dir():  # read and checked by load_model alone
            return load_model(pretrained_model_name_or_path, device, source)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, revision=revision, device=device,
                                           source=source, **hub)
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError) as error:
            raise ModelFolderError(f"{pretrained_model_name_or_path} is not a model folder here, and the Hugging Face Hub "
                                   f"cannot give it ({type(error).__name__}: {message_line(error)}); give a local folder, "
                                   "or go online") from None
        except ModelFolderError:
            raise
        except (TypeError, ValueError) as error:  # the mixin reads the hub's config.json into a ModelConfig first
            raise unbuildable(pretrained_model_name_or_path, error) from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         device: str = "cpu", source: str | None = None, **decoded) -> "IqaModel":
        """A hub repository's model; `decoded` (what the mixin read from its config.json) is left: load_model
        reads the downloaded folder and checks every file itself."""
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir, token=token,
                                        force_download=force_download, local_files_only=local_files_only))
        return load_model(folder, device, source)


def as_pictures(images) -> list[Image.Image]:
    """Every input a user holds as RGB pictures: a path (str or Path) to an image or to a folder of them
    (sorted), a PIL image, a numpy H x W x C uint8 array (or B x H x W x C), a float tensor C x H x W or
    B x C x H x W in [0, 1] (torchvision's layout), or a list of any of these. The same image in any form
    gives the same pixels, so the same score."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_dir():
            found = image_files([path])
            if not found:
                raise ValueError(f"{path} holds no image files (.jpg, .png, ...)")
            return [_decoded(p) for p in found]
        return [_decoded(path)]
    if isinstance(images, Image.Image):
        return [to_rgb(ImageOps.exif_transpose(images))]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [picture for one in images for picture in as_pictures(one)]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"a numpy image is H x W x C uint8; got shape {images.shape}, {images.dtype}")
        return [to_rgb(Image.fromarray(images[..., 0] if images.shape[-1] == 1 else images))]
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            return [picture for one in images for picture in as_pictures(one)]
        if images.ndim != 3 or images.shape[0] not in (1, 3) or not images.is_floating_point():
            raise ValueError(f"a tensor image is a float C x H x W (or B x C x H x W) in [0, 1]; got "
                             f"{tuple(images.shape)}, {images.dtype}")
        if images.min() < 0 or images.max() > 1:
            raise ValueError("a tensor image holds values in [0, 1] (torchvision's ToTensor); this one does not")
        pixels = (images.detach().cpu().float() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return as_pictures(np.ascontiguousarray(pixels))
    if isinstance(images, (list, tuple)):
        return [picture for one in images for picture in as_pictures(one)]
    raise TypeError(f"cannot score a {type(images).__name__}: give a path, a folder, a PIL image, a numpy "
                    "H x W x C uint8 array, a float tensor in [0, 1], or a list of these")


def _decoded(path) -> Image.Image:
    image, reason, _ = decode_image(Path(path))
    if image is None:
        raise ValueError(f"cannot read {path}: {reason}")
    return image


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
        raise unbuildable(folder, error) from None


def unbuildable(folder: Path | str, error: Exception) -> "ModelFolderError":
    """Checksums that match contents iqa never wrote (a config without a backbone, unknown keys, other tensors)."""
    return ModelFolderError(f"{folder} does not hold a model iqa can rebuild ({type(error).__name__}: "
                            f"{message_line(error)}); export the run again")


def message_line(error: Exception) -> str:
    return (str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)).splitlines()[0][:200]


def checked_config(folder: Path) -> ModelConfig:
    """config.json as a ModelConfig, refused unless its own checksum and the head's match and the head is a
    safetensors file."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFolderError(f"{config_path} is missing: not an iqa model folder")
    try:
        raw = json.loads(config_path.read_text())
        weights = folder / plain_name(raw["weights"]["file"], "weights file")
        expected = raw["weights"]["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{config_path} is not a valid model config ({message_line(err)})") from None
    if raw.get(CHECKSUM_FIELD) != config_checksum(raw):
        raise ModelFolderError(f"{config_path} does not match its checksum: edited or corrupt "
                               "(the recipe decides every score); export the run again instead of editing it")
    lacking = [k for k in ("format", "backbone", "head", "targets", "weights") if not isinstance(raw.get(k), (dict, str))]
    if lacking or raw["format"] != FORMAT:
        raise ModelFolderError(f"{config_path} is not an {FORMAT} config (lacking {', '.join(lacking) or 'its format'}); "
                               "export the run again")
    if weights.suffix != ".safetensors":
        raise ModelFolderError(f"{weights} is not a .safetensors file: iqa loads no other (pickled) weights")
    if not weights.is_file():
        raise ModelFolderError(f"{weights} is missing")
    if file_sha256(weights) != expected:
        raise ModelFolderError(f"{weights} does not match the checksum in {config_path}: altered or corrupt")
    try:
        return ModelConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise unbuildable(folder, error) from None


def build_model(folder: Path, config: ModelConfig, device: str, source: str | None) -> IqaModel:
    b = config.backbone
    try:
        backbone = load_backbone(get_spec(b.key, b.weights), source=source or base_weights(folder, config),
                                 weights=b.weights, resolution=b.resolution, preprocess=b.preprocess or "square")
    except BackboneLoadError as error:  # its fix names extraction's options; a model folder has its own
        raise ModelFolderError(f"the base {b.key} weights of {folder} cannot be loaded here "
                               f"({str(error).split(';')[0]}); give their folder or hub id as the model's source "
                               "(`iqa score --base`), or export the run with --bundle") from None
    if b.weights_sha256 and weights_sha256(backbone) != b.weights_sha256:
        raise ModelFolderError(f"the {b.key} backbone loaded here differs from the one the model was trained on")
    if b.pooling and b.pooling != pooling_rule(backbone.spec):
        raise ModelFolderError(f"the model was trained on {b.key} features pooled as {b.pooling}, "
                               f"this iqa pools them as {pooling_rule(backbone.spec)}")
    backbone = apply_tuning(backbone, folder, b.tuning)
    if b.layers:
        if family_of(backbone.spec).in_worker:
            raise ModelFolderError(f"{folder / CONFIG_FILE} names stored layers, but {b.key} computes fixed features with none")
        backbone.use_layers(tuple(b.layers), *([b.spatial] if b.spatial else []))  # maps: transformers towers only
    head, _ = load_head(folder / config.weights.file)
    dtype = getattr(torch, b.compute_dtype or "float32")
    return IqaModel(config, Embedder(backbone.spec, backbone, device, dtype), head.to(device), folder)


def base_weights(folder: Path, config: ModelConfig) -> str | None:
    """The base backbone's weights a model folder names: its bundled copy (checked file by file), its hub id,
    or none (a tiny or random-init backbone, rebuilt from the registry's config)."""
    b = config.backbone
    if b.weights != "pretrained":
        return None
    if b.bundled:
        check_files(folder, b.bundled.files)
        return str(folder / b.bundled.path)
    if b.local_checkpoint:
        raise ModelFolderError(f"{folder} was trained on a local checkpoint ({b.model_id}) it does not carry: give "
                               "that checkpoint as the model's source (`iqa score --base`), or export the run with --bundle")
    return b.model_id


def check_files(folder: Path, files: dict[str, str]) -> None:
    """Each named file is inside the folder and matches its checksum in config.json."""
    for name, sha in files.items():
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ModelFolderError(f"{folder / CONFIG_FILE} names a file outside the folder: {name}")
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing")
        if file_sha256(path) != sha:
            raise ModelFolderError(f"{path} does not match the checksum in {folder / CONFIG_FILE}: altered or corrupt")


def model_files(folder: Path, config: ModelConfig) -> list[str]:
    """The files of a model folder, relative to it: config.json, the model card, the head's weights, the
    tuning files and a bundled backbone's files (every one but the card checksummed in config.json)."""
    b = config.backbone
    listed = [CONFIG_FILE, config.weights.file, *b.tuning.files, *(b.bundled.files if b.bundled else {})]
    return listed + ([CARD_FILE] if (folder / CARD_FILE).is_file() else [])


def apply_tuning(backbone: PooledBackbone, folder: Path, tuning: Tuning) -> PooledBackbone:
    """The base backbone with a fine-tuning run's adapter merged in, or its full weights loaded;
    each file checked against config.json's checksum first, and only safetensors weights read."""
    check_files(folder, tuning.files)
    pickled = [p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickled:
        raise ModelFolderError(f"{folder} holds pickled weights ({', '.join(sorted(pickled))}): iqa loads only "
                               "safetensors; remove them or export the run again")
    if tuning.regime == "lora":
        from peft import PeftModel  # imports in ~2 s: only for a LoRA model

        from iqa.extract.tuning import lora_layout

        if not (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file():
            raise ModelFolderError(f"{folder / ADAPTER_DIR / 'adapter_model.safetensors'} is missing")
        return PeftModel.from_pretrained(lora_layout(backbone), str(folder / ADAPTER_DIR)).merge_and_unload().eval()
    if tuning.regime == "full":
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
    loader = DataLoader(rows, batch_size=batch_size or default_batch_size(model.embedder.device), num_workers=workers,
                        generator=torch.Generator())  # not torch's global one: see extract_dataset
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
    from iqa.cache.load import load_cached
    from iqa.cache.store import store_exists, store_path

    b = model.config.backbone
    if b.tuning.regime != "frozen":
        return None
    if not store_exists(store_path(cache, dataset, b.key, b.tag)):
        return None
    cached = load_cached(cache, dataset, b.key, b.tag)  # refuses a stale, damaged or unfinished store
    mine = {"backbone": b.key, **{k: getattr(b, k) for k in EMBEDDING_FIELDS[1:]}}
    if "tuned" in cached.fingerprint or any(cached.fingerprint.get(k) != mine[k] for k in EMBEDDING_FIELDS):
        return None
    layers = tuple(b.layers or ())
    if not layers:
        return cached
    if not set(layers) <= set(cached.fingerprint.get("layers", [])):
        return None
    if b.spatial and cached.fingerprint.get("spatial") != b.spatial:
        return None
    return cached.select_layers(layers, b.spatial)  # what a head trained on stored layers (or their maps) reads


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
