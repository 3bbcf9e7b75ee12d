"""For the reliability tests: the CLI, its one-line refusals, and a tiny cache (16 images, their NSS store,
one trained run, its model folder)."""

from functools import partial

from typer.testing import CliRunner

from iqa.cache.results import ResultsDB, default_db
from iqa.cache.store import load_cached
from iqa.cli import app
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.saved.export import export_run
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from test_integrity import toy_dataset


def iqa(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *words):
    """A refusal: non-zero exit, no exception but the exit, and exactly one `error:` line, the last, holding `words`."""
    assert result.exit_code != 0 and isinstance(result.exception, (SystemExit, type(None))), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert all(word in errors[0] for word in words), errors[0]


def nss_cache(cache, n=16):
    """The toy dataset, its NSS store written in chunks of 4 rows, one 1-epoch baseline run; the run."""
    toy_dataset(cache, n=n)
    assert extract_dataset(ExtractRequest(cache, "toy", "nss", chunk_rows=4, progress=False), num_workers=0).ok
    configs = expand_grid([("toy", "toy")], "nss", head_choices(["baseline"], []), [8], epochs=1)
    (run,) = run_grid(configs, partial(load_cached, cache, backbone="nss"), ResultsDB(default_db(cache)), progress=False)
    return run


def nss_model(cache, out, n=16):
    run = nss_cache(cache, n)
    return export_run(cache, default_db(cache), run, out), run
