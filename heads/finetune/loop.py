"""End-to-end fine-tuning: a backbone and one head of the stacked MLP (M = 1), trained on images.

Regimes (Suppl. A.3, B.1; Table S1):
- `lora`: PEFT LoRA (rank 4, alpha 8, dropout 0.05) on the registry's target modules; the adapter
  and the head train at `lr`, the base weights stay fixed.
- `full`: every backbone weight trains at `backbone_lr` (5e-6), the head at `lr` (1e-4).
- `frozen`: the head alone trains on live backbone features (the control of the cached path).

The loss is the cached trainer's: physical batches of 2, gradients accumulated over 6, each
micro-batch of 2 scored alone (its own MSE and margin) and the micro-batch losses averaged, i.e.
`iqa_loss(pred, target, micro_batch=2) / accumulate` per physical batch. An epoch is
floor(n_train / 12) optimiser steps over the seed's 80% train split, in the cached trainer's order
(heads/training/trainer.py `epoch_order`, drawn from (seed, epoch) alone: a frozen run sees the batches a
cached-head run of the same seed sees); Adam; the same schedule (`make_scheduler`: x0.2 at epochs
15 and 25 on large sets). Where the hardware has bf16 (`--dtype auto`: GPUs, AVX512-BF16/AMX CPUs)
the forward runs under autocast (bf16, or fp16 with a grad scaler); the weights stay float32 and the
gated activation computes in float32 whatever the autocast dtype.

After every epoch: SRCC/PLCC on the test split (and on the validation part carved from the training
split under `select="val"`, as cached runs carve it, and on every `tests` dataset whole), then a
checkpoint (extract/checkpoint.py) from which a killed run resumes exactly. A loss or prediction
that goes NaN/inf stops the run: its last good checkpoint stays and it is recorded as diverged.
The finished run goes to the results database with regime = mode, keyed by its config and the
fingerprint of the base weights and the manifest. Each `tests` dataset gives a cross-dataset
record of its own (test_dataset = that set, keyed by both fingerprints and its rows, selected on
its own curve as a cached cross run is); the extra evaluations run on a forked RNG, so a run trains
the same numbers with or without them. Gated heads add their gate vector g per epoch to the curves
(g_act1, g_act2), as cached runs do. The epoch the selection rule keeps (`test`: best test SRCC,
`val`: best validation SRCC, or `last`) leaves its head and adapter (or full backbone weights), and
its test features (heads/finetune/features.py), under the database's runs/<key>/
(heads/saved/weights.py), for `iqa export` and the report.

BatchNorm layers (ResNet) keep their running statistics in every regime: a batch of 2 cannot
estimate them.
"""

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from iqa.cache.location import backbone_label, dataset_name, plain_name
from iqa.cache.manifest import Manifest, manifest_checksum, read_manifest
from iqa.cache.results import ResultsDB, default_db
from iqa.cache.store import fingerprint_id
from iqa.data.splits import split_indices
from iqa.extract.backbones import PooledBackbone, family_of, load_backbone, weights_sha256
from iqa.extract.checkpoint import (
    load_checkpoint, load_scheduler_state, restore_rng_states, rng_states, run_name, save_checkpoint, scheduler_state,
)
from iqa.errors import SettingError
from iqa.extract.preprocess import normalise
from iqa.extract.registry import get_spec, tag_weights
from iqa.extract.run import ImageRows, compute_dtype_for, make_fingerprint
from iqa.extract.tuning import add_lora
from iqa.heads.finetune.explain_every import MapsOverTraining
from iqa.heads.finetune.features import save_features
from iqa.heads.finetune.config import MICRO_BATCH, MODES, TuneRun, finetune_config  # noqa: F401 (the loop's API)
from iqa.heads.models.activations import GatedActivation
from iqa.heads.models.mlp import StackedMLP, head_activations, member_seed
from iqa.heads.saved.weights import RUNS_DIR, run_weights_path, save_tuned
from iqa.heads.training.config import RunConfig, rows_digest, run_key
from iqa.heads.training.grid import validation_rows
from iqa.heads.training.loss import iqa_loss
from iqa.heads.training.selection import SCORE_CURVE, improved
from iqa.heads.training.trainer import (
    RunResult, epoch_metrics, epoch_order, gate_parameters, make_optimizer, make_scheduler, new_curves, record_epoch,
    result_from_curves,
)

EVAL_BATCH = 16
TEST_SPLIT, VALIDATION = "<test split>", "<validation>"  # beside cross datasets' names, which never hold "<"


class FinetuneModel(nn.Module):
    """Normalised images [B, 3, H, W] -> predicted quality [B]: backbone, pooled embedding (scaled to unit
    length with `l2norm`, as the cached trainer's `--l2norm`), head (M = 1)."""

    def __init__(self, backbone: nn.Module, head: StackedMLP, frozen_backbone: bool, l2norm: bool = False):
        super().__init__()
        self.backbone, self.head, self.frozen_backbone, self.l2norm = backbone, head, frozen_backbone, l2norm

    def train(self, mode: bool = True) -> "FinetuneModel":
        super().train(mode)
        for module in self.backbone.modules():
            if self.frozen_backbone or isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled embedding [B, D] the head reads."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            features = self.backbone(pixels).float()
        return nn.functional.normalize(features, dim=1) if self.l2norm else features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels)[None])[0]


def embedding_dim(backbone: PooledBackbone, spec) -> int:
    with torch.no_grad():
        return backbone(torch.zeros(1, 3, spec.resolution, spec.resolution)).shape[1]


def build_model(backbone: PooledBackbone, spec, mode: str, head: str, seed: int, lora_rank: int, dim: int,
                l2norm: bool = False, lora_alpha: float | None = None, mask_k: float = 100.0,
                dropout: str | None = None, keep: float = 1.0) -> FinetuneModel:
    """The model of one run on a backbone of `dim`-wide embeddings (`embedding_dim`); LoRA's initial A
    matrices come from torch's global RNG (seed it first). The head is the cached trainer's, masking
    (`mask_k`) and dropout (`keep`) included."""
    if mode == "lora":
        backbone = add_lora(backbone, spec, lora_rank, lora_alpha)
    else:
        backbone.requires_grad_(mode == "full")
    mlp = StackedMLP(dim, [seed], *head_activations(head), mask_k=[mask_k], dropout=dropout, keep=[keep])
    return FinetuneModel(backbone, mlp, frozen_backbone=mode == "frozen", l2norm=l2norm)


def finetune_optimizer(model: FinetuneModel, config: RunConfig) -> torch.optim.Optimizer:
    """The run's optimizer with a backbone group (the adapter at `lr`, or every weight at `backbone_lr`)
    and a head group at `lr`."""
    trained = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()), "lr": config.lr, "name": "head"}]
    if trained:
        lr = config.backbone_lr if config.regime == "full" else config.lr
        groups.insert(0, {"params": trained, "lr": lr, "name": "backbone"})
    return make_optimizer(groups, config.optimizer, config.weight_decay)


def trained_backbone_state(model: FinetuneModel) -> dict[str, torch.Tensor]:
    """What the run changed in the backbone: the LoRA adapter, every weight (full), or nothing (frozen)."""
    if isinstance(model.backbone, PeftModel):
        return get_peft_model_state_dict(model.backbone)
    return model.backbone.state_dict() if not model.frozen_backbone else {}


def load_trained_backbone_state(model: FinetuneModel, state: dict[str, torch.Tensor]) -> None:
    if isinstance(model.backbone, PeftModel):
        set_peft_model_state_dict(model.backbone, state)
    elif not model.frozen_backbone:
        model.backbone.load_state_dict(state)


def default_run_dir(cache: Path, config: dict, tests: tuple[str, ...] = ()) -> Path:
    """<cache>/runs/<dataset>/<backbone>[@tag]-<run_name>[-x-<test>+<test>]."""
    name = backbone_label(config["backbone"], config["tag"])
    cross = f"-x-{'+'.join(tests)}" if tests else ""
    return (Path(cache) / RUNS_DIR / dataset_name(config["train_dataset"])
            / plain_name(f"{name}-{run_name(config)}{cross}", "run name"))


@dataclass(frozen=True)
class Runtime:
    """How runs train, not what they learn: nothing here is in a key (the compute dtype it resolves to is)."""

    device: str = "cpu"
    dtype: str = "auto"
    source: str | None = None  # base weights: HF id or folder, instead of the registry's
    num_workers: int = 2
    progress: bool = True
    explain_every: int | None = None  # Grad-CAM of a few fixed test images every N steps (explain_every.py)


@dataclass
class Images:
    """One dataset's images and targets, read onto the device in batches of rows."""

    rows: ImageRows
    manifest: Manifest
    targets: torch.Tensor

    @classmethod
    def of(cls, manifest: Manifest, spec) -> "Images":
        return cls(ImageRows(Path(manifest.image_root), manifest.paths, spec), manifest,
                   torch.as_tensor(manifest.targets, dtype=torch.float32))

    def batches(self, rows: list[list[int]], device: str, num_workers: int):
        """(targets, normalised images) on the device; an unreadable image stops the run with its name."""
        cuda = torch.device(device).type == "cuda"
        loader = DataLoader(self.rows, batch_sampler=rows, num_workers=num_workers, pin_memory=cuda)
        spec = self.rows.spec
        for row_ids, pixels, reasons, _ in loader:
            bad = [f"{self.manifest.paths[r]}: {why}" for r, why in zip(row_ids.tolist(), reasons) if why]
            if bad:
                raise ValueError(f"cannot read {bad[0]}; fix or remove it and prepare the dataset again")
            pixels = normalise(pixels.to(device, non_blocking=True), spec.mean, spec.std)
            yield self.targets[row_ids].to(device, non_blocking=True), pixels


@dataclass
class Scored:
    """Rows of a dataset scored after every epoch: the seed's test split, the validation part, or a cross dataset."""

    images: Images
    rows: np.ndarray

    def chunks(self) -> list[list[int]]:
        return [chunk.tolist() for chunk in np.array_split(self.rows, -(-len(self.rows) // EVAL_BATCH))]


@dataclass
class TunePlan:
    """One run ready to train: its config, base model, fingerprint, key(s), rows and where it checkpoints."""

    config: RunConfig  # with the compute dtype it runs in
    base: PooledBackbone
    dim: int
    fingerprint: dict
    fingerprint_id: str
    key: str
    run_dir: Path
    train: Images
    fit_rows: np.ndarray  # the training rows it learns from (the validation part left out)
    scored: dict[str, Scored]  # TEST_SPLIT first, VALIDATION under select="val", then each cross dataset by name
    cross: dict[str, tuple[str, str, RunConfig]] = field(default_factory=dict)  # dataset: (key, fingerprint id, config)

    @property
    def keys(self) -> list[str]:
        """The results this run records: its own, then one per cross dataset."""
        return [self.key, *(key for key, _, _ in self.cross.values())]

    @property
    def checkpoint_key(self) -> str:
        """What its checkpoint must hold: the run's key, or with cross datasets a digest of every key."""
        return self.key if not self.cross else hashlib.sha256("+".join(self.keys).encode()).hexdigest()


def split_rows(manifest: Manifest, config: RunConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(train, fit, validation, test) rows of a run: the seed's split, and under `select="val"` the
    validation part carved from its training rows as a cached run's (fit = train otherwise)."""
    train_rows, test_rows = split_indices(manifest.paths, config.seed, by=config.split_by, groups=manifest.groups,
                                           sets=manifest.extras.get("set"))
    fit_rows, val_rows = train_rows, None
    if config.select == "val":
        every_image = SimpleNamespace(manifest=manifest, valid=np.ones(len(manifest.paths), dtype=bool))
        fit_rows, val_rows = validation_rows(config, train_rows, every_image)
    if len(fit_rows) < config.batch_size:
        raise ValueError(f"{len(fit_rows)} training images cannot fill one batch of {config.batch_size}")
    return train_rows, fit_rows, val_rows, test_rows


def plan_run(cache: Path, run: TuneRun, runtime: Runtime = Runtime(), run_dir: Path | None = None) -> TunePlan:
    """Load the base model, fingerprint it with the manifest(s) and key the run; nothing trains yet."""
    config = run.config
    weights = tag_weights(config.tag)
    spec = get_spec(config.backbone, weights)
    if not family_of(spec).tunable:
        raise ValueError(f"{config.backbone} computes fixed features: it has no backbone weights to fine-tune")
    manifest = read_manifest(cache, config.train_dataset)
    tests = [read_manifest(cache, name) for name in run.tests]  # a missing one fails before the weights load
    train_rows, fit_rows, val_rows, test_rows = split_rows(manifest, config)
    compute_dtype = compute_dtype_for(runtime.device, runtime.dtype)
    config = replace(config, compute_dtype=str(compute_dtype).removeprefix("torch."))
    base = load_backbone(spec, source=runtime.source, weights=weights)
    spec = base.spec  # at the loaded checkpoint's geometry: its own image_size, width and resample
    # What the run depends on besides its config: the base weights (hashed before LoRA wraps them), the manifest.
    dim = embedding_dim(base, spec)  # a whole forward pass (seconds at 512 px on a CPU): once
    identity = (spec, base, weights_sha256(base), dim, compute_dtype, "live")
    fingerprint = make_fingerprint(*identity, manifest_checksum(cache, config.train_dataset))
    fp_id = fingerprint_id(fingerprint)
    train = Images.of(manifest, spec)
    scored = {TEST_SPLIT: Scored(train, test_rows)}
    if val_rows is not None:
        scored[VALIDATION] = Scored(train, val_rows)
    cross = {}
    for name, other in zip(run.tests, tests):
        cross_fp = f"{fp_id}+{fingerprint_id(make_fingerprint(*identity, manifest_checksum(cache, name)))}"
        rows = np.arange(len(other.paths))  # all of it, as a cached cross-dataset run tests
        cross_config = replace(config, test_dataset=name)
        cross[name] = (run_key(cross_config, cross_fp, rows_digest(train_rows, rows)), cross_fp, cross_config)
        scored[name] = Scored(Images.of(other, spec), rows)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cache, config.to_dict(), run.tests)
    if run_dir.exists() and not run_dir.is_dir():
        raise SettingError(f"`run_dir` {run_dir} is a file; give a folder (new, or an earlier run's to resume it)")
    return TunePlan(config, base, dim, fingerprint, fp_id, run_key(config, fp_id, rows_digest(train_rows, test_rows)),
                    run_dir, train, fit_rows, scored, cross)


class Tuning:
    """The training state of one planned run (model, optimiser, schedule, scaler, curves) and its epochs."""

    def __init__(self, plan: TunePlan, runtime: Runtime, kept: Path):
        config = self.config = plan.config
        self.plan, self.runtime, self.kept = plan, runtime, kept
        compute_dtype = getattr(torch, config.compute_dtype)
        self.cast = dict(device_type=torch.device(runtime.device).type, dtype=compute_dtype,
                         enabled=compute_dtype != torch.float32)
        self.model = build_model(plan.base, plan.base.spec, config.regime, config.head, config.seed, config.lora_rank,
                                 plan.dim, config.l2norm, config.lora_alpha, config.mask_k, config.dropout,
                                 config.keep).to(runtime.device)
        self.optimizer = finetune_optimizer(self.model, config)
        self.scheduler = make_scheduler(self.optimizer, config.milestones)
        self.scaler = torch.amp.GradScaler(self.cast["device_type"], enabled=compute_dtype == torch.float16)
        self.gated = [n for n in ("act1", "act2") if isinstance(getattr(self.model.head, n), GatedActivation)]
        validation = VALIDATION in plan.scored
        self.curves = {name: new_curves(self.gated, validation) for name in plan.scored if name != VALIDATION}
        self.epoch, self.diverged_epoch = 0, None
        self.kept_score = -np.inf

    def resume(self) -> None:
        """Go on from the run folder's checkpoint, if it has one of this run."""
        state = load_checkpoint(self.plan.run_dir)
        if state is None:
            return
        if state["key"] != self.plan.checkpoint_key:
            mine = self.config.to_dict()
            differ = sorted(k for k in mine | state["config"] if mine.get(k) != state["config"].get(k))
            what = ", ".join(differ) or "base weights, manifest or test sets"
            raise ValueError(f"{self.plan.run_dir} holds another run (differs in {what}); pass another --run-dir or "
                             "delete it")
        load_trained_backbone_state(self.model, state["backbone"])
        self.model.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"])
        set_dropout_states(self.model.head, state.get("dropout_rng", []))
        self.epoch, self.curves = state["epoch"], {TEST_SPLIT: state["curves"], **state.get("cross_curves", {})}
        if self.config.select != "last":  # the kept epoch's score
            self.kept_score = max([s for s in self.curves[TEST_SPLIT][SCORE_CURVE[self.config.select]] if s == s],
                                  default=-np.inf)

    def train_one_epoch(self, on_step: Callable[[], None]) -> bool:
        """Train, score and checkpoint one epoch; False when it diverged (the last good checkpoint stays)."""
        plan, config, runtime = self.plan, self.config, self.runtime
        per_step, steps = config.batch_size, len(plan.fit_rows) // config.batch_size
        order = epoch_order(plan.fit_rows, config.seed, self.epoch)[: steps * per_step].reshape(-1, config.physical_batch)
        if runtime.explain_every:
            maps = MapsOverTraining(plan, TEST_SPLIT, self.model, self.kept, runtime.explain_every, self.epoch * steps)

            def step_and_maps() -> None:
                on_step()
                maps.after_step()
        loss_sum = train_epoch(self.model, self.optimizer, self.scaler,
                               plan.train.batches(order.tolist(), runtime.device, runtime.num_workers),
                               config.accumulate, self.cast, step_and_maps if runtime.explain_every else on_step,
                               config.loss, config.micro_batch)
        preds = None if loss_sum is None else self.score()
        if preds is None or not all(torch.isfinite(p).all() for p in preds.values()):
            self.diverged_epoch = self.epoch + 1
            return False
        self.record(loss_sum / steps, preds)
        self.scheduler.step()
        self.epoch += 1
        self.keep_if_selected()  # before the checkpoint: a kill redoes the epoch
        self.save()
        return True

    def score(self) -> dict[str, torch.Tensor]:
        """Predictions on every scored set; beyond the test split on a forked RNG (a data loader draws a seed),
        so validation and cross datasets leave the training numbers as they are without them."""
        device, workers = self.runtime.device, self.runtime.num_workers

        def on(scored: Scored, features: dict | None = None) -> torch.Tensor:
            return predict(self.model, scored.images.batches(scored.chunks(), device, workers), self.cast, features)

        self.test_features = {}  # kept with the epoch's weights, for the report's t-SNE
        preds = {TEST_SPLIT: on(self.plan.scored[TEST_SPLIT], self.test_features)}
        with torch.random.fork_rng(devices=cuda_devices(device)):
            preds |= {name: on(scored) for name, scored in self.plan.scored.items() if name != TEST_SPLIT}
        return preds

    def record(self, train_loss: float, preds: dict[str, torch.Tensor]) -> None:
        scored = self.plan.scored
        metrics = {name: epoch_metrics(pred[None], scored[name].images.targets[scored[name].rows][None])
                   for name, pred in preds.items()}
        shared = {"train_loss": train_loss, "lr": self.optimizer.param_groups[-1]["lr"]}  # the head's lr
        shared |= {f"g_{n}": getattr(self.model.head, n).g.detach().cpu().numpy().round(4).tolist()[0]
                   for n in self.gated}
        if VALIDATION in metrics:
            (val_srcc,), (val_plcc,) = metrics[VALIDATION]
            shared |= {"val_srcc": val_srcc, "val_plcc": val_plcc}
        for name, curve in self.curves.items():
            (srcc,), (plcc,) = metrics[name]
            record_epoch(curve, srcc=srcc, plcc=plcc, **shared)

    def keep_if_selected(self) -> None:
        config = self.config
        score = self.curves[TEST_SPLIT][SCORE_CURVE.get(config.select, "srcc")][-1]
        if improved([score], [self.kept_score], config.select)[0]:
            self.kept_score = score
            save_tuned(self.kept, self.model.head.state_dict(), self.model.backbone, config.regime, config.to_dict(),
                       self.plan.fingerprint)
            test = self.plan.scored[TEST_SPLIT]
            save_features(self.kept, test.rows, test.images.targets[test.rows].numpy(), self.test_features)

    def save(self) -> None:
        plan, curves = self.plan, self.curves
        save_checkpoint(plan.run_dir, {
            "key": plan.checkpoint_key, "config": self.config.to_dict(), "fingerprint": plan.fingerprint,
            "epoch": self.epoch, "backbone": trained_backbone_state(self.model), "head": self.model.head.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict(), "rng": rng_states(), "dropout_rng": dropout_states(self.model.head),
            "curves": curves[TEST_SPLIT], "cross_curves": {k: v for k, v in curves.items() if k != TEST_SPLIT},
        })

    def results(self) -> list[tuple[str, dict, str, RunResult]]:
        """The rows the results database takes: the run's own, then one per cross dataset."""
        gates = gate_parameters(self.model.head, 0) if self.diverged_epoch is None else None
        plan, select = self.plan, self.config.select
        rows = [(plan.key, self.config.to_dict(), plan.fingerprint_id,
                 result_from_curves(self.curves[TEST_SPLIT], self.diverged_epoch, gates, select))]
        for name, (key, fp_id, config) in plan.cross.items():
            result = result_from_curves(self.curves[name], self.diverged_epoch, gates, select)
            rows.append((key, config.to_dict(), fp_id, result))
        return rows


def cuda_devices(device: str) -> list[int]:
    return [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []


def dropout_states(head: StackedMLP) -> list[torch.Tensor]:
    """The head's dropout generators (seeded on first use), so a resumed run draws the masks it would have."""
    return [g.get_state() for g in head._dropout_generators or []]


def set_dropout_states(head: StackedMLP, states: list[torch.Tensor]) -> None:
    if states:
        head._dropout_generators = [torch.Generator().set_state(s) for s in states]


def train_run(plan: TunePlan, kept: Path, runtime: Runtime = Runtime(),
              on_epoch: Callable[[int], None] | None = None) -> tuple[list[tuple], int]:
    """Train (or resume) a planned run; (its results database rows, epochs trained by this call).
    `kept` is the folder the selected epoch's weights go to; `on_epoch(epoch)` runs after each checkpoint."""
    config = plan.config
    with torch.random.fork_rng(devices=cuda_devices(runtime.device)):  # the caller's RNG is left as it was
        torch.manual_seed(member_seed(config.seed, "torch"))  # LoRA init and dropout
        tuning = Tuning(plan, runtime, kept)
        tuning.resume()
        start, steps = tuning.epoch, len(plan.fit_rows) // config.batch_size
        label = f"{config.train_dataset}/{plan.run_dir.name}"
        with tqdm(total=(config.epochs - start) * steps, unit="step", desc=label, disable=not runtime.progress) as bar:
            while tuning.epoch < config.epochs and tuning.train_one_epoch(bar.update):
                curve = tuning.curves[TEST_SPLIT]
                bar.set_postfix(loss=f"{curve['train_loss'][-1]:.4f}", srcc=f"{curve['srcc'][-1]:.3f}")
                if on_epoch is not None:
                    on_epoch(tuning.epoch)
    return tuning.results(), tuning.epoch - start


@dataclass
class FinetuneRun:
    run_dir: Path
    key: str  # the results database key
    fingerprint_id: str
    config: dict
    result: RunResult
    epochs_trained: int  # by this call (0 when the checkpoint had already finished)
    rows: list[tuple] = field(default_factory=list)  # every record it made: its own, then its cross datasets'


def finetune(
    cache: Path,
    config: RunConfig,
    device: str = "cpu",
    dtype: str = "auto",
    source: str | None = None,
    run_dir: Path | None = None,
    db: ResultsDB | None = None,
    num_workers: int = 2,
    progress: bool = True,
    on_epoch: Callable[[int], None] | None = None,
    tests: tuple[str, ...] = (),
) -> FinetuneRun:
    """Train (or resume) the run of `config` (`finetune_config`) and record it; `tests` are datasets also
    scored after every epoch (cross-dataset records). `source` overrides where the base weights come from."""
    runtime = Runtime(device, dtype, source, num_workers, progress)
    db = db if db is not None else ResultsDB(default_db(cache))
    plan = plan_run(cache, TuneRun(config, tuple(tests)), runtime, run_dir)
    rows, trained = train_run(plan, run_weights_path(db.path, plan.key).parent, runtime, on_epoch)
    db.record(rows)
    key, config_dict, fp_id, result = rows[0]
    return FinetuneRun(plan.run_dir, key, fp_id, config_dict, result, trained, rows)


def train_epoch(model: FinetuneModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], accumulate: int, cast: dict,
                on_step: Callable[[], None] | None = None, loss_name: str = "mse+margin",
                micro_batch: int = MICRO_BATCH) -> float | None:
    """Physical batches (targets, images) with an optimiser step after every `accumulate` of them.

    Returns the summed loss of the effective batches, or None when one goes NaN/inf: that step is
    not taken. Loss values are read once per optimiser step (one device sync per step).
    """
    model.train()
    loss_sum, step_loss = 0.0, 0.0
    for i, (target, pixels) in enumerate(batches):
        with torch.autocast(**cast):
            pred = model(pixels)
        loss = iqa_loss(pred[None], target[None], micro_batch, loss_name)[0] / accumulate
        scaler.scale(loss).backward()
        step_loss = step_loss + loss.detach()
        if (i + 1) % accumulate == 0:
            step_loss = step_loss.item()
            if not math.isfinite(step_loss):
                return None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, step_loss = loss_sum + step_loss, 0.0
            if on_step is not None:
                on_step()
    return loss_sum


@torch.no_grad()
def predict(model: FinetuneModel, batches, cast: dict, features: dict | None = None) -> torch.Tensor:
    """Predictions [n] in eval mode (no dropout) for the batches' rows, in their order, on the CPU; with
    `features` (a dict), also its "embeddings" [n, D] and the head's last "hidden" features [n, H]."""
    model.eval()
    out, parts = [], {"embeddings": [], "hidden": []}
    for _, pixels in batches:
        with torch.autocast(**cast):
            embeddings = model.embed(pixels)
            out.append(model.head(embeddings[None])[0].float().cpu())
            if features is not None:
                parts["embeddings"].append(embeddings.float().cpu())
                parts["hidden"].append(model.head.features(embeddings[None])[0].float().cpu())
    if features is not None:
        features.update({name: torch.cat(chunks).numpy() for name, chunks in parts.items()})
    return torch.cat(out)
