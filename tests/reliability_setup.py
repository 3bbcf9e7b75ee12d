"""A tiny cache for the reliability tests: 16 images, their NSS store, one trained run, its model folder."""

from functools import partial

from iqa.cache.results import ResultsDB, default_db
from iqa.cache.store import load_cached
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.saved.export import export_run
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from test_integrity import toy_dataset


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
