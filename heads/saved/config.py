"""A model folder's config.json as one typed record: `iqa export` writes a `ModelConfig`, loading reads one.

Its sections are the file's:

| section | what it says |
|---|---|
| `backbone` | which backbone, where its weights come from (`weights`: pretrained, random-init or tiny; the hub id or a bundled copy), the preprocessing its store's fingerprint recorded, any tuning, the stored layers the head reads |
| `head` | the head as the run trained it (activations, masking, dropout, a probe's fitted choice, fusion, a text head's prompts) |
| `training` | the run: datasets, split, seed, epochs, selection rule, fine-tuning regime |
| `targets` | the training set's score scale and the map back to its MOS (`mos = scale * score + offset`) |
| `metrics` | the kept epoch and its test SRCC/PLCC |
| `weights` | the head's safetensors file and its sha256 |
| `packages` | the versions that trained it |

`to_dict` gives the file's layout (format iqa-model-1); a field marked optional is left out when
empty, as exports have always left it out. `from_dict` reads what any iqa-model-1 export wrote:
a folder exported before `backbone.weights` was written says it through its tag (`tag_weights`).
A key the record does not know, or a missing one, is a TypeError: loading names the folder.
"""

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from iqa.extract.registry import WEIGHTS, tag_weights

CONFIG_FILE = "config.json"
CHECKSUM_FIELD = "config_sha256"
FORMAT = "iqa-model-1"
OPTIONAL = {"optional": True}  # field metadata: left out of the file when None


def record_dict(record) -> dict:
    """A record as the file holds it: nested records as objects, optional fields only when set."""
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is None and f.metadata.get("optional"):
            continue
        out[f.name] = record_dict(value) if is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class Tuning:
    """What fine-tuning changed in the backbone: nothing (frozen), a LoRA adapter or every weight (full)."""

    regime: str = "frozen"
    lora_rank: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # adapter/ or backbone.safetensors, relative path -> sha256


@dataclass(frozen=True)
class Bundle:
    """The base weights copied into the folder (`iqa export --bundle`)."""

    path: str  # the folder (or file) a loader reads, relative to the model folder
    files: dict[str, str]  # relative path -> sha256


@dataclass(frozen=True)
class BackboneConfig:
    key: str
    tag: str | None
    weights: str  # WEIGHTS: pretrained (model_id, or the bundle), random-init or tiny (rebuilt from the registry)
    model_id: str | None  # a hub id, or a local checkpoint's folder name (its path belongs to another machine)
    revision: str | None
    weights_sha256: str | None
    pooling: str | None
    dim: int | None
    resolution: int | None
    preprocess: str | None
    resample: str | None
    preprocessing: Any
    compute_dtype: str | None
    tuning: Tuning
    local_checkpoint: bool = False
    bundled: Bundle | None = field(default=None, metadata=OPTIONAL)
    layers: list[int] | None = field(default=None, metadata=OPTIONAL)  # the stored layers the head reads
    spatial: int | None = field(default=None, metadata=OPTIONAL)  # their S x S maps (`iqa extract --spatial`), not vectors

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        weights = d.get("weights", tag_weights(d.get("tag")))
        if weights not in WEIGHTS:
            raise ValueError(f"backbone weights {weights!r} is none of {', '.join(WEIGHTS)}")
        bundled = d.get("bundled")
        return cls(**{**d, "weights": weights, "tuning": Tuning(**(d.get("tuning") or {})),
                      "bundled": Bundle(**bundled) if bundled is not None else None})


@dataclass(frozen=True)
class HeadConfig:
    head: str
    act1: str | None
    act2: str | None
    mask_k: Any
    dropout: str | None
    keep: Any
    l2norm: bool
    probe: dict | None = field(default=None, metadata=OPTIONAL)  # a probe's choice by cross-validation
    fuse: str | None = field(default=None, metadata=OPTIONAL)  # the stages fused, not concatenated
    prompts: str | None = field(default=None, metadata=OPTIONAL)  # a text head's prompt set, pairs, template
    prompt_pairs: list | None = field(default=None, metadata=OPTIONAL)
    template: str | None = field(default=None, metadata=OPTIONAL)
    context: int | None = field(default=None, metadata=OPTIONAL)  # learned context vectors per prompt


@dataclass(frozen=True)
class TrainingConfig:
    train_dataset: str
    test_dataset: str
    split_by: str | None
    seed: int | None
    epochs: int | None
    lr: float | None
    batch_size: int | None
    select: str | None
    val_fraction: float | None
    regime: str | None
    backbone_lr: float | None
    physical_batch: int | None
    accumulate: int | None


@dataclass(frozen=True)
class MosMap:
    """mos = scale * score + offset: a score on the training targets' scale back on its MOS scale."""

    scale: float
    offset: float

    def apply(self, scores):
        return self.scale * scores + self.offset


@dataclass(frozen=True)
class Targets:
    score_scale: Any  # the MOS scale of the training set, as its manifest states it
    mos: MosMap


@dataclass(frozen=True)
class Metrics:
    best_epoch: int | None
    best_srcc: float | None
    best_plcc: float | None
    last_srcc: float | None
    last_plcc: float | None


@dataclass(frozen=True)
class WeightsFile:
    file: str
    sha256: str


@dataclass(frozen=True)
class ModelConfig:
    run_key: str
    backbone: BackboneConfig
    head: HeadConfig
    training: TrainingConfig
    targets: Targets
    metrics: Metrics
    weights: WeightsFile  # the head's
    packages: dict[str, str]
    format: str = FORMAT

    @property
    def label(self) -> str:
        """backbone[@tag]-head-dataset: the model's name on cards and pages."""
        b = self.backbone
        return f"{b.key}{'@' + b.tag if b.tag else ''}-{self.head.head}-{self.training.train_dataset}"

    def to_dict(self) -> dict:
        return record_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The record of a config.json's contents (its checksum field aside: `write_config` adds it)."""
        d = {k: v for k, v in d.items() if k != CHECKSUM_FIELD}
        targets = d["targets"]
        return cls(**{**d, "backbone": BackboneConfig.from_dict(d["backbone"]), "head": HeadConfig(**d["head"]),
                      "training": TrainingConfig(**d["training"]), "metrics": Metrics(**d["metrics"]),
                      "targets": Targets(**{**targets, "mos": MosMap(**targets["mos"])}),
                      "weights": WeightsFile(**d["weights"])})


def config_checksum(config: dict) -> str:
    """sha256 of the config's canonical JSON, its own checksum field left out."""
    return hashlib.sha256(json.dumps({k: v for k, v in config.items() if k != CHECKSUM_FIELD}, sort_keys=True).encode()).hexdigest()


def write_config(folder: Path, config: dict) -> None:
    """config.json (`ModelConfig.to_dict`'s layout) with its checksum inside: an edited recipe (preprocessing,
    l2norm, the MOS map) is refused on load like an altered weights file, instead of silently changing every score."""
    config = {**config, CHECKSUM_FIELD: config_checksum(config)}
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
