"""Zero-shot runs: every prompt set scored over a store's cached image embeddings, recorded in the
results database beside the trained heads.

A run is (backbone, dataset, prompt set, seed): its metrics are SRCC and PLCC on the seed's test
rows, the same rows (data/splits.py, failed images left out) a head trained on that seed is tested
on, so tables set them side by side; a run with seed None is evaluated on every valid row of the set.
Nothing is trained and no image is read: the scores are one product of the stored image embeddings
with the prompts' text embeddings (text.py), so a sweep over many sets costs milliseconds per set.
Runs are keyed like the heads' (heads/training/config.run_key: config, recipe, data fingerprint, rows);
their data fingerprint is the store's followed by a digest of the text embeddings and logit scale and
bias the scores came from, so new text (another tokenizer version, say) is a new run.
"""

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from iqa.cache.results import ResultsDB
from iqa.cache.load import load_cached
from iqa.heads.training.config import LR_DECAY, lr_milestones, rows_digest, run_key
from iqa.heads.training.grid import Cached, run_rows, validation_rows
from iqa.heads.training.loss import MARGIN_SCALE
from iqa.heads.training.metrics import plcc, srcc
from iqa.heads.training.trainer import RunResult
from iqa.heads.saved.weights import run_weights_path, save_head
from iqa.heads.zeroshot.learn import CONTEXT_STD, LearnSettings, PromptLearner, train_prompts
from iqa.heads.zeroshot.prompts import PromptSet
from iqa.heads.zeroshot.scoring import zero_shot_scores
from iqa.heads.zeroshot.text import (TEMPLATE, TextEmbeddings, checkpoint_of, load_vision_language, text_embeddings,
                                     tokenizer_of)

HEAD = "zeroshot"
LEARNED = "learned-prompts"
ZEROSHOT_VERSION = 1  # bumped whenever the scoring changes the numbers a config gives
SCORING = "mean over pairs of the positive prompt's two-way softmax of the model's logits"


@dataclass(frozen=True)
class ZeroShotConfig:
    """One zero-shot or learned-prompts run; the fields heads' configs share keep their names, so tables read both alike."""

    train_dataset: str  # zero-shot trains nothing: the dataset whose rows are scored, as test_dataset
    test_dataset: str
    backbone: str
    prompts: str  # the prompt set's name
    prompt_pairs: tuple[tuple[str, str], ...]
    seed: int | None  # None: every valid row of the set
    split_by: str = "random"
    template: str = TEMPLATE
    tag: str | None = None
    head: str = HEAD
    act1: str = HEAD  # a head without an activation pair repeats its name here, as the probes do
    act2: str = HEAD
    regime: str = "frozen"  # the backbone's, as for cached heads: scoring uses its stored, untuned embeddings
    learn: LearnSettings | None = None  # learned prompts (learn.py), trained on the seed's training rows

    @classmethod
    def learned(cls, dataset: str, backbone: str, prompt_set: PromptSet, seed: int, split_by: str, template: str,
                tag: str | None, settings: LearnSettings) -> "ZeroShotConfig":
        return cls(dataset, dataset, backbone, prompt_set.name, prompt_set.pairs, seed, split_by, template, tag,
                   LEARNED, LEARNED, LEARNED, learn=settings)

    @property
    def val_fraction(self) -> float:
        return self.learn.val_fraction

    def to_dict(self) -> dict:
        """What the results database stores and the key hashes: the fields, a learned run's settings among them."""
        d = asdict(self)
        learn = d.pop("learn") or {}
        d["prompt_pairs"] = [list(pair) for pair in self.prompt_pairs]
        d["evaluated_on"] = "all" if self.seed is None else "test"
        return d | learn

    def recipe(self) -> dict:
        recipe = {"zeroshot_version": ZEROSHOT_VERSION, "scoring": SCORING}
        if self.learn is None:
            return recipe
        return recipe | {"milestones": list(lr_milestones(self.train_dataset)), "lr_decay": LR_DECAY,
                         "margin_scale": MARGIN_SCALE, "context_std": CONTEXT_STD,
                         "batches": "floor(n_train / batch_size) full batches per epoch, order from (seed, epoch)"}


def text_digest(text: TextEmbeddings) -> str:
    """What the scores depend on besides the images: the prompts' embeddings and the model's scale and bias."""
    h = hashlib.sha256(np.ascontiguousarray(text.embeddings, dtype=np.float32).tobytes())
    h.update(f"{text.logit_scale!r} {text.logit_bias!r}".encode())
    return h.hexdigest()[:16]


def text_weights(text: TextEmbeddings) -> dict[str, torch.Tensor]:
    """What scoring needs besides an image embedding (scoring.TextHead)."""
    return {"text_embeddings": torch.as_tensor(text.embeddings), "logit_scale": torch.tensor([text.logit_scale]),
            "logit_bias": torch.tensor([text.logit_bias])}


def evaluate(scores: torch.Tensor, targets: np.ndarray, rows: np.ndarray) -> RunResult:
    """SRCC and PLCC of the scores on `rows`: a run with one "epoch", recorded as best and last alike."""
    pred = scores[torch.as_tensor(rows)][None]
    target = torch.as_tensor(targets[rows], dtype=torch.float64)[None]
    s, p = float(srcc(pred, target)[0]), float(plcc(pred, target)[0])
    return RunResult("done", None, s, p, s, p, curves={"srcc": [s], "plcc": [p], "test_images": len(rows)})


@dataclass
class SweepRow:
    """One prompt set on one store: its runs' records (the seeds', then the whole set's)."""

    backbone: str
    dataset: str
    prompts: PromptSet
    records: list[dict]

    def mean(self, metric: str = "srcc", on: str = "test") -> float:
        values = [r[f"best_{metric}"] for r in self.records if r["evaluated_on"] == on]
        return float(np.mean(values)) if values else float("nan")


@dataclass
class ScoredStore:
    """One store's embeddings with the text embeddings of every prompt the sets name."""

    cached: Cached  # load_cached's CachedEmbeddings
    text: TextEmbeddings

    def text_of(self, prompt_set: PromptSet) -> TextEmbeddings:
        rows = [self.text.prompts.index(p) for p in prompt_set.prompts]
        return TextEmbeddings(prompt_set.prompts, self.text.embeddings[rows], self.text.logit_scale, self.text.logit_bias)

    def fingerprint(self, prompt_set: PromptSet) -> str:
        """The store's fingerprint id and a digest of the set's text: a run's data."""
        return f"{self.cached.fingerprint_id}-text-{text_digest(self.text_of(prompt_set))}"


def scored_store(cache: Path, backbone: str, dataset: str, sets: list[PromptSet], template: str, tag: str | None,
                 stores: Path | str | None) -> ScoredStore:
    cached = load_cached(cache, dataset, backbone, tag, stores)
    prompts = list(dict.fromkeys(p for s in sets for p in s.prompts))
    return ScoredStore(cached, text_embeddings(cache, cached.fingerprint, str(cached.path), prompts, template))


def record(db: ResultsDB, runs: list[tuple[str, dict, str, RunResult]]) -> list[dict]:
    """Record the runs (their kept weights first, as heads' are) and return their stored records, in order."""
    for key, config, _, result in runs:
        if result.weights is not None:
            save_head(run_weights_path(db.path, key), result.weights, config)
    db.record(runs)
    stored = {r["key"]: r for r in db.runs()}
    return [stored[key] for key, *_ in runs]


def run_zeroshot(cache: Path, backbones: list[str], datasets: list[str], sets: list[PromptSet], seeds: list[int],
                 db: ResultsDB, split_by: str = "random", template: str = TEMPLATE, tag: str | None = None,
                 stores: Path | str | None = None) -> list[SweepRow]:
    """Score every prompt set on every (backbone, dataset) store and record one run per seed and one on
    the whole set; the text embeddings come from each store's own checkpoint (cached, text.py)."""
    out = []
    for backbone in backbones:
        for dataset in datasets:
            store = scored_store(cache, backbone, dataset, sets, template, tag, stores)
            cached, m = store.cached, store.cached.manifest
            images = torch.as_tensor(cached.embeddings)
            for prompt_set in sets:
                text = store.text_of(prompt_set)
                scores = zero_shot_scores(images, torch.as_tensor(text.embeddings), text.logit_scale, text.logit_bias)
                runs, fingerprint = [], store.fingerprint(prompt_set)
                for seed in [*seeds, None]:
                    config = ZeroShotConfig(dataset, dataset, backbone, prompt_set.name, prompt_set.pairs, seed,
                                            split_by, template, tag)
                    test_rows = np.flatnonzero(cached.valid) if seed is None else run_rows(config, cached, cached)[1]
                    key = run_key(config, fingerprint, rows_digest(np.array([], dtype=np.int64), test_rows))
                    result = evaluate(scores, m.targets, test_rows)
                    result.weights = text_weights(text)  # kept like a head's, so `iqa export` takes the run
                    runs.append((key, config.to_dict(), fingerprint, result))
                out.append(SweepRow(backbone, dataset, prompt_set, record(db, runs)))
    return out


def run_learned(cache: Path, backbones: list[str], datasets: list[str], sets: list[PromptSet], seeds: list[int],
                db: ResultsDB, settings: LearnSettings, split_by: str = "random", template: str = TEMPLATE,
                tag: str | None = None, stores: Path | str | None = None, device: str = "cpu",
                progress: bool = True) -> list[SweepRow]:
    """Learn each set's context vectors (learn.py) once per seed on that seed's training rows, tested on its
    test rows; each run is recorded as it finishes, and finished runs in `db` are not trained again. The kept
    text embeddings are the run's weights."""
    out = []
    for backbone in backbones:
        for dataset in datasets:
            store = scored_store(cache, backbone, dataset, sets, template, tag, stores)
            cached = store.cached
            images = torch.as_tensor(cached.embeddings, device=device)
            model = None
            for prompt_set in sets:
                keys, finished, fingerprint = [], db.finished_keys(), store.fingerprint(prompt_set)
                for seed in tqdm(seeds, desc=f"{backbone}/{dataset}/{prompt_set.name[:30]}", disable=not progress):
                    config = ZeroShotConfig.learned(dataset, backbone, prompt_set, seed, split_by, template, tag, settings)
                    train_rows, test_rows = run_rows(config, cached, cached)
                    val_rows = None
                    if settings.select == "val":
                        train_rows, val_rows = validation_rows(config, train_rows, cached)
                    keys.append(run_key(config, fingerprint, rows_digest(train_rows, test_rows)))
                    if keys[-1] in finished:
                        continue
                    settings.check_rows(len(train_rows))  # before the model loads
                    if model is None:
                        source = checkpoint_of(cached.fingerprint, str(cached.path))
                        model, kind = load_vision_language(source, cached.fingerprint, str(cached.path))
                        model, tokenizer = model.to(device), tokenizer_of(source)
                    learner = PromptLearner(model, kind, tokenizer, [template.format(p) for p in prompt_set.prompts],
                                            settings.context, seed).to(device)
                    result = train_prompts(learner, images, cached.manifest.targets, train_rows, test_rows, val_rows,
                                           seed, settings, lr_milestones(dataset))
                    record(db, [(keys[-1], config.to_dict(), fingerprint, result)])
                stored = {r["key"]: r for r in db.runs()}
                out.append(SweepRow(backbone, dataset, prompt_set, [stored[key] for key in keys]))
    return out


def best_sets(rows: list[SweepRow]) -> dict[tuple[str, str], SweepRow]:
    """The set of highest mean test SRCC over seeds on each (backbone, dataset): chosen on test rows, so optimistic."""
    best: dict[tuple[str, str], SweepRow] = {}
    for row in rows:
        key = (row.backbone, row.dataset)
        if key not in best or np.nan_to_num(row.mean(), nan=-np.inf) > np.nan_to_num(best[key].mean(), nan=-np.inf):
            best[key] = row
    return best


def sweep_table(rows: list[SweepRow]) -> str:
    """One line per (backbone, dataset, set): mean SRCC/PLCC over the seeds' test rows and on the whole set;
    the best set of each store marked."""
    best = {id(row) for row in best_sets(rows).values()}
    several = len({row.prompts.name for row in rows}) > 1
    lines = ["| backbone | dataset | prompts | SRCC (test, mean over seeds) | PLCC | SRCC (all) | PLCC (all) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        mark = " **best**" if id(row) in best and several else ""
        values = [row.mean(), row.mean("plcc"), row.mean(on="all"), row.mean("plcc", "all")]
        cells = " | ".join("—" if np.isnan(v) else f"{v:.4f}" for v in values)  # learned prompts: no whole-set run
        lines.append(f"| {row.backbone} | {row.dataset} | {row.prompts.name}{mark} | {cells} |")
    return "\n".join(lines) + "\n"
