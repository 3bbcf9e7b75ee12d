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

from iqa.cache.results import ResultsDB
from iqa.cache.store import load_cached
from iqa.data.splits import split_indices
from iqa.heads.training.config import rows_digest, run_key
from iqa.heads.training.metrics import plcc, srcc
from iqa.heads.training.trainer import RunResult
from iqa.heads.zeroshot.prompts import PromptSet
from iqa.heads.zeroshot.scoring import zero_shot_scores
from iqa.heads.zeroshot.text import TEMPLATE, TextEmbeddings, text_embeddings

HEAD = "zeroshot"
ZEROSHOT_VERSION = 1  # bumped whenever the scoring changes the numbers a config gives
SCORING = "mean over pairs of the positive prompt's two-way softmax of the model's logits"


@dataclass(frozen=True)
class ZeroShotConfig:
    """One zero-shot run; the fields heads' configs share keep their names, so tables read both alike."""

    train_dataset: str  # nothing is trained: the dataset whose rows are scored, as test_dataset
    test_dataset: str
    backbone: str
    prompts: str  # the prompt set's name
    prompt_pairs: tuple[tuple[str, str], ...]
    seed: int | None  # None: every valid row of the set
    split_by: str = "random"
    template: str = TEMPLATE
    tag: str | None = None
    head: str = HEAD
    regime: str = HEAD

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_pairs"] = [list(pair) for pair in self.prompt_pairs]
        d["evaluated_on"] = "all" if self.seed is None else "test"
        return d

    def recipe(self) -> dict:
        return {"zeroshot_version": ZEROSHOT_VERSION, "scoring": SCORING}


def text_digest(text: TextEmbeddings) -> str:
    """What the scores depend on besides the images: the prompts' embeddings and the model's scale and bias."""
    h = hashlib.sha256(np.ascontiguousarray(text.embeddings, dtype=np.float32).tobytes())
    h.update(f"{text.logit_scale!r} {text.logit_bias!r}".encode())
    return h.hexdigest()[:16]


def evaluate(scores: torch.Tensor, targets: np.ndarray, rows: np.ndarray) -> RunResult:
    """SRCC and PLCC of the scores on `rows`: a run with one "epoch", recorded as best and last alike."""
    pred = scores[torch.as_tensor(rows)][None]
    target = torch.as_tensor(targets[rows], dtype=torch.float64)[None]
    s, p = float(srcc(pred, target)[0]), float(plcc(pred, target)[0])
    return RunResult("done", None, s, p, s, p, curves={"srcc": [s], "plcc": [p]})


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


def run_zeroshot(cache: Path, backbones: list[str], datasets: list[str], sets: list[PromptSet], seeds: list[int],
                 db: ResultsDB, split_by: str = "random", template: str = TEMPLATE, tag: str | None = None,
                 stores: Path | str | None = None) -> list[SweepRow]:
    """Score every prompt set on every (backbone, dataset) store and record one run per seed and one on
    the whole set; the text embeddings come from each store's own checkpoint (cached, text.py)."""
    out = []
    prompts = list(dict.fromkeys(p for s in sets for p in s.prompts))
    for backbone in backbones:
        for dataset in datasets:
            cached = load_cached(cache, dataset, backbone, tag, stores)
            text = text_embeddings(cache, cached.fingerprint, str(cached.path), prompts, template)
            images = torch.as_tensor(cached.embeddings)
            valid = np.flatnonzero(cached.valid)
            m = cached.manifest
            splits = {seed: split_indices(m.paths, seed, by=split_by, groups=m.groups, sets=m.extras.get("set"))[1]
                      for seed in seeds}
            for prompt_set in sets:
                rows = [prompts.index(p) for p in prompt_set.prompts]
                chosen = TextEmbeddings(prompt_set.prompts, text.embeddings[rows], text.logit_scale, text.logit_bias)
                scores = zero_shot_scores(images, torch.as_tensor(chosen.embeddings), text.logit_scale, text.logit_bias)
                fingerprint = f"{cached.fingerprint_id}-text-{text_digest(chosen)}"
                runs = []
                for seed in [*seeds, None]:
                    test_rows = valid if seed is None else splits[seed][cached.valid[splits[seed]]]
                    config = ZeroShotConfig(dataset, dataset, backbone, prompt_set.name, prompt_set.pairs, seed,
                                            split_by, template, tag)
                    key = run_key(config, fingerprint, rows_digest(np.array([], dtype=np.int64), test_rows))
                    runs.append((key, config.as_dict(), fingerprint, evaluate(scores, m.targets, test_rows)))
                db.record(runs)
                stored = {r["key"]: r for r in db.runs() if r["key"] in {k for k, *_ in runs}}
                out.append(SweepRow(backbone, dataset, prompt_set, [stored[k] for k, *_ in runs]))
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
        lines.append(f"| {row.backbone} | {row.dataset} | {row.prompts.name}{mark} | {row.mean():.4f} | "
                     f"{row.mean('plcc'):.4f} | {row.mean(on='all'):.4f} | {row.mean('plcc', 'all'):.4f} |")
    return "\n".join(lines) + "\n"
