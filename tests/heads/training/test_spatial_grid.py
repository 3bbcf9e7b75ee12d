"""`iqa head --layers ... --fuse smart --spatial S`: heads on a store's stage maps train in the cached grid."""

import numpy as np
import pytest
import torch

import iqa as iqa_module
from helpers import QUIET, iqa, toy_dataset

from iqa.cache.load import load_cached
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.saved.model import score_dataset
from iqa.heads.saved.weights import load_head, run_weights_path
from iqa.heads.training.config import RunConfig
from iqa.heads.training.grid import run_rows
from iqa.heads.training.grid_request import GridRequest, train_grid
from iqa.heads.training.metrics import srcc


def test_heads_on_maps_train_stacked_and_their_kept_weights_reproduce_the_recorded_srcc(tmp_path, one_thread):
    paths = toy_dataset(tmp_path, n=24)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", weights="tiny", dtype="float32", store_dtype="float32",
                                   chunk_rows=8, batch_size=8, layers="2,1", spatial=2, **QUIET), num_workers=0)
    request = GridRequest("swin-t", datasets=("toy",), heads=("hyper", "baseline"), seeds=(8, 19), epochs=2,
                          layers="2,1", fuse="smart", spatial=2, hyper_target="eq16", tag="tiny", dtype="float32")
    records = train_grid(request, tmp_path, "cpu", progress=False)
    maps = load_cached(tmp_path, "toy", "swin-t", tag="tiny").select_layers((2, 1), spatial=2)
    assert len(records) == 4 and {r["spatial"] for r in records} == {2}
    for record in records:
        assert record["status"] == "done", record
        head, _ = load_head(run_weights_path(tmp_path / "results.sqlite", record["key"]))
        _, test_rows = run_rows(RunConfig.from_dict(record), maps, maps)
        with torch.no_grad():
            pred = head(torch.as_tensor(maps.embeddings[test_rows])[None])
        stored = float(srcc(pred, torch.as_tensor(maps.manifest.targets[test_rows])[None])[0])
        assert stored == pytest.approx(record["best_srcc"], abs=1e-6)
        assert getattr(head.head, "positions", 1) == (4 if record["head"] == "hyper" else 1)  # eq16 reads every location
    assert np.isfinite([r["best_srcc"] for r in records]).all()

    # exported, the model computes the maps from the images and scores them as the head scored the stored ones
    for record in records:
        out = tmp_path / f"model-{record['head']}-{record['seed']}"
        assert iqa("export", record["key"], "--out", out, "--cache", tmp_path).exit_code == 0
        model = iqa_module.load_model(out)
        assert model.config.backbone.spatial == 2 and "2 x 2 maps" in (out / "README.md").read_text()
        head, _ = load_head(run_weights_path(tmp_path / "results.sqlite", record["key"]))
        with torch.no_grad():
            expected = head(torch.as_tensor(maps.embeddings[:6])[None])[0]
        assert torch.allclose(model.score([tmp_path / "images" / p for p in paths[:6]]), expected, atol=1e-5)
        scored, source = score_dataset(model, tmp_path, "toy", progress=False)  # `iqa score --dataset`: the store's maps
        assert source == "store" and np.allclose([s.score for s in scored[:6]], expected.numpy(), atol=1e-6)

    result = iqa("head", "--cached", "--backbone", "swin-t", "--tag", "tiny", "--dataset", "toy", "--seeds", "8",
                 "--epochs", "1", "--device", "cpu", "--cache", tmp_path, "--layers", "2,1", "--fuse", "smart", "--spatial", "3")
    assert result.exit_code != 0 and result.output.startswith("error:") and "Traceback" not in result.output
    assert "holds 2 x 2 maps, not 3 x 3" in result.output and "--layers 2,1 --spatial 3 --overwrite" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
