"""Paired comparison of two configurations over the same seeds and test images.

Mean +- std over seeds cannot say whether a difference as small as the paper's "no statistically
significant advantage" (GELU against LeakyReLU) is one. Two configurations run with the same seeds are
paired twice: per seed (same split, same data order) and per test image. A configuration is a run's
config without its seed, on the same embedding store (`configuration`); each of its runs is a seed.

For every seed both configurations ran, each run's kept head predicts the seed's test rows again from
the cached embeddings (`kept_predictions`: the trainer's own inputs, so its SRCC is the recorded one);
the two runs must have tested on the same images. Reported, always as B - A:
- the per-seed differences of SRCC and PLCC and their mean over seeds;
- a percentile bootstrap confidence interval (LEVEL) of that mean over test images: each of RESAMPLES
  draws every seed's test images with replacement, the same draw for A and B (paired), and averages
  the per-seed differences of the resampled SRCC (PLCC) over seeds. An interval that excludes 0 is a
  difference the test images support; it says nothing about other splits or seeds.
"""

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iqa.heads.report.page import text_table
from iqa.heads.training.config import RunConfig
from iqa.heads.training.metrics import plcc, srcc

RESAMPLES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0
CHUNK = 250  # resamples ranked at once: [CHUNK, test images] float64 per configuration
METRICS = {"srcc": srcc, "plcc": plcc}


def configuration(run: dict) -> str:
    """What makes two runs the same configuration: their config but the seed, and their data."""
    config = RunConfig.from_dict(run).to_dict()
    del config["seed"]
    return json.dumps({"config": config, "fingerprint_id": run["fingerprint_id"]}, sort_keys=True)


def seeds_of(runs: list[dict], run: dict) -> dict[int, dict]:
    """seed -> the finished run of `run`'s configuration (`run` itself among them)."""
    same = configuration(run)
    return {r["seed"]: r for r in runs if r["status"] == "done" and configuration(r) == same}


@dataclass
class PairedComparison:
    a: str  # a short name of each configuration: the key prefix asked for
    b: str
    seeds: list[int]
    images: list[int]  # test images per seed
    srcc_a: list[float]
    srcc_b: list[float]
    plcc_a: list[float]
    plcc_b: list[float]
    srcc_diff: float  # mean over seeds of B - A
    plcc_diff: float
    srcc_ci: tuple[float, float]  # bootstrap interval of srcc_diff over test images
    plcc_ci: tuple[float, float]
    level: float
    resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_differences(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], metric: str,
                          resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples] mean over seeds of metric(B) - metric(A), each seed's (pred_a, pred_b, target) drawn with
    replacement: per seed in order, `default_rng(seed).integers(0, n, (resamples, n))`."""
    rng = np.random.default_rng(seed)
    score = METRICS[metric]
    total = np.zeros(resamples)
    for pred_a, pred_b, target in pairs:
        draws = rng.integers(0, len(target), (resamples, len(target)))
        for start in range(0, resamples, CHUNK):
            rows = torch.as_tensor(draws[start:start + CHUNK])
            picked = [torch.as_tensor(np.asarray(v, dtype=np.float64))[rows] for v in (pred_a, pred_b, target)]
            total[start:start + CHUNK] += (score(picked[1], picked[2]) - score(picked[0], picked[2])).numpy()
    return total / len(pairs)


def paired_comparison(a: dict[int, dict], b: dict[int, dict], predictions: Callable[[dict], dict], names=("A", "B"),
                      resamples: int = RESAMPLES, level: float = LEVEL) -> PairedComparison:
    """Configurations `a` and `b` (seed -> run) compared over the seeds both ran; `predictions(run)` gives a
    run's test `rows`, `pred` and `target` (`kept_predictions`)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"{names[0]} (seeds {sorted(a)}) and {names[1]} (seeds {sorted(b)}) share no seed; "
                         "train both with the same --seeds")
    pairs = []
    for seed in seeds:
        pa, pb = predictions(a[seed]), predictions(b[seed])
        if not np.array_equal(pa["rows"], pb["rows"]):
            raise ValueError(f"seed {seed}: {names[0]} and {names[1]} tested on different images (another split or "
                             "dataset); a paired comparison needs the same test images")
        pairs.append((pa["pred"], pb["pred"], pa["target"]))
    per_seed = {f"{m}_{side}": [float(METRICS[m](torch.as_tensor(np.asarray(p[i], dtype=np.float64))[None],
                                                  torch.as_tensor(np.asarray(p[2], dtype=np.float64))[None])[0])
                                for p in pairs]
                for m in METRICS for side, i in (("a", 0), ("b", 1))}
    tails = [(1 - level) / 2, (1 + level) / 2]
    intervals = {m: tuple(float(q) for q in np.quantile(bootstrap_differences(pairs, m, resamples), tails)) for m in METRICS}
    return PairedComparison(
        *names, seeds, [len(p[2]) for p in pairs], **per_seed,
        srcc_diff=float(np.mean(np.subtract(per_seed["srcc_b"], per_seed["srcc_a"]))),
        plcc_diff=float(np.mean(np.subtract(per_seed["plcc_b"], per_seed["plcc_a"]))),
        srcc_ci=intervals["srcc"], plcc_ci=intervals["plcc"], level=level, resamples=resamples)


def compare_keys(runs: list[dict], key_a: str, key_b: str, results_db: Path, load: Callable) -> PairedComparison:
    """The configurations of runs `key_a` and `key_b` (key prefixes) compared; `load(dataset, backbone, tag)`
    gives the cached embeddings their kept heads predict from."""
    from iqa.heads.report.scatter import kept_predictions
    from iqa.heads.saved.export import find_run

    loaded: dict[tuple, object] = {}

    def predictions(run: dict) -> dict:
        train, test = (loaded.setdefault((name, run["backbone"], run.get("tag")), load(name, run["backbone"], run.get("tag")))
                       for name in (run["train_dataset"], run["test_dataset"]))
        return kept_predictions(run, results_db, train, test)

    first, second = find_run(runs, key_a), find_run(runs, key_b)
    if configuration(first) == configuration(second):
        raise ValueError(f"{key_a} and {key_b} are seeds of one configuration; compare two configurations")
    return paired_comparison(seeds_of(runs, first), seeds_of(runs, second), predictions, (key_a, key_b))


def paired_table(result: PairedComparison, fmt: str = "md") -> str:
    """One row per seed and one for the mean with its bootstrap interval (md, csv or html)."""
    headers = ["seed", "test images", f"SRCC {result.a}", f"SRCC {result.b}", "SRCC B - A",
               f"PLCC {result.a}", f"PLCC {result.b}", "PLCC B - A"]
    rows = [[str(s), str(n), f"{sa:.4f}", f"{sb:.4f}", f"{sb - sa:+.4f}", f"{pa:.4f}", f"{pb:.4f}", f"{pb - pa:+.4f}"]
            for s, n, sa, sb, pa, pb in zip(result.seeds, result.images, result.srcc_a, result.srcc_b,
                                            result.plcc_a, result.plcc_b)]
    percent = f"{result.level:.0%}"
    rows.append(["mean", "", f"{np.mean(result.srcc_a):.4f}", f"{np.mean(result.srcc_b):.4f}",
                 f"{result.srcc_diff:+.4f} [{result.srcc_ci[0]:+.4f}, {result.srcc_ci[1]:+.4f}]",
                 f"{np.mean(result.plcc_a):.4f}", f"{np.mean(result.plcc_b):.4f}",
                 f"{result.plcc_diff:+.4f} [{result.plcc_ci[0]:+.4f}, {result.plcc_ci[1]:+.4f}]"])
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([headers, *rows])
        return buffer.getvalue()
    table = text_table(headers, rows, fmt)
    note = (f"B - A per seed; the mean's {percent} interval: percentile bootstrap over test images, "
            f"{result.resamples} paired resamples.")
    return table + (f"\n{note}\n" if fmt == "md" else f"<p>{note}</p>\n")
