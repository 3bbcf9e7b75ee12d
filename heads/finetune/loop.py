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
15 and 25 on large sets). Where
the hardware has bf16 (`--dtype auto`: GPUs, AVX512-BF16/AMX CPUs) the forward runs under autocast
(bf16, or fp16 with a grad scaler); the weights stay float32 and the gated activation computes in
float32 whatever the autocast dtype. SRCC/PLCC on the test split after every epoch; a checkpoint
after every epoch (extract/checkpoint.py), from which a killed run resumes exactly. A loss or prediction that goes NaN/inf stops the run: its last good
checkpoint stays and it is recorded as diverged. The finished run goes to the results database
with regime = mode, keyed by its config and the fingerprint of the base weights and the manifest.
The epoch the selection rule keeps (`test`: best test SRCC, or `last`) leaves its head and adapter
(or full backbone weights) under the database's runs/<key>/ (heads/saved/weights.py), for `iqa export`.

BatchNorm layers (ResNet) keep their running statistics in every regime: a batch of 2 cannot
estimate them.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from iqa.cache.location import dataset_name, plain_name
from iqa.cache.store import fingerprint_id
from iqa.cache.manifest import manifest_checksum, read_manifest
from iqa.data.splits import split_indices
from iqa.extract.backbones import PooledBackbone, family_of, load_backbone, model_tag, weights_sha256
from iqa.extract.preprocess import normalise
from iqa.extract.registry import get_spec
from iqa.extract.run import ImageRows, compute_dtype_for, make_fingerprint
from iqa.extract.tuning import add_lora
from iqa.extract.checkpoint import (
    load_checkpoint, load_scheduler_state, restore_rng_states, rng_states, run_name, save_checkpoint, scheduler_state,
)
from iqa.heads.training.loss import iqa_loss
from iqa.heads.models.mlp import StackedMLP, head_activations, member_seed
from iqa.cache.results import ResultsDB, default_db
from iqa.heads.training.config import RunConfig, rows_digest, run_key
from iqa.heads.training.selection import check_rule, improved
from iqa.heads.saved.weights import RUNS_DIR, run_weights_path, save_tuned
from iqa.heads.training.trainer import (
    RunResult, epoch_metrics, epoch_order, gate_parameters, make_optimizer, make_scheduler, new_curves, record_epoch,
    result_from_curves,
)

MODES = ("lora", "full", "frozen")
MICRO_BATCH = 2  # the paper's physical batch: the unit the loss scores alone
EVAL_BATCH = 16


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

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            features = self.backbone(pixels).float()
        if self.l2norm:
            features = nn.functional.normalize(features, dim=1)
        return self.head(features[None])[0]


def embedding_dim(backbone: PooledBackbone, spec) -> int:
    with torch.no_grad():
        return backbone(torch.zeros(1, 3, spec.resolution, spec.resolution)).shape[1]


def build_model(backbone: PooledBackbone, spec, mode: str, head: str, seed: int, lora_rank: int, dim: int,
                l2norm: bool = False) -> FinetuneModel:
    """The model of one run on a backbone of `dim`-wide embeddings (`embedding_dim`); LoRA's initial A
    matrices come from torch's global RNG (seed it first)."""
    if mode == "lora":
        backbone = add_lora(backbone, spec, lora_rank)
    else:
        backbone.requires_grad_(mode == "full")
    return FinetuneModel(backbone, StackedMLP(dim, [seed], *head_activations(head)), frozen_backbone=mode == "frozen",
                         l2norm=l2norm)


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


def default_run_dir(cache: Path, config: dict) -> Path:
    """<cache>/runs/<dataset>/<backbone>[@tag]-<mode>[-r<rank>]-<head>-s<seed>."""
    name = config["backbone"] + (f"@{config['tag']}" if config["tag"] else "")
    return Path(cache) / RUNS_DIR / dataset_name(config["train_dataset"]) / plain_name(f"{name}-{run_name(config)}", "run name")


@dataclass
class FinetuneRun:
    run_dir: Path
    key: str  # the results database key
    fingerprint_id: str
    config: dict
    result: RunResult
    epochs_trained: int  # by this call (0 when the checkpoint had already finished)


def finetune_config(
    dataset: str,
    backbone: str,
    head: str = "sig",
    mode: str = "lora",
    seed: int = 8,
    epochs: int = 30,
    batch_size: int = 2,
    accumulate: int = 6,
    lora_rank: int = 4,
    lr: float = 1e-4,
    backbone_lr: float = 5e-6,
    split_by: str = "random",
    tiny: bool = False,
    random_init: bool = False,
    loss: str = "mse+margin",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    l2norm: bool = False,
    select: str = "test",
    micro_batch: int = MICRO_BATCH,
) -> RunConfig:
    """The RunConfig of one fine-tuning run, checked; `batch_size` is the physical batch, which the loss
    scores in micro-batches of `micro_batch` rows (= batch_size: the whole physical batch ranked at once)."""
    check_rule(select)
    if select == "val":
        raise ValueError("fine-tuning selects by --select test or last (no validation part is carved on images yet)")
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    act1, act2 = head_activations(head)
    if micro_batch < 2 or batch_size < micro_batch or batch_size % micro_batch:
        raise ValueError(f"--batch-size must be a multiple of --micro-batch {micro_batch} (at least 2: the loss "
                         f"scores pairs), got {batch_size}")
    if accumulate < 1 or epochs < 1 or lora_rank < 1:
        raise ValueError("--accumulate, --epochs and --lora-rank must be at least 1")
    return RunConfig(
        dataset, dataset, backbone, head, act1, act2, seed, epochs=epochs, lr=lr,
        batch_size=batch_size * accumulate, micro_batch=micro_batch, split_by=split_by, regime=mode,
        tag=model_tag(tiny, random_init), physical_batch=batch_size, accumulate=accumulate,
        lora_rank=lora_rank if mode == "lora" else None, backbone_lr=backbone_lr if mode == "full" else None,
        loss=loss, optimizer=optimizer, weight_decay=weight_decay, l2norm=l2norm,
        select=select,
    )


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
) -> FinetuneRun:
    """Train (or resume) the run of `config` (`finetune_config`); `on_epoch(epoch)` is called after
    each epoch's checkpoint. `source` overrides where the base weights come from (HF id or folder)."""
    dataset, backbone, seed, mode = config.train_dataset, config.backbone, config.seed, config.regime
    tiny, random_init = config.tag == model_tag(True, False), config.tag == model_tag(False, True)
    spec = get_spec(backbone, tiny)
    if not family_of(spec).tunable:
        raise ValueError(f"{backbone} computes fixed features: it has no backbone weights to fine-tune")
    manifest = read_manifest(cache, dataset)
    train_rows, test_rows = split_indices(manifest.paths, seed, by=config.split_by, groups=manifest.groups,
                                           sets=manifest.extras.get("set"))
    per_step, batch_size, accumulate, epochs = config.batch_size, config.physical_batch, config.accumulate, config.epochs
    steps = len(train_rows) // per_step
    if steps == 0:
        raise ValueError(f"{len(train_rows)} training images cannot fill one batch of {per_step}")
    compute_dtype = compute_dtype_for(device, dtype)
    cast = dict(device_type=torch.device(device).type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    config = replace(config, compute_dtype=str(compute_dtype).removeprefix("torch."))

    base = load_backbone(spec, source=source, random_init=random_init, tiny=tiny)
    spec = base.spec  # at the loaded checkpoint's geometry: its own image_size, width and resample
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cache, config.as_dict())
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir} is a file; give a folder (new, or an earlier run's to resume it)")
    db = db if db is not None else ResultsDB(default_db(cache))
    # What the run depends on besides its config: the base weights (hashed before LoRA wraps them), the manifest.
    dim = embedding_dim(base, spec)  # a whole forward pass (seconds at 512 px on a CPU): once
    fingerprint = make_fingerprint(spec, base, weights_sha256(base), dim, compute_dtype, "live",
                                   manifest_checksum(cache, dataset))
    fp_id = fingerprint_id(fingerprint)
    key = run_key(config, fp_id, rows_digest(train_rows, test_rows))
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG is left as it was
        torch.manual_seed(member_seed(seed, "torch"))  # LoRA init and dropout
        model = build_model(base, spec, mode, config.head, seed, config.lora_rank, dim, config.l2norm).to(device)
        optimizer = finetune_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config.milestones)
        scaler = torch.amp.GradScaler(cast["device_type"], enabled=compute_dtype == torch.float16)
        curves = new_curves()

        start = 0
        state = load_checkpoint(run_dir)
        if state is not None:
            if state["key"] != key:
                mine = config.as_dict()
                differ = sorted(k for k in mine | state["config"] if mine.get(k) != state["config"].get(k))
                raise ValueError(
                    f"{run_dir} holds another run (differs in {', '.join(differ) or 'base weights or manifest'}); "
                    f"pass another --run-dir or delete it"
                )
            load_trained_backbone_state(model, state["backbone"])
            model.head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            load_scheduler_state(scheduler, state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng_states(state["rng"])
            start, curves = state["epoch"], state["curves"]
        kept = run_weights_path(db.path, key).parent
        kept_srcc = max([s for s in curves["srcc"] if s == s], default=-np.inf)  # the kept epoch's, on a resume

        targets = torch.as_tensor(manifest.targets, dtype=torch.float32)
        images = ImageRows(Path(manifest.image_root), manifest.paths, spec)

        def batches(rows: list[list[int]]):
            """(targets, normalised images) on the device; an unreadable image stops the run with its name."""
            loader = DataLoader(images, batch_sampler=rows, num_workers=num_workers, pin_memory=bool(cuda))
            for row_ids, pixels, reasons, _ in loader:
                bad = [f"{manifest.paths[r]}: {why}" for r, why in zip(row_ids.tolist(), reasons) if why]
                if bad:
                    raise ValueError(f"cannot read {bad[0]}; fix or remove it and prepare the dataset again")
                pixels = normalise(pixels.to(device, non_blocking=True), spec.mean, spec.std)
                yield targets[row_ids].to(device, non_blocking=True), pixels

        test_batches = [chunk.tolist() for chunk in np.array_split(test_rows, -(-len(test_rows) // EVAL_BATCH))]
        diverged_epoch = None
        y_test = targets[test_rows][None]
        bar = tqdm(total=(epochs - start) * steps, unit="step", desc=f"{dataset}/{run_dir.name}", disable=not progress)
        for epoch in range(start, epochs):
            order = epoch_order(train_rows, seed, epoch)[: steps * per_step].reshape(-1, batch_size)
            loss_sum = train_epoch(model, optimizer, scaler, batches(order.tolist()), accumulate, cast, bar.update,
                                   config.loss, config.micro_batch)
            pred = None if loss_sum is None else predict(model, batches(test_batches), cast)
            if pred is None or not torch.isfinite(pred).all():
                diverged_epoch = epoch + 1
                break  # the last good checkpoint stays as it is
            (epoch_srcc,), (epoch_plcc,) = epoch_metrics(pred[None], y_test)
            record_epoch(curves, train_loss=loss_sum / steps, srcc=epoch_srcc, plcc=epoch_plcc,
                         lr=optimizer.param_groups[-1]["lr"])  # the head's lr
            scheduler.step()
            if improved([epoch_srcc], [kept_srcc], config.select)[0]:  # before the checkpoint: a kill redoes the epoch
                kept_srcc = epoch_srcc
                save_tuned(kept, model.head.state_dict(), model.backbone, mode, config.as_dict(), fingerprint)
            save_checkpoint(run_dir, {
                "key": key, "config": config.as_dict(), "fingerprint": fingerprint, "epoch": epoch + 1,
                "backbone": trained_backbone_state(model), "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler_state(scheduler),
                "scaler": scaler.state_dict(), "rng": rng_states(), "curves": curves,
            })
            bar.set_postfix(loss=f"{curves['train_loss'][-1]:.4f}", srcc=f"{curves['srcc'][-1]:.3f}")
            if on_epoch is not None:
                on_epoch(epoch + 1)
        bar.close()

    gates = gate_parameters(model.head, 0) if diverged_epoch is None else None
    result = result_from_curves(curves, diverged_epoch, gates, config.select)
    db.record([(key, config.as_dict(), fp_id, result)])
    trained = (diverged_epoch or epochs + 1) - 1 - start
    return FinetuneRun(run_dir, key, fp_id, config.as_dict(), result, trained)


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
def predict(model: FinetuneModel, batches, cast: dict) -> torch.Tensor:
    """Predictions [n] in eval mode (no dropout) for the batches' rows, in their order, on the CPU."""
    model.eval()
    out = []
    for _, pixels in batches:
        with torch.autocast(**cast):
            out.append(model(pixels).float().cpu())
    return torch.cat(out)
