"""`--spatial S`: each stored layer's map, average-pooled to S x S, kept beside its pooled vector."""

import numpy as np
import pytest
import torch
from helpers import QUIET, iqa, make_dataset
from typer.testing import CliRunner

from iqa.cache.load import load_cached, load_layer, read_maps
from iqa.cache.store import EmbeddingStore, FingerprintMismatch, IncompleteStore, store_path
from iqa.cache.verify import verify_store
from iqa.cli import app
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.extract.run import ExtractRequest, extract_dataset
from test_layers import model_inputs, store_bytes

COMMON = dict(weights="tiny", dtype="float32", store_dtype="float32", chunk_rows=2, batch_size=2, **QUIET)


def maps_by_hand(key: str, x: torch.Tensor, side: int) -> list[np.ndarray]:
    """Each layer's map as torch's adaptive_avg_pool2d gives it, flattened position by position: Swin's stage
    maps (before patch merging); DINOv3's patch tokens (class and 4 register tokens left out, final norm on)
    laid out on their 4 x 4 grid."""
    model = load_backbone(get_spec(key, weights="tiny"), weights="tiny").model
    with torch.no_grad():
        if key == "swin-t":
            maps = model(pixel_values=x, output_hidden_states=True,
                         output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
        else:
            tokens = [model.norm(s)[:, 5:] for s in model(pixel_values=x, output_hidden_states=True).hidden_states[1:]]
            maps = [t.reshape(len(t), 4, 4, -1).permute(0, 3, 1, 2) for t in tokens]
        pooled = [torch.nn.functional.adaptive_avg_pool2d(m, side) for m in maps]
    return [p.permute(0, 2, 3, 1).reshape(len(p), -1).numpy() for p in pooled]


@pytest.mark.parametrize("key, side", [("swin-t", 3), ("dinov3-s", 2)])
def test_stored_maps_equal_the_stage_outputs_pooled_by_hand(tmp_path, key, side, one_thread):
    paths = make_dataset(tmp_path, n=3)
    plain = extract_dataset(ExtractRequest(tmp_path, "toy", key, layers="all", tag="plain", **COMMON), num_workers=0)
    assert extract_dataset(ExtractRequest(tmp_path, "toy", key, layers="all", spatial=side, **COMMON), num_workers=0).ok
    expected = maps_by_hand(key, model_inputs(get_spec(key, weights="tiny"), tmp_path / "images", paths), side)
    cached = load_cached(tmp_path, "toy", key, tag="tiny")
    layers = tuple(range(1, len(expected) + 1))
    maps = cached.select_layers(layers, spatial=side)
    np.testing.assert_allclose(maps.embeddings, np.concatenate(expected, axis=1), rtol=1e-4, atol=1e-5)
    assert maps.stages == tuple((n, e.shape[1] // side**2) for n, e in zip(layers, expected))
    store = EmbeddingStore(store_path(tmp_path, "toy", key, "tiny"))
    assert store.fingerprint["spatial"] == side and "spatial" not in EmbeddingStore(plain.store).fingerprint
    for n in layers:  # the pooled vectors are the store's without maps
        np.testing.assert_array_equal(load_layer(tmp_path, "toy", key, n, tag="tiny"),
                                      load_layer(tmp_path, "toy", key, n, tag="plain"))
    assert verify_store(store.path) == []
    listed = {line.split()[0]: line for line in iqa("cache", "ls", "--cache", tmp_path).stdout.splitlines()}
    all_layers = ",".join(map(str, layers))
    assert f"layers {all_layers} with {side} x {side} maps" in listed[f"toy/{key}@tiny.zarr"]
    assert f"layers {all_layers}  chunks" in listed[f"toy/{key}@plain.zarr"]


def test_maps_are_added_in_place_resume_after_a_kill_and_keep_every_key(tmp_path, monkeypatch, one_thread):
    make_dataset(tmp_path, n=6)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="2,1", **COMMON), num_workers=0)
    path = store_path(tmp_path, "toy", "swin-t", "tiny")
    before = store_bytes(path, ("embeddings", "status", "layer1", "layer2"))
    key_before = load_cached(tmp_path, "toy", "swin-t", tag="tiny").fingerprint_id
    with pytest.raises(ValueError, match=r"no 3 x 3 maps of layers \[2, 1\]; .*--layers 2,1 --spatial 3` adds them"):
        load_cached(tmp_path, "toy", "swin-t", tag="tiny").select_layers((2, 1), spatial=3)

    written, real = [], EmbeddingStore.write_layers

    def killed_after_one_chunk(self, chunk, rows):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(chunk)
        real(self, chunk, rows)

    monkeypatch.setattr(EmbeddingStore, "write_layers", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="2,1", spatial=3, **COMMON), num_workers=0)
    monkeypatch.undo()
    assert EmbeddingStore(path).extending == ["map2", "map1"] and any("2 of 3 chunks to go" in p for p in verify_store(path))
    with pytest.raises(IncompleteStore, match="still adding the map of layer 2"):
        read_maps(EmbeddingStore(path), (2,), 3)
    resumed = extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", **COMMON), num_workers=0)  # the store's maps
    assert resumed.rows_computed == 4 and verify_store(path) == []
    with pytest.raises(FingerprintMismatch, match="3 x 3 maps, now 2 x 2"):
        extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="1", spatial=2, **COMMON), num_workers=0)

    assert store_bytes(path, ("embeddings", "status", "layer1", "layer2")) == before
    assert load_cached(tmp_path, "toy", "swin-t", tag="tiny").fingerprint_id == key_before, "runs keep their keys"
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="2,1", spatial=3, tag="fresh", **COMMON), num_workers=0)
    for tag in ("tiny", "fresh"):  # a fresh store's fingerprint id is the one that grew maps in place
        assert EmbeddingStore(store_path(tmp_path, "toy", "swin-t", tag)).fingerprint["spatial"] == 3
    np.testing.assert_array_equal(load_cached(tmp_path, "toy", "swin-t", tag="tiny").select_layers((2, 1), 3).embeddings,
                                  load_cached(tmp_path, "toy", "swin-t", tag="fresh").select_layers((2, 1), 3).embeddings)

    (path / "map1" / "c" / "1" / "0").unlink()  # a lost chunk file of one map: found, named, recomputed
    assert any("map1: " in p and "chunk 1" in p for p in verify_store(path))
    repaired = extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", **COMMON), num_workers=0)
    assert repaired.rows_computed == 2 and verify_store(path) == []


@pytest.mark.parametrize("args, says", [
    (["--backbone", "nss", "--layers", "all", "--spatial", "7"], "nss is not one"),
    (["--backbone", "swin-t", "--layers", "all", "--spatial", "0"], "a positive whole number"),
    (["--backbone", "swin-t", "--spatial", "7"], "give --layers with it"),
])
def test_cli_spatial_without_maps_or_a_side_fails_in_one_line(tmp_path, args, says):
    make_dataset(tmp_path, n=2)
    result = CliRunner().invoke(app, ["extract", *args, "--dataset", "toy", "--weights", "tiny", "--cache", str(tmp_path),
                                      "--workers", "0"])
    assert result.exit_code != 0 and result.output.startswith("error:") and says in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
