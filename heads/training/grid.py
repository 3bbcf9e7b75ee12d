"""Ablation grids: expand options into run configs, train them in stacks, skip finished runs.

A grid is every combination of (train, test) dataset pairs, heads, mask k, dropout keep and seeds.
Runs that can share a stack (same datasets, architecture, epochs and row counts) are trained
together, `stack_size` at a time; each finished stack is committed to the results database at
once, so a killed grid loses at most the stacks in flight and a re-run trains only what is missing.
"""

import os
from dataclasses import dataclass
from itertools import groupby, product
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from iqa.cache.manifest import Manifest
from iqa.data.splits import official_split, split_indices
from iqa.heads.models.hyper import HYPER
from iqa.heads.models.mlp import HEADS
from iqa.heads.training.probe_runs import train_probes
from iqa.heads.models.probes import PROBES
from iqa.cache.results import ResultsDB
from iqa.heads.training.config import RunConfig, rows_digest, run_key
from iqa.heads.training.selection import carve_validation
from iqa.heads.training.trainer import Member, PoolCache, RunResult, StackData, TrainSettings, member_parameters, train_stack
from iqa.heads.saved.weights import run_weights_path, save_head
from iqa.errors import SettingError

STACK_SIZE = {"cpu": 2, "cuda": 64}  # CPU: a stack's weights and Adam state stay in cache; GPU: fill the device
# What a member holds while it trains, per parameter: float32 weights, gradients and Adam's two moments (16 B), and
# activations and temporaries (SMART-IQA's 270 M-parameter eq16 head on 7 x 7 maps peaked at 6.7 GB at batch 32:
# benchmarks/smart_hyper_memory.py).
BYTES_PER_PARAMETER = 25


class Cached(Protocol):
    """What a loader returns for one dataset (iqa.cache.load.CachedEmbeddings has these fields)."""

    embeddings: np.ndarray  # [N, D]
    valid: np.ndarray  # [N] bool, False where the image failed
    manifest: Manifest
    fingerprint_id: str
    stages: tuple[tuple[int, int], ...] | None  # after select_layers: (layer, width) of each, in column order


def head_choices(acts: list[str], act_pairs: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(name, act1, act2) for named variants, probes and explicit activation pairs ("sigmoid+gelu").

    The hyper head and the probes have no activation pair: act1 and act2 repeat the name, so tables keep them apart."""
    unknown = [a for a in acts if a not in HEADS and a not in (HYPER, *PROBES)]
    if unknown:
        raise SettingError(f"unknown head variant(s) {unknown}; choose from {', '.join((*HEADS, HYPER, *PROBES))}")
    return [(a, *HEADS[a]) if a in HEADS else (a, a, a) for a in acts] + [(f"{a1}+{a2}", a1, a2) for a1, a2 in act_pairs]


def expand_grid(
    pairs: list[tuple[str, str]],
    backbone: str,
    heads: list[tuple[str, str, str]],
    seeds: list[int],
    mask_ks: list[float] = (100.0,),
    dropout: str | None = None,
    keeps: list[float] = (1.0,),
    standardize: bool | None = None,
    layer_sets: list[tuple[int, ...] | None] = (None,),
    compute_dtype: str | None = None,
    knn_k: int | None = None,
    hyper_target: str | None = None,
    **shared,
) -> list[RunConfig]:
    """Every combination, in a stable order; `shared` sets epochs, lr, batch_size, fuse, ... for all runs.

    `standardize` None is each head's default: on for the probes, off for the MLP heads (the paper's).
    `layer_sets` are the heads' inputs (`layer_choices`): a layer sweep is one run per layer x head x seed.
    `compute_dtype` (`head_dtype`) applies to the trained heads; the probes are closed-form float64 fits.
    `knn_k` fixes the knn probe's k (None: cross-validated), `hyper_target` sizes the hyper head (None: iqa's);
    the other heads of the grid ignore them."""
    if dropout is not None and any(name in PROBES for name, _, _ in heads):
        raise SettingError(f"`dropout` applies to MLP heads; the probes ({', '.join(PROBES)}) take none")
    if knn_k is not None and all(name != "knn" for name, _, _ in heads):
        raise SettingError("`knn_k` fixes the knn probe's k: give the knn head with it")
    if hyper_target is not None and all(name != HYPER for name, _, _ in heads):
        raise SettingError("`hyper_target` sizes the hyper head: give the hyper head with it")
    return [
        RunConfig(train, test, backbone, name, act1, act2, seed, float(k), dropout, float(p), layers=layers,
                  standardize=name in PROBES if standardize is None else standardize,
                  compute_dtype=None if name in PROBES else compute_dtype,
                  knn_k=knn_k if name == "knn" else None, hyper_target=hyper_target if name == HYPER else None,
                  **shared)
        for layers, (train, test), (name, act1, act2), k, p, seed in product(layer_sets, pairs, heads, mask_ks, keeps, seeds)
    ]


def head_dtype(dtype: str, device: str) -> str | None:
    """A run's compute_dtype from `--dtype`: auto is bf16 autocast on a GPU and float32 (None) on a CPU,
    where autocast makes batch-12 steps slower."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise SettingError(f"`dtype` must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else None
    return None if dtype == "float32" else dtype


def layer_choices(layer: str | None, layers: str | None, held: list[int]) -> list[tuple[int, ...] | None]:
    """`--layer N` -> [(N,)], `--layer all` -> one set per layer the store holds (a sweep),
    `--layers 4,3` -> [(4, 3)] (concatenated); neither -> [None], the default embedding."""
    if layer is not None and layers is not None:
        raise SettingError("give `layer` (one layer, or all for a sweep) or `layers` (a concatenation), not both")
    if layer is None and layers is None:
        return [None]
    if layer == "all":
        chosen = [(n,) for n in held]
    else:
        text = layers if layer is None else layer
        try:
            chosen = [tuple(dict.fromkeys(int(part) for part in text.split(",")))]
        except ValueError:
            raise SettingError(f"`layer` takes a number or all, `layers` a list like 4,3; got {text!r}") from None
        if layer is not None and len(chosen[0]) != 1:
            raise SettingError(f"`layer` takes one layer or all; for a concatenation use `layers` {layer}")
    if not chosen:
        raise ValueError("the store holds no layers; `iqa extract ... --layers all` adds every layer to it")
    return chosen  # a layer the store lacks is named when the run loads it (`read_layers`)


def dataset_pairs(datasets: list[str], train: list[str], test: list[str]) -> list[tuple[str, str]]:
    """(train, test) pairs: each of `datasets` on its own split, then the cross-dataset ones: `train` and
    `test` zipped, or one training set against every test set (SMART-IQA's Table III: KonIQ -> SPAQ,
    KADID-10k, AGIQA-3K in one call)."""
    if len(train) == 1 and len(test) > 1:
        train = train * len(test)
    if len(train) != len(test):
        raise SettingError("`train` and `test` come in pairs, or one `train` with several `test`")
    pairs = [(d, d) for d in datasets] + list(zip(train, test))
    if not pairs:
        raise SettingError("give `dataset` or `train`/`test`")
    return pairs


def run_rows(config: RunConfig, train: Cached, test: Cached) -> tuple[np.ndarray, np.ndarray]:
    """Train and test rows of one run: the seed's 80/20 split, or all of the test set across datasets.

    Rows whose image failed in the cache are left out.
    """
    m = train.manifest
    train_rows, test_rows = split_indices(m.paths, config.seed, by=config.split_by, groups=m.groups,
                                           sets=m.extras.get("set"))
    if config.test_dataset != config.train_dataset:
        test_rows = np.arange(len(test.manifest))
    return train_rows[train.valid[train_rows]], test_rows[test.valid[test_rows]]


def _stack_key(config: RunConfig) -> tuple:
    """Runs that can train in one stack agree on everything but seed, mask k and keep."""
    d = config.to_dict()
    return tuple(str(v) for k, v in d.items() if k not in ("seed", "mask_k", "keep"))


class GridInputs:
    """What a grid's runs read, each loaded or computed once: the datasets' stores (the default embedding,
    or stored layers concatenated), and per run its rows, fingerprint and key."""

    def __init__(self, load: Callable[[str], Cached]):
        self.load = load
        self.loaded: dict[tuple, Cached] = {}
        self.splits: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.validation: dict[RunConfig, np.ndarray] = {}

    def cached(self, name: str, layers: tuple[int, ...] | None = None, spatial: int | None = None) -> Cached:
        """The dataset's default embedding, or (`layers`) its stored layers (their maps, with `spatial`)
        concatenated: `select_layers`."""
        if (name, layers, spatial) not in self.loaded:
            self.loaded[name, layers, spatial] = (self.load(name) if layers is None
                                                  else self.cached(name).select_layers(layers, spatial))
        return self.loaded[name, layers, spatial]

    def fingerprint(self, c: RunConfig) -> str:
        train, test = self.cached(c.train_dataset), self.cached(c.test_dataset)
        return train.fingerprint_id if c.train_dataset == c.test_dataset else f"{train.fingerprint_id}+{test.fingerprint_id}"

    def rows(self, c: RunConfig) -> tuple[np.ndarray, np.ndarray]:
        """A run's rows depend only on its datasets, seed and split rule: computed once per such group."""
        group = (c.train_dataset, c.test_dataset, c.seed, c.split_by)
        if group not in self.splits:
            self.splits[group] = run_rows(c, self.cached(c.train_dataset), self.cached(c.test_dataset))
        return self.splits[group]

    def carved(self, c: RunConfig) -> tuple[np.ndarray, ...]:
        """A run's validation rows where they are carved by content group: they enter its key (other runs'
        keys stay as they were) and its stack's shape (their number varies with the groups drawn)."""
        if c.select != "val" or c.split_by != "group":
            return ()
        if c not in self.validation:
            self.validation[c] = validation_rows(c, self.rows(c)[0], self.cached(c.train_dataset))[1]
        return (self.validation[c],)

    def key(self, c: RunConfig) -> str:
        return run_key(c, self.fingerprint(c), rows_digest(*self.rows(c), *self.carved(c)))

    def member_bytes(self, c: RunConfig) -> int:
        """What one member of `c`'s stack holds while it trains (BYTES_PER_PARAMETER); probes fit in closed form: 0."""
        if c.head in PROBES:
            return 0
        train = self.cached(c.train_dataset, c.layers, c.spatial)
        stages, content = head_geometry(c, train)
        return member_parameters(train.embeddings.shape[1], TrainSettings(**c.trainer_options()), stages,
                                 content) * BYTES_PER_PARAMETER

    def job(self, stack: list[tuple[RunConfig, str]]) -> "StackJob":
        first = stack[0][0]
        train = self.cached(first.train_dataset, first.layers, first.spatial)
        test = self.cached(first.test_dataset, first.layers, first.spatial)
        data, members = stack_inputs([c for c, _ in stack], [self.rows(c) for c, _ in stack], train, test)
        return StackJob([(c, self.fingerprint(c), k) for c, k in stack], data, members)


def stacks_of(pending: list[tuple[RunConfig, str]], inputs: GridInputs, size: int,
              budget: int | None = None) -> list[list[tuple[RunConfig, str]]]:
    """The pending runs grouped by architecture and row counts (runs that agree on them can share a stack: rows
    must be rectangular), `size` to a stack, and no more than fit in `budget` bytes where given (one at least)."""
    def shape(run: tuple[RunConfig, str]) -> tuple:
        config = run[0]
        return (_stack_key(config), *map(len, inputs.rows(config)), *map(len, inputs.carved(config)))

    stacks = []
    for _, group in groupby(sorted(pending, key=shape), key=shape):
        group = list(group)
        member = inputs.member_bytes(group[0][0]) if budget is not None else 0
        fits = min(size, max(1, budget // member)) if member else size
        stacks += [group[i : i + fits] for i in range(0, len(group), fits)]
    return stacks


def memory_budget(device: str) -> int | None:
    """The bytes a stack may take: most of the GPU's free memory, half of this machine's for the CPU; None where
    the device is not this machine's (a cuda device under Ray on a driver without one)."""
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.8)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def run_grid(
    configs: list[RunConfig],
    load: Callable[[str], Cached],
    db: ResultsDB,
    device: str = "cpu",
    stack_size: int | None = None,
    progress: bool = True,
    engine: "Engine | None" = None,
) -> list[dict]:
    """Train every config not already in `db`; return each config's stored record, in config order.

    `engine` trains the stacks (default `train_here`; `iqa.heads.training.ray_grid.train_on_ray` spreads them
    over a Ray cluster) and yields each finished one; its results are recorded here, by the caller.
    """
    inputs = GridInputs(load)
    keys = [inputs.key(c) for c in configs]
    finished = db.finished_keys()
    pending = list(dict.fromkeys((c, k) for c, k in zip(configs, keys) if k not in finished))
    default = STACK_SIZE.get(str(device).split(":")[0], 1)  # a --stack-size given is kept; the default fits the memory
    stacks = stacks_of(pending, inputs, stack_size or default, None if stack_size else memory_budget(device))
    jobs = [inputs.job(stack) for stack in stacks]
    with tqdm(total=sum(c.epochs for c, _ in pending), unit="model-epoch", disable=not progress,
              desc=f"runs 0/{len(pending)}") as bar:
        done = 0
        for job, results in (engine or train_here)(jobs, device, bar):
            record_stack(db, job, results)
            done += len(job.runs)
            bar.set_description(f"runs {done}/{len(pending)}")
    stored = {r["key"]: r for r in db.runs()}
    return [stored[k] for k in keys]


def record_stack(db: ResultsDB, job: "StackJob", results: list[RunResult]) -> None:
    """A finished stack into the results database (here only: one writer), each run's weights first: a
    recorded run has its weights."""
    for (c, _, k), r in zip(job.runs, results):
        r.curves["test_images"] = job.data.test_rows.shape[1]  # tables say how many images a correlation ranks
        if r.weights is not None:
            save_head(run_weights_path(db.path, k), r.weights, c.to_dict())
    db.record([(k, c.to_dict(), fp, r) for (c, fp, k), r in zip(job.runs, results)])


def stack_inputs(
    configs: list[RunConfig], rows: list[tuple[np.ndarray, np.ndarray]], train: Cached, test: Cached
) -> tuple[StackData, list[Member]]:
    """The trainer's inputs for runs that share a stack: their rows into the pools and one Member each.

    Runs of a stack agree on `l2norm` and `fuse` (`_stack_key`); with `l2norm`, every embedding is scaled to
    unit length (the concatenation of the stages, under `fuse`).
    Under `select="val"` each run's validation rows are carved from its own training rows, or are the
    published validation set under `split_by="official"`."""
    scale = l2_normalised if configs[0].l2norm else (lambda x: x)
    train_x = scale(train.embeddings)
    val_rows = None
    if configs[0].select == "val":
        carved = [validation_rows(c, r, train) for (r, _), c in zip(rows, configs)]
        rows = [(fit, test_rows) for (fit, _), (_, test_rows) in zip(carved, rows)]
        val_rows = np.stack([val for _, val in carved])
    data = StackData(
        train_x,
        train.manifest.targets,
        np.stack([train_rows for train_rows, _ in rows]),
        train_x if test is train else scale(test.embeddings),
        test.manifest.targets,
        np.stack([test_rows for _, test_rows in rows]),
        val_rows,
        *head_geometry(configs[0], train),
    )
    return data, [Member(c.seed, c.mask_k, c.keep, c.lr, c.milestones) for c in configs]


def as_read(config: RunConfig, train: Cached, test: Cached) -> tuple[Cached, Cached]:
    """The datasets as the run's head reads them: its stored layers (or their maps) concatenated where it names them."""
    if not config.layers:
        return train, test
    chosen = train.select_layers(config.layers, config.spatial)
    return chosen, chosen if test is train else test.select_layers(config.layers, config.spatial)


def head_geometry(config: RunConfig, train: Cached) -> tuple[tuple[tuple[int, int], ...] | None, tuple[int, int] | None]:
    """What the head of `config` is built over besides its width: the stages a fusion splits its input into, and
    the columns a hyper-network reads (`content_columns`)."""
    return (train.stages if config.fuse is not None else None), content_columns(config, train)


def content_columns(config: RunConfig, train: Cached) -> tuple[int, int] | None:
    """What a hyper head's hyper-network reads: on stored layers the deepest one (SMART-IQA's F^K), else everything."""
    if config.head != HYPER or not config.layers or config.fuse is not None:  # behind a fusion the fusion gives it F^K
        return None
    start = 0
    for layer, width in train.stages:
        if layer == max(config.layers):
            return start, start + width
        start += width


def validation_rows(config: RunConfig, train_rows: np.ndarray, train: Cached) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) rows of a `select="val"` run: the published validation set (failed images left out)
    beside the published training set, or a part carved from the seed's training rows."""
    if config.split_by != "official":
        groups = train.manifest.groups if config.split_by == "group" else None
        return carve_validation(train_rows, config.seed, config.val_fraction, groups)
    validation = official_split(train.manifest.extras.get("set"))["validation"]
    return train_rows, validation[train.valid[validation]]


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as CLIPModel/SiglipModel return `image_embeds`; NaN rows stay NaN."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass
class StackJob:
    """One stack ready to train anywhere: its runs (config, cache fingerprint id, run key), data and members."""

    runs: list[tuple[RunConfig, str, str]]
    data: StackData
    members: list[Member]

    @property
    def model_epochs(self) -> int:
        return len(self.runs) * self.runs[0][0].epochs

    def train(self, device: str, on_epoch: Callable[[int], None] | None = None,
              pools: PoolCache | None = None) -> list[RunResult]:
        first = self.runs[0][0]
        if first.head in PROBES:  # closed form on the CPU: the device does not matter
            results = train_probes(self.data, self.members, first.head, first.standardize, first.knn_k)
            for epoch in range(first.epochs) if on_epoch is not None else ():
                on_epoch(epoch + 1)  # the progress bar counts model-epochs
            return results
        return train_stack(self.data, self.members, device=device, on_epoch=on_epoch, pools=pools, **first.trainer_options())


Engine = Callable[[list[StackJob], str, tqdm], Iterator[tuple[StackJob, list[RunResult]]]]


def train_here(jobs: list[StackJob], device: str, bar: tqdm) -> Iterator[tuple[StackJob, list[RunResult]]]:
    """The local engine: one stack after another in this process, yielding each as it finishes; the
    stacks share the device copies of their embedding pools and the masked pools (`PoolCache`)."""
    pools = PoolCache()
    for job in jobs:
        yield job, job.train(device, on_epoch=lambda _: bar.update(len(job.runs)), pools=pools)
