"""What a fine-tuning run is, checked, and a grid of them: every combination of the options' lists.

`finetune_config` makes the RunConfig of one run (the record its key hashes). `expand_finetune_grid`
makes the product of backbones x datasets x modes x LoRA ranks x alphas x heads x mask k x keep x
learning rates x losses x seeds, each a `TuneRun`: its config and the other datasets it is also
scored on after every epoch (`tests`, the cross-dataset rows of Table 3). A single run is a grid of
one: the same function makes its config.

The LoRA rank and alpha mean nothing outside `lora` mode, so a frozen or full run is made once
whatever ranks the grid lists. An alpha equal to 2 x rank is stored as None (the default), so a run
keeps the key it has without `--lora-alpha`; any other alpha is part of the key.
"""

from dataclasses import dataclass
from itertools import product

from iqa.extract.registry import weights_tag
from iqa.heads.models.mlp import head_activations
from iqa.heads.training.config import RunConfig
from iqa.heads.training.selection import check_rule

MODES = ("lora", "full", "frozen")
MICRO_BATCH = 2  # the paper's physical batch: the unit the loss scores alone


@dataclass(frozen=True)
class TuneRun:
    config: RunConfig  # test_dataset is the training set: the seed's own test split
    tests: tuple[str, ...] = ()  # other datasets scored whole after every epoch (cross-dataset records)


def finetune_config(
    dataset: str,
    backbone: str,
    head: str = "sig",
    mode: str = "lora",
    seed: int = 8,
    *,
    epochs: int = 30,
    batch_size: int = 2,
    accumulate: int = 6,
    micro_batch: int = MICRO_BATCH,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    weights: str = "pretrained",
    backbone_lr: float = 5e-6,
    **options,
) -> RunConfig:
    """The RunConfig of one fine-tuning run, checked; `batch_size` is the physical batch, which the loss
    scores in micro-batches of `micro_batch` rows (= batch_size: the whole physical batch ranked at once).
    `options` are RunConfig fields as they are (lr, loss, optimizer, weight_decay, l2norm, select,
    val_fraction, split_by, mask_k, dropout, keep)."""
    check_rule(options.get("select", "test"))
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    act1, act2 = head_activations(head)
    if micro_batch < 2 or batch_size < micro_batch or batch_size % micro_batch:
        raise ValueError(f"--batch-size must be a multiple of --micro-batch {micro_batch} (at least 2: the loss "
                         f"scores pairs), got {batch_size}")
    if accumulate < 1 or epochs < 1 or lora_rank < 1:
        raise ValueError("--accumulate, --epochs and --lora-rank must be at least 1")
    if lora_alpha is not None and lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be above 0, got {lora_alpha}")
    if options.get("dropout") is None and options.get("keep", 1.0) != 1.0:
        raise ValueError("--keep sets dropout's keep probability: give --dropout input or --dropout layers with it")
    lora = mode == "lora"
    return RunConfig(
        dataset, dataset, backbone, head, act1, act2, seed, epochs=epochs, batch_size=batch_size * accumulate,
        micro_batch=micro_batch, regime=mode, tag=weights_tag(weights), physical_batch=batch_size,
        accumulate=accumulate, lora_rank=lora_rank if lora else None, backbone_lr=backbone_lr if mode == "full" else None,
        lora_alpha=float(lora_alpha) if lora and lora_alpha not in (None, 2 * lora_rank) else None, **options,
    )


def expand_finetune_grid(
    backbones: list[str],
    datasets: list[str],
    heads: list[str],
    seeds: list[int],
    modes: list[str] = ("lora",),
    lora_ranks: list[int] = (4,),
    lora_alphas: list[float | None] = (None,),
    mask_ks: list[float] = (100.0,),
    keeps: list[float] = (1.0,),
    lrs: list[float] = (1e-4,),
    losses: list[str] = ("mse+margin",),
    tests: list[str] = (),
    **shared,
) -> list[TuneRun]:
    """Every combination, in a stable order, each run once; `shared` sets what all runs share (epochs,
    batch_size, dropout, select, weights, ...: `finetune_config`'s options)."""
    runs = [
        TuneRun(finetune_config(dataset, backbone, head, mode, seed, lora_rank=rank, lora_alpha=alpha, mask_k=float(k),
                                keep=float(p), lr=lr, loss=loss, **shared),
                tuple(t for t in dict.fromkeys(tests) if t != dataset))
        for backbone, dataset, mode, rank, alpha, head, k, p, lr, loss, seed
        in product(backbones, datasets, modes, lora_ranks, lora_alphas, heads, mask_ks, keeps, lrs, losses, seeds)
    ]
    if not runs:
        raise ValueError("the grid is empty: give at least one backbone, dataset, head and seed")
    return list(dict.fromkeys(runs))
