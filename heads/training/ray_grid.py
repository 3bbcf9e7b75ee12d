"""`iqa head --cached --engine ray`: a grid's stacks as Ray tasks, recorded by the driver.

Each stack trains in its own task (one CPU share, or `num_gpus` of a GPU); the driver takes the
stacks as they finish and `run_grid` writes each to the one results database, keyed by run key.
Only the driver writes, so no run is lost or recorded twice: a task that dies is retried by Ray
and its stack recorded once when it returns; a killed driver loses the stacks in flight, which
the next run trains (finished run keys are skipped).
"""

from typing import Iterator

from tqdm import tqdm

from iqa.extract.ray_engine import connect
from iqa.heads.training.grid import Engine, StackJob
from iqa.heads.training.trainer import RunResult


def _train(job: StackJob, device: str) -> list[RunResult]:
    return job.train(device)


def train_on_ray(address: str | None = None, num_gpus: float = 0.0, max_retries: int = 3) -> Engine:
    """An engine for `run_grid` that trains every stack as a Ray task on the cluster at `address`."""

    def engine(jobs: list[StackJob], device: str, bar: tqdm) -> Iterator[tuple[StackJob, list[RunResult]]]:
        ray = connect(address)
        task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=max_retries)(_train)
        running = {task.remote(job, device): job for job in jobs}
        while running:
            [finished], _ = ray.wait(list(running), num_returns=1)
            job = running.pop(finished)
            results = ray.get(finished)
            bar.update(job.model_epochs)
            yield job, results

    return engine
