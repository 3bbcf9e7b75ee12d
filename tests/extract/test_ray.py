"""The Ray engine: stores equal to the local engine's bit for bit, retries after a killed actor, shards,
resume after a SIGKILLed driver process, remote (fsspec) stores, and distributed grids that record
every run once."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'iqa[ray]')")

from helpers import fake_cache, make_dataset, small_grid  # noqa: E402

from iqa.cache.store import EmbeddingStore, store_path
from iqa.cache.load import load_cached
from iqa.cache.verify import verify_store  # noqa: E402
from iqa.cli import app  # noqa: E402
from iqa.extract.ray_engine import FAIL_ONCE_ENV, actor_pool, extract_with_ray  # noqa: E402
from iqa.extract.run import ExtractRequest, extract_dataset  # noqa: E402
from iqa.heads.training.grid import run_grid  # noqa: E402
from iqa.heads.training.ray_grid import train_on_ray  # noqa: E402
from iqa.cache.results import ResultsDB  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray cluster at a time

SAME = dict(weights="tiny", dtype="float32", store_dtype="float32", chunk_rows=3, batch_size=2, progress=False)
BACKBONE = "dinov2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A small local Ray (2 CPUs, 200 MB object store); its workers see the fault-injection folder."""
    faults = tmp_path_factory.mktemp("faults")
    os.environ[FAIL_ONCE_ENV] = str(faults)  # inherited by the workers ray.init starts
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield faults
    ray.shutdown()
    del os.environ[FAIL_ONCE_ENV]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy set of 10 images and one missing file, and the local engine's store of it (tag "local")."""
    cache = tmp_path_factory.mktemp("cache")
    make_dataset(cache, n=10, extra={"gone.png": lambda path: None})
    extract_dataset(ExtractRequest(cache, "toy", BACKBONE, tag="local", skip_bad=True, **SAME), num_workers=0)
    return cache


def assert_same_store(a, b):
    """Every array of two stores equal, NaN rows included, and the same fingerprint."""
    a, b = EmbeddingStore(a), EmbeddingStore(b)
    assert a.fingerprint == b.fingerprint
    for name in ("embeddings", "status", "reasons", "chunk_done", "keys"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)
    # size, mtime and content hash; ctime and inode are each copy's own files'
    np.testing.assert_array_equal(a.stamps()[:, :3], b.stamps()[:, :3], err_msg="image_stamps")


def test_ray_store_on_an_fsspec_url_equals_local_store_bit_for_bit(cluster, toy):
    url = "memory://iqa-test/stores"  # fsspec's in-memory filesystem: the driver is the store's only writer
    request = ExtractRequest(toy, "toy", BACKBONE, stores=url, **SAME)
    summary = extract_with_ray(request, actors=1)
    assert summary.store == f"{url}/toy/{BACKBONE}@tiny.zarr"
    assert summary.rows_computed == 11 and summary.chunks_written == 4 and summary.chunks_missing == 0
    assert summary.invalid == [("gone.png", "missing file")]
    assert_same_store(summary.store, store_path(toy, "toy", BACKBONE, "local"))
    again = extract_with_ray(request, actors=1)
    assert again.rows_computed == 0 and again.chunks_written == 0
    assert extract_dataset(request, num_workers=0).rows_computed == 0
    cached = load_cached(toy, "toy", BACKBONE, "tiny", stores=url)
    np.testing.assert_array_equal(cached.embeddings, load_cached(toy, "toy", BACKBONE, "local").embeddings)
    with pytest.raises(ValueError, match="built differently"):
        extract_dataset(replace(request, store_dtype="float16"), num_workers=0)


def test_ray_workers_use_the_geometry_the_driver_loaded(cluster, toy):
    """--resolution and --preprocess reach the decode tasks and the actors, not only the driver's fingerprint."""
    geometry = dict(resolution=48, preprocess="native")
    local = extract_dataset(ExtractRequest(toy, "toy", BACKBONE, tag="local48", skip_bad=True, **geometry, **SAME),
                            num_workers=0)
    distributed = extract_with_ray(ExtractRequest(toy, "toy", BACKBONE, tag="ray48", skip_bad=True, **geometry, **SAME),
                                   actors=1)
    assert EmbeddingStore(local.store).fingerprint["resolution"] == 48
    assert_same_store(distributed.store, local.store)


def copy_images(toy, cache):
    shutil.copytree(toy, cache, ignore=shutil.ignore_patterns("*.zarr"))  # the images and the manifest


def test_killed_actor_is_retried_and_two_ray_shards_fill_one_store(cluster, toy, tmp_path):
    cache = tmp_path / "cache"
    copy_images(toy, cache)
    (cluster / "chunk-2").touch()  # the actor embedding chunk 2 exits once: Ray restarts it and retries
    first = extract_with_ray(ExtractRequest(cache, "toy", BACKBONE, shard=(0, 2), **SAME), actors=1)
    assert not (cluster / "chunk-2").exists(), "the actor was never killed"
    assert (first.chunks_written, first.chunks_missing) == (2, 2)  # chunks 0 and 2 of 4
    args = ["extract", "--engine", "ray", "--actors", "1", "--shard", "1/2", "--backbone", BACKBONE, "--dataset", "toy", "--weights", "tiny",
            "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "2", "--skip-bad", "--cache", str(cache)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0 chunks still missing" in result.output
    assert_same_store(first.store, store_path(toy, "toy", BACKBONE, "local"))
    with pytest.raises(ValueError, match="0 <= i < n"):
        ExtractRequest(cache, "toy", BACKBONE, shard=(2, 2), **SAME)


KILLABLE_DRIVER = """
import sys, time
from pathlib import Path
import ray
from iqa.cache.store import EmbeddingStore
from iqa.extract.ray_engine import extract_with_ray
from iqa.extract.run import ExtractRequest
write_block = EmbeddingStore.write_block
def slow_write(store, *args):  # each written chunk leaves the test time to kill the driver before the next
    write_block(store, *args)
    time.sleep(1.5)
EmbeddingStore.write_block = slow_write
ray.init(address=sys.argv[2], logging_level="warning")
ray.data.DataContext.get_current().enable_progress_bars = False
extract_with_ray(ExtractRequest(Path(sys.argv[1]), "toy", "%s", **%r), actors=1)
""" % (BACKBONE, SAME)


def test_sigkilled_driver_process_resumes_reading_only_unfinished_chunks(cluster, toy, tmp_path):
    cache = tmp_path / "cache"
    copy_images(toy, cache)
    script = tmp_path / "driver.py"
    script.write_text(KILLABLE_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(cache), ray.get_runtime_context().gcs_address])
    path = store_path(cache, "toy", BACKBONE, "tiny")
    markers = path / "chunk_done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None and (not markers.is_dir() or len(os.listdir(markers)) < 2):
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    store = EmbeddingStore(path)
    done = np.flatnonzero(store.done_chunks())
    assert len(done) == 2, "the driver was not killed mid-run"
    args = ["extract", "--engine", "ray", "--backbone", BACKBONE, "--dataset", "toy", "--weights", "tiny", "--dtype", "float32",
            "--store-dtype", "float32", "--batch-size", "2", "--skip-bad", "--cache", str(cache)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    unfinished = 11 - sum(len(store.rows_of_chunk(int(c))) for c in done)
    assert f"{unfinished} images" in result.output and "0 chunks still missing" in result.output
    assert verify_store(path) == []
    assert_same_store(path, store_path(toy, "toy", BACKBONE, "local"))


def test_distributed_grid_records_every_run_exactly_once(cluster, tmp_path):
    db = ResultsDB(tmp_path / "results.sqlite")
    load = {"clive": fake_cache("clive")}.__getitem__
    configs = small_grid()  # 12 runs in 6 stacks of at most 2
    run_grid(configs[:3], load, db, stack_size=2, progress=False)  # some runs finished before
    first_three = [r["key"] for r in db.runs()]
    records = run_grid(configs, load, db, stack_size=2, progress=False, engine=train_on_ray())
    keys = [r["key"] for r in db.runs()]
    assert len(keys) == len(set(keys)) == len(configs) == len(records)
    assert keys[:3] == first_three  # not trained again (a re-recorded run would move to the end)
    assert all(r["status"] == "done" and len(r["curves"]["srcc"]) == 2 for r in records)
    run_grid(configs, load, db, stack_size=2, progress=False, engine=train_on_ray())
    assert [r["key"] for r in db.runs()] == keys


def test_actor_pool_takes_every_gpu_share_or_every_cpu():
    assert actor_pool({"CPU": 8.0}, 1.0) == (8, {"num_cpus": 1})
    assert actor_pool({"CPU": 16.0, "GPU": 4.0}, 0.5) == (8, {"num_gpus": 0.5})
