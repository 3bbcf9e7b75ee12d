"""One run's config, the recipe the code trains it with, and the key its result is stored under.

A `RunConfig` is what a user chooses for one run, cached head or fine-tuning alike (the fields only
fine-tuning has stay None for cached runs). The key of a result hashes three things, so it changes
whenever the result could:
- the config;
- the recipe: the numbers the code decides rather than the user (learning-rate milestones and decay,
  the loss's margin, hidden width, batch layout) and `TRAINER_VERSION`, bumped
  whenever a change to the training code changes the numbers a config gives;
- the data: the fingerprint of the embedding store (or, for fine-tuning, of the base weights and the
  manifest) and a digest of the exact train and test rows, so a run on a store with rows missing
  never stands in for the run on the complete store.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from iqa.heads.models.fusion import check_fusion, fusion_recipe
from iqa.cache.store import LAYER_POOLING, MAP_POOLING, check_map_side
from iqa.heads.training.loss import LOSSES, MARGIN_SCALE, loss_recipe
from iqa.heads.models.hyper import HYPER, check_hyper_target, hyper_recipe
from iqa.heads.models.mlp import HIDDEN
from iqa.heads.models.probes import PROBES, check_knn_k, probe_recipe
from iqa.errors import SettingError

# 2: one data order (seed, epoch) and torch's MultiStepLR for the cached and fine-tuning paths.
TRAINER_VERSION = 2
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
LARGE_DATASETS = frozenset({"koniq10k", "kadid10k", "flive", "spaq"})
LARGE_MILESTONES = (15, 25)  # MultiStepLR epochs for large sets (Suppl. A.3)
LR_DECAY = 0.2


def lr_milestones(train_dataset: str) -> tuple[int, ...]:
    """Large sets decay x0.2 at epochs 15 and 25; small sets keep a constant lr."""
    return LARGE_MILESTONES if train_dataset in LARGE_DATASETS else ()


# fields left out of a config's dict (and so its key) while None: added after runs were stored under keys without them
OPTIONAL_FIELDS = ("layers", "fuse", "knn_k", "hyper_target", "lora_alpha", "spatial")


@dataclass(frozen=True)
class RunConfig:
    train_dataset: str
    test_dataset: str
    backbone: str
    head: str
    act1: str
    act2: str
    seed: int
    mask_k: float = 100.0
    dropout: str | None = None
    keep: float = 1.0
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 12  # rows per optimiser step
    micro_batch: int | None = 2  # rows the loss scores alone
    split_by: str = "random"
    regime: str = "frozen"  # frozen (cached or live features), lora or full
    tag: str | None = None  # tiny / random-init models, fine-tuned stores
    loss: str = "mse+margin"  # heads/training/loss.py LOSSES
    optimizer: str = "adam"  # adam (the paper's) or adamw (SMART-IQA's)
    weight_decay: float = 0.0
    standardize: bool = False  # z-score features with the run's own train rows' mean and std
    l2norm: bool = False  # heads see unit-length embeddings (stores hold the raw vector)
    select: str = "test"  # which epoch the run keeps and reports: iqa.heads.training.selection
    val_fraction: float = 0.1  # of the seed's training rows, held out when select == "val"
    layers: tuple[int, ...] | None = None  # heads see these stored layers concatenated (from 1); None: the default embedding
    fuse: str | None = None  # "attention" or "smart": the layers fused by heads/models/fusion.py instead of read concatenated
    compute_dtype: str | None = None  # cached heads: None (float32) or "bfloat16" (autocast); fine-tuning records its own
    knn_k: int | None = None  # the knn probe's k fixed (ALOE: 20); None: chosen by cross-validation
    hyper_target: str | None = None  # the hyper head as SMART-IQA's App. A sizes it: eq16 or table4; None: iqa's
    spatial: int | None = None  # the fusion reads the stored layers' S x S maps (`iqa extract --spatial S`); None: their vectors
    # fine-tuning only
    physical_batch: int | None = None
    accumulate: int | None = None
    lora_rank: int | None = None
    backbone_lr: float | None = None
    lora_alpha: float | None = None  # None: 2 x lora_rank (the paper's rank 4, alpha 8)

    def __post_init__(self):
        if self.layers is not None:  # a list when read back from JSON; a tuple keeps configs hashable
            object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.micro_batch is not None and (self.micro_batch < 2 or self.batch_size % self.micro_batch):
            raise SettingError(f"`micro_batch` {self.micro_batch} must be at least 2 (the loss scores pairs) and divide "
                             f"the batch of {self.batch_size}")
        if self.weight_decay < 0:
            raise SettingError(f"`weight_decay` must be at least 0, got {self.weight_decay}")
        for option, rate in (("lr", self.lr), ("backbone_lr", self.backbone_lr)):
            if rate is not None and not 0 < rate < float("inf"):
                raise SettingError(f"`{option}` must be a positive number, got {rate}")
        check_knn_k(self.head, self.knn_k)
        check_hyper_target(self.head, self.hyper_target, self.dropout)
        if self.fuse is not None:
            check_fusion(self.fuse, self.layers)
            if self.head in PROBES:
                raise SettingError(f"`fuse` trains a fusion in front of an MLP or hyper head; the probes ({', '.join(PROBES)}) take none")
        if self.spatial is not None:
            if self.fuse is None:
                raise SettingError("`spatial` feeds the stored layers' maps to a fusion (SMART-IQA Eq. 4-10): give `layers` "
                                   "and `fuse` with it, e.g. `layers` 4,3,2,1 `fuse` smart")
            check_map_side(self.spatial)

    def to_dict(self) -> dict:
        """What the results database stores and the key hashes: the fields, the optional ones (OPTIONAL_FIELDS)
        only where set, so configs without them keep the keys they always had."""
        d = asdict(self)
        for name in OPTIONAL_FIELDS:
            if d[name] is None:
                del d[name]
        if "layers" in d:
            d["layers"] = list(d["layers"])
        return d

    @classmethod
    def from_dict(cls, stored: dict) -> "RunConfig":
        """The config `stored` holds: a `to_dict`, or a database run (its config merged with its outcome, whose
        keys are ignored). A field the row lacks takes its default above, what a run without that field trains
        with; `layers` and `fuse`, which `to_dict` leaves out where unset, so read back under the key the row was
        stored with. Values are taken as stored (an int `mask_k` stays an int): `from_dict(c.to_dict()) == c`,
        and a stored config reads back to the very dict, hence the key, it was stored as."""
        return cls(**{f.name: stored[f.name] for f in fields(cls) if f.name in stored})

    def trainer_options(self) -> dict:
        """The keyword options of train_stack_model (the fields of its TrainSettings) this config sets."""
        names = ("act1", "act2", "dropout", "epochs", "batch_size", "micro_batch", "loss", "optimizer", "weight_decay",
                 "standardize", "select", "fuse", "compute_dtype", "hyper_target", "spatial")
        return {name: getattr(self, name) for name in names}

    @property
    def milestones(self) -> tuple[int, ...]:
        return lr_milestones(self.train_dataset)

    def recipe(self) -> dict:
        """What the code decides for this config; part of the key (a probe's adds its CV grid, the hyper head and
        the fusion their sizes, a run on stored layers how they were pooled)."""
        probe = {"probe": probe_recipe(self.head, self.knn_k)} if self.head in PROBES else {}
        positions = (self.spatial or 1) ** 2
        hyper = ({"hyper": hyper_recipe(None if self.fuse else self.layers, self.hyper_target, self.fuse is not None, positions)}
                 if self.head == HYPER else {})
        fusion = {"fusion": fusion_recipe(self.fuse, self.spatial)} if self.fuse is not None else {}
        layered = {"layer_pooling": LAYER_POOLING} if self.layers else {}
        if self.spatial:
            layered["map_pooling"] = MAP_POOLING
        return probe | hyper | fusion | layered | loss_recipe(self.loss) | {
            "trainer_version": TRAINER_VERSION,
            "milestones": list(self.milestones),
            "lr_decay": LR_DECAY,
            "margin_scale": MARGIN_SCALE,
            "hidden": HIDDEN,
            "batches": "floor(n_train / batch_size) full batches per epoch, order from (seed, epoch)",
        }


def complete_run(run: dict) -> dict:
    """A stored run (config merged with outcome) with every config field, an older row's missing ones at their
    defaults (`RunConfig.from_dict`); `layers` a tuple or None."""
    return run | asdict(RunConfig.from_dict(run))


def rows_digest(train_rows: np.ndarray, test_rows: np.ndarray, *more_rows: np.ndarray) -> str:
    """A short digest of the exact rows a run trains and tests on (and selects on, where given)."""
    h = hashlib.sha256()
    for rows in (train_rows, test_rows, *more_rows):
        h.update(np.asarray(rows, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def run_key(config: RunConfig, fingerprint_id: str, rows: str) -> str:
    """The results database key of `config` trained on data `fingerprint_id`, rows `rows` (`rows_digest`)."""
    canonical = json.dumps(
        {"config": config.to_dict(), "recipe": config.recipe(), "fingerprint_id": fingerprint_id, "rows": rows},
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
