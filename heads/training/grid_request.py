"""A head grid as one request: what `iqa head` and the demo ask for, checked whole before anything loads,
then expanded into run configs (grid.py) and trained on one backbone's cached embeddings.

`GridRequest` holds the user's choices as typed values; `train_grid` loads the stores, sets up the
engine (here, or a Ray cluster) and returns each run's stored record.
"""

from dataclasses import dataclass, field
from pathlib import Path

from iqa.data.splits import PAPER_SEEDS
from iqa.errors import SettingError


@dataclass(frozen=True)
class GridRequest:
    backbone: str
    datasets: tuple[str, ...] = ()  # each trained and tested on its own split
    train: tuple[str, ...] = ()  # cross-dataset: paired with `test`, or one against every test set
    test: tuple[str, ...] = ()
    heads: tuple[str, ...] = ("baseline",)  # named heads and probes
    act_pairs: tuple[tuple[str, str], ...] = ()  # extra heads as (act1, act2)
    seeds: tuple[int, ...] = PAPER_SEEDS
    mask_ks: tuple[float, ...] = (100.0,)
    dropout: str | None = None  # input or layers
    keeps: tuple[float, ...] = (1.0,)
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 12  # rows per optimiser step (the paper's 12; SMART-IQA's 32)
    micro_batch: int = 2
    split_by: str = "random"
    loss: str = "mse+margin"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    standardize: bool | None = None  # None: on for the probes, off for the MLP heads
    l2norm: bool = False
    select: str = "test"
    val_fraction: float = 0.1
    layer: str | None = None  # one stored layer "N", or "all": a sweep
    layers: str | None = None  # stored layers concatenated, "4,3"
    fuse: str | None = None
    spatial: int | None = None  # the fusion reads the stores' S x S maps (`iqa extract --spatial S`)
    knn_k: int | None = None  # the knn probe's fixed k (None: chosen by cross-validation)
    hyper_target: str | None = None  # the hyper head as SMART-IQA sizes it (eq16, table4); None: iqa's own
    dtype: str = "auto"  # of the trained heads: grid.head_dtype
    tag: str | None = None  # the store's tag
    stack_size: int | None = None  # runs trained at once [default: grid.STACK_SIZE]
    pairs: tuple[tuple[str, str], ...] = field(init=False)  # (train, test) of every run

    def __post_init__(self):
        from iqa.heads.training.grid import dataset_pairs, head_choices
        from iqa.heads.training.selection import check_rule

        if len(set(self.seeds)) != len(self.seeds):
            raise SettingError(f"`seeds` lists a seed twice ({','.join(map(str, self.seeds))}); each seed is one run")
        if self.epochs < 1:
            raise SettingError(f"`epochs` must be at least 1, got {self.epochs}")
        if self.stack_size is not None and self.stack_size < 1:
            raise SettingError(f"`stack_size` must be at least 1, got {self.stack_size}")
        if self.dropout is None and tuple(self.keeps) != (1.0,):
            raise SettingError("`keep` sets dropout's keep probability: give `dropout` input or `dropout` layers with it")
        if not self.heads and not self.act_pairs:
            raise SettingError("`act` names no head; give baseline, sig, gated, hyper, ridge, knn or `act_pair`")
        if any(len(pair) != 2 for pair in self.act_pairs):
            raise SettingError("`act_pair` takes two activations, e.g. sigmoid,gelu")
        head_choices(list(self.heads), list(self.act_pairs))  # names a head that does not exist
        check_rule(self.select)
        object.__setattr__(self, "pairs", tuple(dataset_pairs(list(self.datasets), list(self.train), list(self.test))))

    def configs(self, device: str, held_layers: list[int] = ()) -> list:
        """Every run's RunConfig, in grid.expand_grid's order; `held_layers` are the store's layers (for `layer` all)."""
        from iqa.heads.training.grid import expand_grid, head_choices, head_dtype, layer_choices

        return expand_grid(
            list(self.pairs), self.backbone, head_choices(list(self.heads), list(self.act_pairs)), list(self.seeds),
            list(self.mask_ks), self.dropout, list(self.keeps), epochs=self.epochs, lr=self.lr,
            batch_size=self.batch_size, micro_batch=self.micro_batch, tag=self.tag, split_by=self.split_by, loss=self.loss, optimizer=self.optimizer,
            weight_decay=self.weight_decay, standardize=self.standardize, l2norm=self.l2norm, select=self.select,
            val_fraction=self.val_fraction, layer_sets=layer_choices(self.layer, self.layers, list(held_layers)),
            compute_dtype=head_dtype(self.dtype, device), fuse=self.fuse, knn_k=self.knn_k, hyper_target=self.hyper_target,
            spatial=self.spatial,
        )


def train_grid(
    request: GridRequest,
    cache: Path,
    device: str = "cpu",
    db: Path | None = None,
    stores: str | None = None,
    allow_partial: bool = False,
    engine: str = "local",
    address: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train every run of `request` not already in the results database (`db`, default the cache's) on the
    backbone's stores in `cache` (or under `stores`); each run's stored record, in config order.

    `engine` "ray" trains each stack as a Ray task on the cluster at `address` (default: a local one);
    `allow_partial` trains on an unfinished store's finished rows."""
    from iqa.cache.location import store_root
    from iqa.cache.results import ResultsDB, default_db
    from iqa.cache.load import load_cached, stored_layers
    from iqa.heads.training.grid import run_grid

    if engine not in ("local", "ray"):
        raise SettingError(f"`engine` must be local or ray, got {engine!r}")
    where = store_root(stores) if stores else None
    held = stored_layers(cache, request.pairs[0][0], request.backbone, request.tag, where) if request.layer == "all" else []
    configs = request.configs(device, held)
    run_stacks = None
    if engine == "ray":
        from iqa.heads.training.ray_grid import train_on_ray

        run_stacks = train_on_ray(address, num_gpus=1.0 if device.startswith("cuda") else 0.0)

    def load(name: str):
        return load_cached(cache, name, request.backbone, request.tag, where, allow_partial)

    return run_grid(configs, load, ResultsDB(db or default_db(cache)), device, request.stack_size, progress, run_stacks)
