"""`iqa finetune --engine ray`: each run of a fine-tuning grid a Ray task, recorded by the driver.

A task plans and trains one run (heads/finetune/grid.py `tune`) with one GPU of the cluster, or one
CPU where the runs train on CPUs (a local Ray's workers: how the tests run it). Its checkpoint and
kept weights go to the folders the run names, which the workers must share with the driver (one
machine, or a shared file system); the driver alone writes the results database. A task that
fails is submitted once more; a second failure is reported and the other runs go on.
"""

from pathlib import Path
from typing import Iterator

from iqa.extract.ray_engine import connect
from iqa.heads.finetune.config import TuneRun
from iqa.heads.finetune.grid import Engine, tune
from iqa.heads.finetune.loop import Runtime

TRIES = 2


def tune_on_ray(address: str | None = None, num_gpus: float = 0.0) -> Engine:
    """An engine for `finetune_grid` that trains every run as a Ray task on the cluster at `address`."""

    def engine(cache: Path, runs: list[TuneRun], db_path: Path, runtime: Runtime, finished: set[str],
               run_dir: Path | None = None) -> Iterator[tuple[TuneRun, tuple | Exception]]:
        ray = connect(address)
        task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=0)(tune)
        tries = {}

        def submit(run: TuneRun):
            tries[run] = tries.get(run, 0) + 1
            return task.remote(cache, run, db_path, runtime, finished, run_dir)

        running = {submit(run): run for run in runs}
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            run = running.pop(ready)
            try:
                yield run, ray.get(ready)
            except ray.exceptions.RayError as error:
                if tries[run] < TRIES:
                    running[submit(run)] = run
                else:
                    yield run, getattr(error, "cause", None) or error  # the run's own exception, not Ray's wrapper

    return engine
