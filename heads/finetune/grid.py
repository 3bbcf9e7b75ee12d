"""`iqa finetune` over a grid: every run of `expand_finetune_grid`, finished ones skipped, each recorded at once.

A run is finished when every record it makes (its own, one per cross dataset) is in the results
database; it is then not loaded again beyond its key. A run that is not trains from its checkpoint
(heads/finetune/loop.py), so a killed grid run again trains only what is missing and ends with the
results of an uninterrupted one. Only this process writes the database, one run at a time, in the
order the runs finish.

Engines: `local` trains the runs one after another here; `ray` (`tune_on_ray`) makes each run a Ray
task (one GPU each on a GPU cluster, one CPU each on local workers otherwise). A run whose task fails
is tried once more, then reported in `GridOutcome.failed` while the others go on.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from iqa.cache.manifest import read_manifest
from iqa.cache.results import ResultsDB, default_db
from iqa.extract.backbones import family_of
from iqa.extract.registry import get_spec, tag_weights
from iqa.heads.finetune.config import TuneRun
from iqa.heads.finetune.loop import Runtime, plan_run, split_rows, train_run
from iqa.heads.saved.weights import run_weights_path


@dataclass
class GridOutcome:
    records: list[dict] = field(default_factory=list)  # every record of the grid's runs, in the order they finished
    failed: list[tuple[TuneRun, str]] = field(default_factory=list)  # (run, why) after its retry


def run_label(run: TuneRun) -> str:
    c = run.config
    rank = f" r{c.lora_rank}" if c.regime == "lora" else ""
    return f"{c.backbone} {c.train_dataset} {c.regime}{rank} {c.head} s{c.seed}"


def tune(cache: Path, run: TuneRun, db_path: Path, runtime: Runtime, finished: set[str],
         run_dir: Path | None = None) -> tuple[list[str], list[tuple] | None]:
    """One run of a grid: (its record keys, its database rows; None when they were all finished)."""
    plan = plan_run(cache, run, runtime, run_dir)
    if set(plan.keys) <= finished:
        return plan.keys, None
    rows, _ = train_run(plan, run_weights_path(db_path, plan.key).parent, runtime)
    return plan.keys, rows


# (cache, runs, database path, runtime, finished keys, run folder of a grid of one) -> (run, outcome) as each finishes
Engine = Callable[[Path, list[TuneRun], Path, Runtime, set[str], Path | None], Iterator[tuple[TuneRun, tuple | Exception]]]


def tune_here(cache: Path, runs: list[TuneRun], db_path: Path, runtime: Runtime, finished: set[str],
              run_dir: Path | None = None) -> Iterator[tuple[TuneRun, tuple]]:
    """The local engine: one run after another in this process; an error stops the grid (bad input)."""
    for run in runs:
        yield run, tune(cache, run, db_path, runtime, finished, run_dir)


def check_grid(cache: Path, runs: list[TuneRun]) -> None:
    """What a run would fail on late, checked before the first one trains: unknown or untunable
    backbones, datasets without a manifest, training rows too few for a batch."""
    for backbone, tag in dict.fromkeys((r.config.backbone, r.config.tag) for r in runs):
        if not family_of(get_spec(backbone, tag_weights(tag))).tunable:
            raise ValueError(f"{backbone} computes fixed features: it has no backbone weights to fine-tune")
    datasets = dict.fromkeys(d for r in runs for d in (r.config.train_dataset, *r.tests))
    manifests = {d: read_manifest(cache, d) for d in datasets}
    for run in runs:
        split_rows(manifests[run.config.train_dataset], run.config)


def finetune_grid(
    cache: Path,
    runs: list[TuneRun],
    db: ResultsDB | None = None,
    runtime: Runtime = Runtime(),
    engine: Engine | None = None,
    run_dir: Path | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> GridOutcome:
    """Train every run of the grid not finished in `db`; `on_record(record)` for each record as its run
    finishes (or is found finished). One progress bar over the runs, naming the current one; the runs'
    own step bars stay off. `run_dir` is a checkpoint folder for a grid of one run."""
    if run_dir is not None and len(runs) != 1:
        raise ValueError(f"--run-dir is the folder of one run; this grid has {len(runs)} (leave it out)")
    check_grid(cache, runs)
    db = db if db is not None else ResultsDB(default_db(cache))
    quiet = replace(runtime, progress=False)
    finished, outcome = db.finished_keys(), GridOutcome()
    tuned = (engine or tune_here)(cache, runs, db.path, quiet, finished, run_dir)
    waiting = list(runs)
    with tqdm(total=len(runs), unit="run", disable=not runtime.progress, desc=run_label(runs[0])) as bar:
        for run, done in tuned:
            waiting.remove(run)
            bar.update()
            if waiting:  # the next one the local engine trains
                bar.set_description(run_label(waiting[0]))
            if isinstance(done, Exception):
                outcome.failed.append((run, f"{type(done).__name__}: {done}"))
                continue
            keys, rows = done
            if rows is not None:
                db.record(rows)
            stored = {r["key"]: r for r in db.runs() if r["key"] in keys}
            for key in keys:
                outcome.records.append(stored[key])
                if on_record is not None:
                    on_record(stored[key])
    return outcome
