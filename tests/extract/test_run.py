import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from iqa.cache.store import EmbeddingStore
from iqa.cache.load import load_cached
from iqa.cache.verify import verify_store
from iqa.cli import app
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import BACKBONES, BackboneSpec, get_spec
from iqa.extract.run import ExtractRequest, extract_dataset
from helpers import QUIET, by_hand, make_dataset

@pytest.mark.parametrize("key", ["siglip2", "clip", "dinov2", "dinov3", "resnet152"])
def test_extraction_matches_per_image_computation(tmp_path, key):
    paths = make_dataset(tmp_path, n=5)
    request = ExtractRequest(tmp_path, "toy", key, weights="tiny", dtype="float32", store_dtype="float32", chunk_rows=2,
                             batch_size=2, **QUIET)
    summary = extract_dataset(request, num_workers=0)
    assert summary.ok and summary.rows_computed == 5 and summary.chunks_written == 3 and summary.chunks_missing == 0
    spec = get_spec(key).as_tiny()
    expected = by_hand(spec, load_backbone(spec, weights="tiny"), tmp_path / "images", paths)
    cached = load_cached(tmp_path, "toy", key, tag="tiny")
    assert cached.valid.all() and cached.fingerprint["model_id"] == f"tiny:{spec.model_class}"
    np.testing.assert_allclose(cached.embeddings, expected, rtol=1e-4, atol=1e-5)


def test_auto_dtype_is_bf16_only_where_the_cpu_has_it_and_stays_close_to_float32(tmp_path, monkeypatch):
    paths = make_dataset(tmp_path, n=4)
    spec = get_spec("dinov3").as_tiny()
    expected = by_hand(spec, load_backbone(spec, weights="tiny"), tmp_path / "images", paths)
    for has_bf16, dtype in [(False, "float32"), (True, "bfloat16")]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": has_bf16, "amx_bf16": False})
        extract_dataset(ExtractRequest(tmp_path, "toy", "dinov3", weights="tiny", store_dtype="float32", overwrite=True, **QUIET),
                        num_workers=0)
        cached = load_cached(tmp_path, "toy", "dinov3", tag="tiny")
        assert cached.fingerprint["compute_dtype"] == dtype
        relative = np.abs(cached.embeddings - expected).max() / np.abs(expected).max()
        if dtype == "float32":
            assert relative < 1e-5
        else:  # bf16 really ran (it rounds), and stayed close
            assert 1e-4 < relative < 2e-2


def test_bad_images_are_recorded_and_never_stop_the_run(tmp_path):
    def truncated(path):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path.with_suffix(".tmp.jpg"))
        data = path.with_suffix(".tmp.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def bomb(path):  # a grey 1-bit image far over PIL's pixel limit, small on disk
        Image.new("1", (12_000, 12_000)).save(path)

    extra = {"gone.png": lambda p: None, "cut.jpg": truncated, "notes.png": lambda p: p.write_text("hi"), "bomb.png": bomb}
    paths = make_dataset(tmp_path, n=4, extra=extra)
    summary = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov3", weights="tiny", chunk_rows=3, **QUIET), num_workers=2)
    reasons = dict(summary.invalid)
    assert set(reasons) == set(extra) and not summary.ok
    assert reasons["gone.png"] == "missing file" and reasons["notes.png"] == "not an image"
    assert reasons["cut.jpg"].startswith("truncated") and reasons["bomb.png"].startswith("decompression bomb")
    cached = load_cached(tmp_path, "toy", "dinov3", tag="tiny")
    assert cached.valid.tolist() == [p not in extra for p in paths]
    assert np.isfinite(cached.embeddings[cached.valid]).all() and verify_store(summary.store) == []
    again = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov3", weights="tiny", skip_bad=True, **QUIET), num_workers=0)
    assert again.ok and again.rows_computed == 0 and len(again.invalid) == 4

    result = CliRunner().invoke(app, ["extract", "--backbone", "dinov3", "--dataset", "toy", "--weights", "tiny", "--cache", str(tmp_path)])
    assert result.exit_code == 1 and "4 images could not be read" in result.output
    result = CliRunner().invoke(app, ["extract", "--backbone", "dinov3", "--dataset", "toy", "--weights", "tiny", "--skip-bad",
                                      "--cache", str(tmp_path)])
    assert result.exit_code == 0


def test_shards_fill_one_store_concurrently_and_match_one_process(tmp_path):
    make_dataset(tmp_path, n=11)
    common = dict(weights="tiny", chunk_rows=2, batch_size=2, **QUIET)
    reference = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", tag="one", **common), num_workers=0)
    first = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", shard=(0, 3), **common), num_workers=0)
    assert first.chunks_written == 2 and first.chunks_missing == 4
    assert verify_store(first.store) == ["incomplete: 4 of 6 chunks not written"]
    assert CliRunner().invoke(app, ["cache", "verify", "--cache", str(tmp_path)]).exit_code == 1
    summaries = {}

    def shard(i):
        try:
            summaries[i] = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", shard=(i, 3), **common), num_workers=0)
        except Exception as error:  # a thread's exception would otherwise pass unseen
            summaries[i] = error

    threads = [threading.Thread(target=shard, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = EmbeddingStore(first.store).done_chunks()
    described = {i: s if isinstance(s, Exception) else (s.chunks_written, s.repaired, s.changed) for i, s in summaries.items()}
    assert verify_store(first.store) == [], (done, described)
    np.testing.assert_array_equal(load_cached(tmp_path, "toy", "dinov2", tag="tiny").embeddings,
                                  load_cached(tmp_path, "toy", "dinov2", tag="one").embeddings)
    assert reference.fingerprint_id == first.fingerprint_id


def test_extraction_draws_nothing_from_torch_s_global_generator(tmp_path):
    """Random weights are built from torch's global generator under a fixed seed (`seeded_init`): a draw from it
    in another thread meanwhile (a loader's base seed) gave a concurrent shard other weights, so its fingerprint
    was refused."""
    make_dataset(tmp_path, n=4)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    summary = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", weights="tiny", **QUIET), num_workers=0)
    assert summary.ok and torch.equal(torch.random.get_rng_state(), before)


def test_a_shard_repairs_only_its_own_chunks(tmp_path):
    """Another shard's chunk can read as damaged while its process writes it (rows read before they are
    written, its done mark after it is set); the shard that owns it repairs it, no other shard."""
    from iqa.cache.store import PENDING

    make_dataset(tmp_path, n=11)
    common = dict(weights="tiny", chunk_rows=2, batch_size=2, **QUIET)
    whole = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", **common), num_workers=0)
    reference = load_cached(tmp_path, "toy", "dinov2", tag="tiny").embeddings
    store = EmbeddingStore(whole.store, mode="r+")
    store.group["status"][0:4] = PENDING  # chunks 0 (shard 0 of 3's) and 1 (shard 1's): done, rows without a status
    first = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", shard=(0, 3), **common), num_workers=0)
    assert first.repaired.keys() == {0} and first.rows_computed == 2
    assert [problem.split(":")[0] for problem in verify_store(whole.store)] == ["damaged"]  # chunk 1, left to its shard
    second = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", shard=(1, 3), **common), num_workers=0)
    assert second.repaired.keys() == {1} and verify_store(whole.store) == []
    np.testing.assert_array_equal(load_cached(tmp_path, "toy", "dinov2", tag="tiny").embeddings, reference)


KILLABLE = """
import sys, time
from pathlib import Path
import iqa.extract.run as run
decode = run.decode_image
def slow_decode(path):  # slows the run down so the test can kill it mid-way
    time.sleep(0.08)
    return decode(path)
run.decode_image = slow_decode
request = run.ExtractRequest(Path(sys.argv[1]), "toy", "dinov3", weights="tiny", chunk_rows=2, batch_size=2, progress=False)
run.extract_dataset(request, num_workers=1)
"""


def test_sigkill_then_rerun_finishes_without_recomputing_and_matches(tmp_path):
    make_dataset(tmp_path, n=24)
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    markers = tmp_path / "toy" / "dinov3@tiny.zarr" / "chunk_done" / "c"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not markers.is_dir() or len(os.listdir(markers)) < 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = int(EmbeddingStore(tmp_path / "toy" / "dinov3@tiny.zarr").done_chunks().sum())
    assert 3 <= done_before < 12, "the run was not interrupted mid-way"
    resumed = extract_dataset(ExtractRequest(tmp_path, "toy", "dinov3", weights="tiny", chunk_rows=2, batch_size=2, **QUIET),
                              num_workers=0)
    assert resumed.rows_computed == 24 - 2 * done_before and resumed.chunks_missing == 0
    extract_dataset(ExtractRequest(tmp_path, "toy", "dinov3", weights="tiny", chunk_rows=2, batch_size=2, tag="whole", **QUIET),
                    num_workers=0)
    np.testing.assert_array_equal(load_cached(tmp_path, "toy", "dinov3", tag="tiny").embeddings,
                                  load_cached(tmp_path, "toy", "dinov3", tag="whole").embeddings)


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32).reshape(-1, 3).mean(axis=0)


def test_worker_feature_entry_is_one_table_line(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKBONES, "colour", BackboneSpec("colour", dim=3, pooling="worker",
                                                          features_in_worker=mean_colour, revision="1"))
    paths = make_dataset(tmp_path, n=5, extra={"gone.png": lambda p: None})
    summary = extract_dataset(ExtractRequest(tmp_path, "toy", "colour", store_dtype="float32", **QUIET), num_workers=2)
    cached = load_cached(tmp_path, "toy", "colour")
    expected = [mean_colour(Image.open(tmp_path / "images" / p).convert("RGB")) for p in paths[:5]]
    np.testing.assert_allclose(cached.embeddings[:5], np.stack(expected), rtol=1e-6)
    assert summary.invalid == [("gone.png", "missing file")]
    assert cached.fingerprint["model_id"].endswith("mean_colour") and cached.fingerprint["resolution"] is None


DECODE = "PIL decode, EXIF transpose, 16-bit/grey/CMYK/palette to RGB, alpha on white; "
# Stores already on disk are valid only while these stay byte for byte (the weights, the manifest, the
# package versions and the dtypes are left out: they vary with what is extracted and where).
PINNED_FINGERPRINTS = {
    ("clip", "square"): dict(
        backbone="clip", dim=16, model_id="tiny:CLIPVisionModelWithProjection", pooling="image_embeds",
        preprocess="square", resample="bicubic", resolution=32, revision=None,
        preprocessing=DECODE + "resize 32x32 bicubic, no crop; /255; mean (0.48145466, 0.4578275, 0.40821073) "
                               "std (0.26862954, 0.26130258, 0.27577711)"),
    ("dinov2", "native"): dict(
        backbone="dinov2", dim=32, model_id="tiny:Dinov2Model", pooling="mean_patch", preprocess="native",
        resample="bicubic", resolution=32, revision=None,
        preprocessing=DECODE + "resize shortest side to 37 bicubic, centre crop 32x32; /255; mean (0.485, 0.456, 0.406) "
                               "std (0.229, 0.224, 0.225)"),
    ("nss", "square"): dict(
        backbone="nss", dim=36, model_id="iqa.extract.nss.nss_features", pooling="worker", preprocess="square",
        resample="bicubic", resolution=None, revision="brisque-live-v2",
        preprocessing=DECODE + "features computed in the decode worker at native size"),
}


@pytest.mark.parametrize("key, preprocess", list(PINNED_FINGERPRINTS))
def test_store_fingerprints_stay_what_existing_stores_hold(tmp_path, key, preprocess, one_thread):
    make_dataset(tmp_path, n=2)
    request = ExtractRequest(tmp_path, "toy", key, weights="tiny", preprocess=preprocess, dtype="float32", **QUIET)
    extract_dataset(request, num_workers=0)
    fingerprint = load_cached(tmp_path, "toy", key, tag="tiny").fingerprint
    for varying in ("weights_sha256", "manifest_sha256", "packages", "compute_dtype", "store_dtype"):
        fingerprint.pop(varying)
    assert fingerprint == PINNED_FINGERPRINTS[key, preprocess]


def test_extract_cli_refuses_bad_options_in_one_line(tmp_path):
    make_dataset(tmp_path, n=2)
    base = ["extract", "--backbone", "dinov3", "--dataset", "toy", "--weights", "tiny", "--cache", str(tmp_path)]
    for extra, message in [
        (["--shard", "1-2"], "--shard must look like i/n"),
        (["--shard", "2/2"], "shard must be i/n with 0 <= i < n"),
        (["--engine", "spark"], "--engine must be local or ray"),
        (["--actors", "2"], "--actors and --gpus-per-actor are for --engine ray"),
        (["--dtype", "int8"], "--dtype must be auto"),
    ]:
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "toy" / "dinov3@tiny.zarr").exists()  # nothing was written
