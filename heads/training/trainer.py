"""Train a stack of M heads on arrays: the fast path behind `iqa head --cached`.

Each member is one run: its own seed (initialisation, data order, dropout), its own train/test rows,
mask k and dropout keep. Adam is elementwise and no operation mixes the members' rows of the stacked
parameters, so summing the member losses before one backward pass trains each member exactly as if
it were alone; only the matmul kernels differ, at float rounding. Members in one stack share the
architecture (act1, act2, dropout placement), the learning-rate schedule, the number of epochs and
the batch layout.

A member whose loss or predictions turn NaN/inf is recorded as diverged at that epoch and its
results stop there; its rows of the stack may go on holding NaN, which stays in those rows.

This module is the training core that fine-tuning (heads/finetune/loop.py) shares: the data order
(`epoch_order`: each epoch a member visits its train rows in an order drawn from (seed, epoch) alone,
in floor(n_train / batch) full batches; the remainder is left out and the next epoch reshuffles),
the learning-rate schedule (`make_scheduler`, torch's MultiStepLR stepped once per epoch), the
evaluation (`epoch_metrics`) and the curve record (`new_curves`, `record_epoch`, `result_from_curves`).
Test SRCC/PLCC are computed after every epoch; the result reports the best epoch (the paper's "mean
best SRCC"; PLCC is taken at that same epoch) and the last epoch.

`train_stack_model` reads top to bottom: its options become one `TrainSettings`, checked; the data goes to
the device (`stack_on_device`); the stack, its optimiser and pools are built (`start_training`); each epoch
trains (`train_epoch`), evaluates and keeps each member's best weights (`evaluate_epoch`) and records the
curves (`record_members`); `finish_results` makes one RunResult per member.
"""

import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from iqa.heads.models.activations import GATE_INIT, GatedActivation
from iqa.heads.models.fusion import StackedFusion, check_fusion, fused_width
from iqa.heads.models.hyper import HYPER, StackedHyper
from iqa.heads.training.loss import iqa_loss
from iqa.heads.training.metrics import plcc, srcc
from iqa.heads.models.mlp import HIDDEN, StackedMLP, member_seed, topk_mask
from iqa.heads.training.config import LR_DECAY, OPTIMIZERS
from iqa.heads.training.selection import check_rule, improved, selected_epoch

EVAL_CHUNK = 1024  # test rows per forward pass at evaluation
HEAD_DTYPES = {None: None, "bfloat16": torch.bfloat16}  # a run's compute_dtype: None is float32


@dataclass(frozen=True)
class Member:
    seed: int
    mask_k: float = 100.0
    keep: float = 1.0
    lr: float = 1e-4
    milestones: tuple[int, ...] = ()


def make_stack(in_dim: int, seeds: list[int], act1: str, act2: str, mask_k: list[float], dropout: str | None,
               keep: list[float], hidden: int = HIDDEN, fuse: str | None = None,
               stages: tuple[tuple[int, int], ...] | None = None,
               content: tuple[int, int] | int | None = None, hyper_target: str | None = None,
               spatial: int | None = None) -> StackedMLP | StackedHyper | StackedFusion:
    """The stacked head a config names: the hyper-network head (act1 = act2 = "hyper"), its hyper-network
    reading the `content` columns (all where None; an int: a content this wide given beside the input), or
    the MLP, which reads every column; with `fuse`, that head behind the fusion of `stages` ((layer, width)
    of the concatenated input, in order), its hyper-network reading the deepest stage. With `spatial` S the
    stages are S x S maps (each S*S*width columns) and the fusion works per location; the hyper head of
    Eq. 14-17 (`hyper_target` eq16) reads every location, any other head the locations' average."""
    positions = (spatial or 1) ** 2
    if fuse is not None:
        check_fusion(fuse, None if stages is None else tuple(n for n, _ in stages))
        if sum(w for _, w in stages) * positions != in_dim:
            raise ValueError(f"the stages' widths {[w for _, w in stages]} (x {positions} locations) do not add up to "
                             f"the input width {in_dim}")
        head = make_stack(fused_width(fuse, len(stages)), seeds, act1, act2, [100.0] * len(seeds), dropout, keep, hidden,
                          content=max(stages)[1], hyper_target=hyper_target, spatial=spatial)
        return StackedFusion(stages, seeds, mask_k, head, fuse, positions)
    if HYPER in (act1, act2):
        if (act1, act2) != (HYPER, HYPER):
            raise ValueError(f"{HYPER} is a head of its own, not an activation to pair")
        if hyper_target is None and any(p != 1 for p in keep):
            raise ValueError("the hyper head takes no dropout keep below 1")
        return StackedHyper(in_dim, seeds, mask_k, dropout, content, hyper_target, keep,
                            positions if hyper_target == "eq16" and isinstance(content, int) else 1)
    return StackedMLP(in_dim, seeds, act1, act2, mask_k=mask_k, dropout=dropout, keep=keep, hidden=hidden)


def epoch_order(train_rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The train rows in the order of one epoch, drawn from (seed, epoch) alone: every path that trains
    a run of this seed (a stack member, a fine-tuning run, a resumed one) sees the same order."""
    rng = np.random.default_rng([member_seed(seed, "order"), epoch])
    return train_rows[rng.permutation(len(train_rows))]


def make_scheduler(optimizer: torch.optim.Optimizer, milestones: tuple[int, ...]) -> torch.optim.lr_scheduler.MultiStepLR:
    """x LR_DECAY at each milestone epoch; step it once after every epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), LR_DECAY)


def epoch_metrics(pred: torch.Tensor, target: torch.Tensor) -> tuple[list[float], list[float]]:
    """SRCC and PLCC per member of predictions and targets [M, n]."""
    return srcc(pred, target).tolist(), plcc(pred, target).tolist()


def new_curves(gated: list[str] = (), validation: bool = False) -> dict[str, list]:
    """An empty per-epoch record: train_loss, srcc, plcc, lr, g_<act> for each gated activation, and
    val_srcc, val_plcc where the run has a validation part."""
    return {"train_loss": [], "srcc": [], "plcc": [], "lr": [], **{f"g_{n}": [] for n in gated},
            **({"val_srcc": [], "val_plcc": []} if validation else {})}


def record_epoch(curve: dict[str, list], **values) -> None:
    for name, value in values.items():
        curve[name].append(value)


@dataclass
class StackData:
    """Pools of embeddings and targets plus each member's rows into them.

    For a within-dataset run x_train and x_test are the same array; rows are [M, n] int64.
    """

    x_train: np.ndarray | torch.Tensor  # [N, D]
    y_train: np.ndarray | torch.Tensor  # [N]
    train_rows: np.ndarray  # [M, n_train]
    x_test: np.ndarray | torch.Tensor
    y_test: np.ndarray | torch.Tensor
    test_rows: np.ndarray  # [M, n_test]
    val_rows: np.ndarray | None = None  # [M, n_val] into the train pool, for `select="val"`
    stages: tuple[tuple[int, int], ...] | None = None  # (layer, width) of each concatenated stored layer, for `fuse`
    content_columns: tuple[int, int] | None = None  # (start, stop): the content group a hyper head's hyper-network reads


@dataclass
class RunResult:
    status: str  # "done" or "diverged" (the paper's "—")
    best_epoch: int | None  # 1-based epoch of the best test SRCC
    best_srcc: float | None
    best_plcc: float | None  # PLCC at best_epoch
    last_srcc: float | None  # after the final epoch
    last_plcc: float | None
    # per epoch: train_loss, srcc, plcc, lr; gated heads add g_act1 / g_act2, the gate vector g per epoch;
    # a fused head adds stage_weights (`stage_weight_record`), a probe its chosen settings
    curves: dict[str, list] = field(default_factory=dict)
    gates: dict | None = None  # final GatedActivation parameters per layer, None without gates
    diverged_epoch: int | None = None
    # the selected epoch's weights as an M = 1 StackedMLP state dict (CPU; with standardize also input_mean
    # and input_std), None where none were kept
    weights: dict[str, torch.Tensor] | None = None


def make_optimizer(groups: list[dict], name: str = "adam", weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam or AdamW (OPTIMIZERS) over parameter groups that each carry their lr; fused on CPU and CUDA.

    Both update each parameter element from its own gradient and state, so stacked members stay independent.
    """
    fused = groups[0]["params"][0].device.type in ("cpu", "cuda")
    return OPTIMIZERS[name](groups, fused=fused, foreach=None if fused else True, weight_decay=weight_decay)


def _stack_optimizer(model: StackedMLP, members: list[Member], name: str, weight_decay: float) -> torch.optim.Optimizer:
    """One optimizer over the stacked parameters; the members must share one learning-rate schedule."""
    schedules = {(m.lr, m.milestones) for m in members}
    if len(schedules) > 1:
        raise ValueError(f"a stack trains with one learning-rate schedule, got {sorted(schedules)}")
    return make_optimizer([{"params": list(model.parameters()), "lr": members[0].lr}], name, weight_decay)


def _stack_order(members: list[Member], train_rows: np.ndarray, epoch: int, batch: int) -> np.ndarray:
    """[steps, M, batch] rows: each member's `epoch_order` in full batches."""
    steps = train_rows.shape[1] // batch
    order = np.stack([epoch_order(rows, m.seed, epoch)[: steps * batch] for m, rows in zip(members, train_rows)])
    return order.reshape(len(members), steps, batch).transpose(1, 0, 2)


def train_statistics(x: torch.Tensor, train_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member, the mean and std [M, D] of its own train rows (`--standardize`); a constant feature gets std 1."""
    rows = torch.as_tensor(train_rows, device=x.device)
    mean = torch.stack([x[r].mean(0) for r in rows])
    std = torch.stack([x[r].std(0, correction=0) for r in rows])
    return mean, torch.where(std > 0, std, torch.ones_like(std))


class PoolCache:
    """The float32 device copies of embedding pools and their masked versions, shared by the stacks of one grid.

    Every stack of a grid on one dataset reads the same pool, and every distinct mask k masks all of it
    (a selection per row over the whole pool, a tenth of a one-epoch stack on the CPU): kept here, each
    is made once per grid. An entry lives as long as its source (a pool made for one stack, such as an
    l2-normalised copy, takes its entries with it), and the oldest go once the tensors pass `max_bytes`.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._entries: dict[tuple, torch.Tensor] = {}

    def get(self, source: object, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor made from `source` under `key` (make() the first time)."""
        full_key = (id(source), *key)
        if full_key not in self._entries:
            self._entries[full_key] = make()
            # dropped when the source goes, before its id can name another array; the cache itself is
            # held weakly, so a source outliving the grid does not keep the grid's tensors
            weakref.finalize(source, _forget, weakref.ref(self), full_key)
            while len(self._entries) > 1 and sum(t.nbytes for t in self._entries.values()) > self.max_bytes:
                del self._entries[next(iter(self._entries))]
        return self._entries[full_key]

    def __len__(self) -> int:
        """How many tensors are kept."""
        return len(self._entries)


def _forget(cache: "weakref.ref[PoolCache]", key: tuple) -> None:
    live = cache()
    if live is not None:
        live._entries.pop(key, None)


def masked_pool(x: torch.Tensor, keep_percent: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Every row of x [N, D] under the top-k mask of keep_percent [1], `chunk` rows at a time."""
    return torch.cat([topk_mask(x[None, i : i + chunk], keep_percent)[0] for i in range(0, len(x), chunk)])


class MaskedPools:
    """Every embedding masked once per distinct mask k of the stack, instead of at every step.

    A sample's top-k mask depends only on its own values, so masking the whole pool up front gives
    exactly the inputs per-step masking would (it cost a third of a step on the CPU). `rows(r)`
    gathers member m's rows r[m] from the pool of its k: [M, B] -> [M, B, D]. With `standardize`
    (each member's train mean and std, `train_statistics`) every member gets its own pool,
    z-scored and then masked; without it the masked pools come from `cache` where one is given.
    """

    def __init__(self, model: StackedMLP, x: torch.Tensor, chunk: int = EVAL_CHUNK,
                 standardize: tuple[torch.Tensor, torch.Tensor] | None = None, cache: PoolCache | None = None):
        ks = model.mask_k.tolist()
        if standardize is not None:
            mean, std = standardize
            self.pool_of = torch.arange(len(ks), device=x.device)[:, None]
            sources = [((x - mean[m]) / std[m], m) for m in range(len(ks))]
        else:
            distinct = sorted(set(ks))
            self.pool_of = torch.tensor([distinct.index(k) for k in ks], device=x.device)[:, None]
            sources = [(x, ks.index(k)) for k in distinct]
        if not model.masking:
            self.pools = x[None] if standardize is None else torch.stack([source for source, _ in sources])
            return
        cache = cache if standardize is None else None  # z-scored pools are the member's own

        def pool(source: torch.Tensor, m: int) -> torch.Tensor:
            if ks[m] == 100:  # every feature kept
                return source
            make = lambda: masked_pool(source, model.mask_k[m : m + 1], chunk)  # noqa: E731
            return make() if cache is None else cache.get(source, ("masked", ks[m]), make)

        self.pools = torch.stack([pool(source, m) for source, m in sources])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.pools[self.pool_of, rows]


@torch.no_grad()
def predict(model: StackedMLP, pools: MaskedPools, rows: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Predictions [M, n] of each member on its own rows, without masks from dropout."""
    was_training = model.training
    model.eval()
    pred = torch.cat(
        [model(pools.rows(rows[:, i : i + chunk]), inputs_masked=True) for i in range(0, rows.shape[1], chunk)], dim=1
    )
    model.train(was_training)
    return pred


def gate_parameters(model: StackedMLP, m: int) -> dict | None:
    gates = {
        name: {p: t.detach().cpu().tolist() for p, t in zip(GATE_INIT, act.member_tensors(m))}
        for name, act in (("act1", getattr(model, "act1", None)), ("act2", getattr(model, "act2", None)))
        if isinstance(act, GatedActivation)
    }
    return gates or None


@dataclass(frozen=True)
class TrainSettings:
    """What every member of a stack trains with besides its own seed, rows, mask k and keep (`Member`): the
    head's architecture, epochs and batch layout, loss, optimiser, input scaling, epoch rule and precision."""

    act1: str = "lrelu"
    act2: str = "lrelu"
    dropout: str | None = None
    epochs: int = 30
    batch_size: int = 12
    micro_batch: int | None = 2
    hidden: int = HIDDEN
    loss: str = "mse+margin"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    standardize: bool = False
    select: str = "test"
    fuse: str | None = None
    compute_dtype: str | None = None
    hyper_target: str | None = None  # SMART-IQA's hyper head (eq16 or table4); None: iqa's own
    spatial: int | None = None  # the fused stages are S x S maps (`make_stack`)

    def check(self, data: StackData, n_members: int) -> None:
        """Refuse settings and data that cannot train together, before anything is built."""
        check_rule(self.select)
        if self.compute_dtype not in HEAD_DTYPES:
            raise ValueError(f"a head trains in {' or '.join(map(str, HEAD_DTYPES))}, not {self.compute_dtype!r}")
        if self.select == "val" and data.val_rows is None:
            raise ValueError("select='val' needs validation rows")
        train_rows, test_rows = np.asarray(data.train_rows), np.asarray(data.test_rows)
        if train_rows.shape[0] != n_members or test_rows.shape[0] != n_members:
            raise ValueError("train_rows and test_rows need one row list per member")
        if train_rows.shape[1] < self.batch_size:
            raise ValueError(f"{train_rows.shape[1]} training rows cannot fill one batch of {self.batch_size}")

    def autocast(self, device: torch.device) -> torch.autocast:
        """The forward passes' precision: bf16 autocast for "bfloat16", float32 (autocast off) for None."""
        return torch.autocast(device_type=device.type, dtype=HEAD_DTYPES[self.compute_dtype] or torch.float32,
                              enabled=self.compute_dtype is not None)


@dataclass
class DeviceData:
    """A stack's data on its device: float32 pools (shared through a `PoolCache` where one is given), the
    train rows (on the host: each epoch's order is drawn there), and the test and validation rows with
    their targets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor  # x_train itself for a within-dataset stack
    train_rows: np.ndarray  # [M, n_train]
    test_rows: torch.Tensor  # [M, n_test]
    y_test: torch.Tensor  # [M, n_test]: each member's test targets
    val_rows: torch.Tensor | None  # [M, n_val] into the train pool
    y_val: torch.Tensor | None

    @property
    def same_pool(self) -> bool:
        return self.x_test is self.x_train


def stack_on_device(data: StackData, device: torch.device, pools: PoolCache | None) -> DeviceData:
    def as_float(a) -> torch.Tensor:
        return torch.as_tensor(a).to(device=device, dtype=torch.float32)

    def pool_tensor(a) -> torch.Tensor:
        return as_float(a) if pools is None else pools.get(a, ("float32", str(device)), lambda: as_float(a))

    x_train, y_train = pool_tensor(data.x_train), as_float(data.y_train)
    x_test = x_train if data.x_test is data.x_train else pool_tensor(data.x_test)
    test_rows = torch.as_tensor(np.asarray(data.test_rows), device=device)
    val_rows = None if data.val_rows is None else torch.as_tensor(np.asarray(data.val_rows), device=device)
    return DeviceData(x_train, y_train, x_test, np.asarray(data.train_rows), test_rows, as_float(data.y_test)[test_rows],
                      val_rows, None if val_rows is None else y_train[val_rows])


@dataclass
class StackTraining:
    """One stack in training: the model, its optimiser and schedule, the masked pools it reads, and per member
    the weights and score of the epoch it keeps, whether it is alive, and its curves."""

    model: StackedMLP | StackedHyper | StackedFusion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    statistics: tuple[torch.Tensor, torch.Tensor] | None  # each member's train mean and std, with `standardize`
    train_pools: MaskedPools
    test_pools: MaskedPools
    kept_state: dict[str, torch.Tensor]  # every entry is [M, ...]
    kept_score: list[float]
    alive: torch.Tensor  # [M] bool, on the device
    gated: list[str]  # the gated activations ("act1", "act2") whose gate vectors the curves record
    curves: list[dict[str, list]]
    diverged_epoch: list[int | None]


def settings_stack(in_dim: int, members: list[Member], settings: TrainSettings, stages, content):
    """The stacked head of `members` as `settings` build it over `in_dim` inputs (`make_stack`)."""
    return make_stack(in_dim, [m.seed for m in members], settings.act1, settings.act2, [m.mask_k for m in members],
                      settings.dropout, [m.keep for m in members], settings.hidden, settings.fuse, stages, content,
                      settings.hyper_target, settings.spatial)


def member_parameters(in_dim: int, settings: TrainSettings, stages, content) -> int:
    """The parameters of one member of such a stack, its head built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = settings_stack(in_dim, [Member(0)], settings, stages, content)
    return sum(p.numel() for p in model.parameters())


def start_training(on: DeviceData, members: list[Member], settings: TrainSettings, stages, content,
                   pools: PoolCache | None) -> StackTraining:
    """The stack built, its optimiser and schedule set, its pools masked; nothing trained yet."""
    device = on.x_train.device
    model = settings_stack(on.x_train.shape[1], members, settings, stages, content).to(device)
    optimizer = _stack_optimizer(model, members, settings.optimizer, settings.weight_decay)
    scheduler = make_scheduler(optimizer, members[0].milestones)
    statistics = train_statistics(on.x_train, on.train_rows) if settings.standardize else None
    train_pools = MaskedPools(model, on.x_train, standardize=statistics, cache=pools)
    test_pools = train_pools if on.same_pool else MaskedPools(model, on.x_test, standardize=statistics, cache=pools)
    kept_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    gated = [name for name in ("act1", "act2") if isinstance(getattr(model, name, None), GatedActivation)]
    return StackTraining(
        model, optimizer, scheduler, statistics, train_pools, test_pools, kept_state, [-np.inf] * len(members),
        torch.ones(len(members), dtype=torch.bool, device=device), gated,
        [new_curves(gated, validation=on.val_rows is not None) for _ in members], [None] * len(members),
    )


def train_epoch(run: StackTraining, on: DeviceData, members: list[Member], settings: TrainSettings,
                epoch: int) -> list[float]:
    """One epoch of steps over every member's batches; each member's mean train loss. A member whose loss
    turns NaN/inf stops counting (its loss is zeroed) and is marked not alive."""
    device = on.x_train.device
    order = torch.as_tensor(_stack_order(members, on.train_rows, epoch, settings.batch_size), device=device)
    loss_sum = torch.zeros(len(members), device=device)
    run.model.train()
    for rows, targets in zip(order, on.y_train[order]):  # the epoch's targets gathered at once
        with settings.autocast(device):
            pred = run.model(run.train_pools.rows(rows), inputs_masked=True)
        member_loss = iqa_loss(pred, targets, settings.micro_batch, settings.loss)
        run.alive &= torch.isfinite(member_loss)  # stays on the device: no sync per step
        counted = torch.where(run.alive, member_loss, 0.0)
        run.optimizer.zero_grad(set_to_none=True)
        counted.sum().backward()
        run.optimizer.step()
        loss_sum += counted.detach()
    return (loss_sum / len(order)).tolist()


def evaluate_epoch(run: StackTraining, on: DeviceData, settings: TrainSettings) -> dict[str, list[float]]:
    """Test (and validation) SRCC and PLCC per member; a member predicting NaN/inf is marked not alive, and
    each member alive whose epoch is better by the rule keeps its weights."""
    with settings.autocast(on.x_train.device):
        pred = predict(run.model, run.test_pools, on.test_rows).float()
        val_pred = None if on.val_rows is None else predict(run.model, run.train_pools, on.val_rows).float()
    run.alive &= torch.isfinite(pred).all(-1)
    metrics = dict(zip(("srcc", "plcc"), epoch_metrics(pred, on.y_test)))
    if val_pred is not None:
        metrics |= dict(zip(("val_srcc", "val_plcc"), epoch_metrics(val_pred, on.y_val)))
    scores = metrics["val_srcc"] if settings.select == "val" else metrics["srcc"]
    better = improved(scores, run.kept_score, settings.select)
    _keep_members(run.kept_state, run.model, torch.tensor(better, device=on.x_train.device) & run.alive)
    run.kept_score = [s if b else k for s, b, k in zip(scores, better, run.kept_score)]
    return metrics


def record_members(run: StackTraining, epoch: int, lr: float, train_loss: list[float], metrics: dict[str, list[float]]) -> None:
    """The epoch in each live member's curves; a member that died in it is marked diverged at it."""
    # each member's gate vector g, rounded to 4 decimals to keep the stored curves small
    epoch_g = {n: getattr(run.model, n).g.detach().cpu().numpy().round(4).tolist() for n in run.gated}
    for i, is_alive in enumerate(run.alive.tolist()):
        if run.diverged_epoch[i] is not None:
            continue
        if not is_alive:
            run.diverged_epoch[i] = epoch + 1
            continue
        record_epoch(run.curves[i], train_loss=train_loss[i], lr=lr, **{name: v[i] for name, v in metrics.items()},
                     **{f"g_{n}": epoch_g[n][i] for n in run.gated})


def finish_results(run: StackTraining, on: DeviceData, settings: TrainSettings) -> list[RunResult]:
    """One RunResult per member: its selected epoch, and for a finished member the weights it kept (with the
    input statistics it was scaled by) and, fused, its stage weights on its test rows."""
    results = [result_from_curves(curves, diverged, gate_parameters(run.model, i), settings.select)
               for i, (curves, diverged) in enumerate(zip(run.curves, run.diverged_epoch))]
    stage_weights = (_kept_stage_weights(run.model, run.kept_state, run.test_pools, on.test_rows)
                     if settings.fuse is not None else None)
    test_rows = on.test_rows.cpu().numpy()
    for i, result in enumerate(results):
        if result.status != "done":
            continue
        if stage_weights is not None:
            result.curves["stage_weights"] = stage_weight_record(run.model.layers, test_rows[i], on.y_test[i], stage_weights[i])
        result.weights = {name: t[i : i + 1].cpu() for name, t in run.kept_state.items()}
        if run.statistics is not None:  # a saved head scales its inputs as it was trained (heads/saved/weights.py)
            mean, std = run.statistics
            result.weights |= {"input_mean": mean[i : i + 1].cpu(), "input_std": std[i : i + 1].cpu()}
    return results


def train_stack(data: StackData, members: list[Member], *args, **kwargs) -> list[RunResult]:
    """Train len(members) heads at once; one RunResult per member, in order (see `train_stack_model`)."""
    return train_stack_model(data, members, *args, **kwargs)[1]


def train_stack_model(
    data: StackData,
    members: list[Member],
    act1: str = "lrelu",
    act2: str = "lrelu",
    dropout: str | None = None,
    epochs: int = 30,
    batch_size: int = 12,
    micro_batch: int | None = 2,
    device: str | torch.device = "cpu",
    hidden: int = HIDDEN,
    on_epoch: Callable[[int], None] | None = None,
    loss: str = "mse+margin",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    standardize: bool = False,
    select: str = "test",
    fuse: str | None = None,
    compute_dtype: str | None = None,
    pools: PoolCache | None = None,
    hyper_target: str | None = None,
    spatial: int | None = None,
) -> tuple[StackedMLP, list[RunResult]]:
    """Train len(members) heads at once: the trained stack and one RunResult per member, in order.

    The options are `TrainSettings`' fields. `select` picks the epoch each member keeps (see
    iqa.heads.training.selection); its weights come back in RunResult.weights, snapshotted on the device
    whenever a member reaches a new kept epoch. With `fuse` (over `data.stages`), each member's curves also
    get "stage_weights": the kept epoch's weight per stage on each of its test rows (`stage_weight_record`).
    `compute_dtype` "bfloat16" runs the forward passes under bf16 autocast (the paper's mixed precision; the
    weights, Adam and the gate parameters stay float32); None is float32 throughout. `pools` keeps the device
    copies of the embedding pools and their masked versions for the next stack on the same arrays (a grid's
    `PoolCache`).
    """
    settings = TrainSettings(act1, act2, dropout, epochs, batch_size, micro_batch, hidden, loss, optimizer,
                             weight_decay, standardize, select, fuse, compute_dtype, hyper_target, spatial)
    settings.check(data, len(members))
    on = stack_on_device(data, torch.device(device), pools)
    run = start_training(on, members, settings, data.stages, data.content_columns, pools)
    for epoch in range(settings.epochs):
        lr = run.optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(run, on, members, settings, epoch)
        record_members(run, epoch, lr, train_loss, evaluate_epoch(run, on, settings))
        run.scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return run.model, finish_results(run, on, settings)


@torch.no_grad()
def _kept_stage_weights(model: StackedFusion, kept: dict[str, torch.Tensor], pools: MaskedPools, rows: torch.Tensor,
                        chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Each member's stage weights [M, n, stages] on its rows, with the weights of the epoch it kept."""
    current = {name: t.detach().clone() for name, t in model.state_dict().items()}
    model.load_state_dict(kept)
    weights = torch.cat([model.stage_weights(pools.rows(rows[:, i : i + chunk]), inputs_masked=True)
                         for i in range(0, rows.shape[1], chunk)], dim=1)
    model.load_state_dict(current)
    return weights


def stage_weight_record(layers: tuple[int, ...], rows: np.ndarray, targets: torch.Tensor, weights: torch.Tensor) -> dict:
    """What a fused run stores for the report (the stage weights against quality, SMART-IQA's Fig. 4):
    its test rows, their targets and, per row, one weight per stage (rounded to 4 decimals)."""
    return {"layers": list(layers), "rows": np.asarray(rows).tolist(), "target": targets.cpu().numpy().round(4).tolist(),
            "weights": weights.cpu().numpy().round(4).tolist()}


@torch.no_grad()
def _keep_members(kept: dict[str, torch.Tensor], model: StackedMLP, members: torch.Tensor) -> None:
    """Copy the stack's current rows of `members` ([M] bool) into `kept`, on the device: no sync."""
    for name, t in model.state_dict().items():
        kept[name].copy_(torch.where(members.view(-1, *[1] * (t.dim() - 1)), t, kept[name]))


def result_from_curves(
    curve: dict[str, list], diverged_epoch: int | None, gates: dict | None, select: str = "test"
) -> RunResult:
    """A run's record from its per-epoch curves: the epoch the rule selects (SRCC/PLCC at it) and the last.

    `best_*` are the test metrics at the selected epoch, whichever rule selected it.
    """
    if diverged_epoch is not None:
        return RunResult("diverged", None, None, None, None, None, curve, gates, diverged_epoch)
    best = selected_epoch(curve, select)
    return RunResult(
        "done", best + 1, curve["srcc"][best], curve["plcc"][best], curve["srcc"][-1], curve["plcc"][-1], curve, gates
    )
