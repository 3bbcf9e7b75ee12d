"""`--layers`: every block's (or stage's) pooled vector stored next to the default embedding, in one pass."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision_stub
from helpers import QUIET, make_dataset, timm_blocks_by_hand
from typer.testing import CliRunner

from iqa.cache.store import EmbeddingStore, FingerprintMismatch, IncompleteStore, store_path
from iqa.cache.load import load_cached, load_layer
from iqa.cache.verify import verify_store
from iqa.cli import app
from iqa.extract.backbones import load_backbone
from iqa.extract.preprocess import decode_image, normalise, resize_uint8
from iqa.extract.registry import get_spec
from iqa.extract.run import ExtractRequest, extract_dataset, parse_layers

TOKEN_MODELS = ["dinov2", "dinov3-s", "siglip2", "clip", "perception"]
STAGE_MODELS = ["resnet50", "swin-t", "convnext-t", "pvt-v2-b2", "efficientnet-b0", "mobilenet-v2"]
# Per-block `hidden_states` of the tiny models at 32 px, by hand: the stages are the last block at strides
# 4, 8, 16, 32 (EfficientNet's entry 0 is the stem, 1 its stride-2 block; PVTv2's four entries are its stages).
STAGE_BLOCKS = {"efficientnet-b0": [2, 3, 5, 7], "mobilenet-v2": [1, 4, 11, 15], "pvt-v2-b2": [0, 1, 2, 3]}

torchvision_stub.install()  # perception loads through timm, which imports torchvision


def model_inputs(spec, root, paths) -> torch.Tensor:
    """The images as the extraction loop feeds them: decoded, resized, normalised."""
    images = [resize_uint8(decode_image(root / p)[0], spec.resolution, spec.resample, spec.shortest_side()) for p in paths]
    return normalise(torch.stack(images), spec.mean, spec.std)


def mean_then_cls(tokens: torch.Tensor, prefix: int) -> np.ndarray:
    """The patch tokens' mean (prefix left out), then the class token (token 0) where there is one."""
    return torch.cat([tokens[:, prefix:].mean(dim=1), *([tokens[:, 0]] if prefix else [])], dim=1).numpy()


def layers_by_hand(key: str, x: torch.Tensor) -> list[np.ndarray]:
    """The model's own hidden states, pooled here: token models mean their patch tokens (CLS and
    registers left out, the final norm applied where the default embedding applies it) followed by
    the class token where they have one, stage models average each stage map (Swin's before its
    patch merging)."""
    spec = get_spec(key, weights="tiny")
    model = load_backbone(spec, weights="tiny").model
    if key == "perception":  # each block's patch-token mean, then its class token, no norm
        return [mean_then_cls(s, 1) for s in timm_blocks_by_hand(model.model, x)]
    with torch.no_grad():
        if key.startswith("swin"):
            maps = model(pixel_values=x, output_hidden_states=True,
                         output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
            return [m.mean(dim=(2, 3)).numpy() for m in maps]
        if key in STAGE_BLOCKS:
            states = model(pixel_values=x, output_hidden_states=True).hidden_states
            return [states[i].mean(dim=(2, 3)).numpy() for i in STAGE_BLOCKS[key]]
        states = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        if key in STAGE_MODELS:
            return [m.mean(dim=(2, 3)).numpy() for m in states]
        prefix = {"siglip2": 0, "clip": 1, "dinov2": 1, "dinov3-s": 5}[key]
        norm = getattr(model, {"dinov2": "layernorm", "dinov3-s": "norm"}.get(key, ""), torch.nn.Identity())
        return [mean_then_cls(norm(s), prefix) for s in states]


@pytest.mark.parametrize("key", TOKEN_MODELS + STAGE_MODELS)
def test_stored_layers_equal_the_models_hidden_states_pooled_by_hand(tmp_path, key, one_thread):
    paths = make_dataset(tmp_path, n=3)
    request = ExtractRequest(tmp_path, "toy", key, weights="tiny", dtype="float32", store_dtype="float32", chunk_rows=2,
                             batch_size=2, layers="all", **QUIET)
    assert extract_dataset(request, num_workers=0).ok
    x = model_inputs(get_spec(key, weights="tiny"), tmp_path / "images", paths)
    expected = layers_by_hand(key, x)
    store = EmbeddingStore(store_path(tmp_path, "toy", key, "tiny"))
    assert store.fingerprint["layers"] == list(range(1, len(expected) + 1)) and len(expected) >= 2
    assert key not in STAGE_BLOCKS or len(expected) == 4
    for n, vectors in enumerate(expected, start=1):
        np.testing.assert_allclose(load_layer(tmp_path, "toy", key, n, tag="tiny"), vectors, rtol=1e-4, atol=1e-5)
    default = load_cached(tmp_path, "toy", key, tag="tiny").embeddings
    if key in ("dinov2", "dinov3-s", "resnet50", "pvt-v2-b2"):  # mean-pooled defaults: the last layer starts with the embedding
        last = load_layer(tmp_path, "toy", key, len(expected), tag="tiny")
        np.testing.assert_allclose(last[:, : default.shape[1]], default, rtol=1e-4, atol=1e-5)
    if key == "perception":  # the tiny tower's tap is its last block: the default embedding is timm's own forward
        with torch.no_grad():
            np.testing.assert_allclose(default, load_backbone(get_spec(key, weights="tiny"), weights="tiny").model.model(x).numpy(),
                                       rtol=1e-4, atol=1e-7)


def test_perception_layers_reach_past_the_tap_and_the_default_stays_timms_head_on_the_tap(one_thread):
    """With the tap on block 1 of 3, `--layers 3,1` still gives the default embedding of a tower cut after
    the tap (norm, attention pooling, projection), then blocks 3 and 1 pooled (patch mean, class token)."""
    tiny = get_spec("perception", weights="tiny")
    spec = replace(tiny, tiny_config=dict(tiny.tiny_config, depth=3), tap_block=0)
    backbone = load_backbone(spec, weights="tiny")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cut = copy.deepcopy(backbone.model.model)
    cut.prune_intermediate_layers(indices=[0], prune_norm=False, prune_head=False)
    blocks = timm_blocks_by_hand(backbone.model.model, x)
    with torch.no_grad():
        default, tapped = backbone(x), cut(x)
        backbone.use_layers((3, 1))
        layered = backbone(x)
    assert len(cut.blocks) == 1 and len(backbone.model.model.blocks) == 3
    assert torch.equal(default, tapped) and torch.equal(layered[:, :16], tapped)
    pooled = [torch.cat([b[:, 1:].mean(1), b[:, 0]], 1) for b in (blocks[2], blocks[0])]  # patch mean, then CLS
    torch.testing.assert_close(layered[:, 16:], torch.cat(pooled, 1))
    assert backbone.layer_sizes(x) == [(64, None)] * 3  # width 32: the mean and the class token; no maps


def test_layer_list_keeps_the_default_embedding_and_only_named_layers(tmp_path, one_thread):
    make_dataset(tmp_path, n=3)
    common = dict(weights="tiny", dtype="float32", store_dtype="float32", chunk_rows=2, **QUIET)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", tag="plain", **common), num_workers=0)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="2,1", **common), num_workers=0)
    plain, layered = load_cached(tmp_path, "toy", "swin-t", tag="plain"), load_cached(tmp_path, "toy", "swin-t", tag="tiny")
    np.testing.assert_array_equal(plain.embeddings, layered.embeddings)
    assert "layers" not in plain.fingerprint and layered.fingerprint["layers"] == [2, 1]
    assert EmbeddingStore(store_path(tmp_path, "toy", "swin-t", "tiny")).layer_dims == {2: 16, 1: 8}


def store_bytes(store, arrays=("embeddings", "status", "reasons", "image_stamps", "keys")) -> dict[str, bytes]:
    """Every chunk file of the named arrays, as stored on disk."""
    return {str(f.relative_to(store)): f.read_bytes() for a in arrays for f in sorted((store / a).rglob("*")) if f.is_file()}


def test_a_store_gains_layers_in_place_resumes_after_a_kill_and_equals_a_fresh_one(tmp_path, monkeypatch, one_thread):
    make_dataset(tmp_path, n=6)
    common = dict(weights="tiny", dtype="float32", chunk_rows=2, batch_size=2, **QUIET)
    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", **common), num_workers=0)
    path = store_path(tmp_path, "toy", "swin-t", "tiny")
    before, key_before = store_bytes(path), load_cached(tmp_path, "toy", "swin-t", tag="tiny").fingerprint_id

    written, real = [], EmbeddingStore.write_layers

    def killed_after_one_chunk(self, chunk, rows):
        if written:
            raise KeyboardInterrupt("killed")  # what a kill leaves: the chunks written so far
        written.append(chunk)
        real(self, chunk, rows)

    monkeypatch.setattr(EmbeddingStore, "write_layers", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="2", **common), num_workers=0)
    monkeypatch.undo()
    assert EmbeddingStore(path).extending == [2] and any("2 of 3 chunks to go" in p for p in verify_store(path))
    with pytest.raises(IncompleteStore, match="still adding layer 2"):
        load_layer(tmp_path, "toy", "swin-t", 2, tag="tiny")
    with pytest.raises(FingerprintMismatch, match="still adding layers"):  # one extension at a time
        extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="all", **common), num_workers=0)
    assert load_cached(tmp_path, "toy", "swin-t", tag="tiny").fingerprint_id == key_before  # embeddings serve meanwhile

    resumed = extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", **common), num_workers=0)  # no --layers: resumes
    assert resumed.rows_computed == 4 and resumed.chunks_written == 2
    again = extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="all", **common), num_workers=0)
    assert again.rows_computed == 6 and verify_store(path) == []
    store = EmbeddingStore(path)
    assert store.fingerprint["layers"] == [2, 1] and not store.extending and "extension_done" not in store.group
    assert store_bytes(path) == before, "the stored embeddings, statuses and stamps are not rewritten"
    assert load_cached(tmp_path, "toy", "swin-t", tag="tiny").fingerprint_id == key_before, "runs on embeddings keep their keys"

    extract_dataset(ExtractRequest(tmp_path, "toy", "swin-t", layers="all", tag="fresh", **common), num_workers=0)
    for n in (1, 2):
        np.testing.assert_array_equal(load_layer(tmp_path, "toy", "swin-t", n, tag="tiny"),
                                      load_layer(tmp_path, "toy", "swin-t", n, tag="fresh"))
    with pytest.raises(ValueError, match=r"not \[3\]"):
        load_layer(tmp_path, "toy", "swin-t", 3, tag="tiny")


def test_layers_are_not_added_to_a_store_whose_embeddings_the_model_does_not_give(tmp_path, one_thread):
    paths = make_dataset(tmp_path, n=4)
    common = dict(weights="tiny", dtype="float32", chunk_rows=2, **QUIET)
    extract_dataset(ExtractRequest(tmp_path, "toy", "resnet50", **common), num_workers=0)
    store = EmbeddingStore(store_path(tmp_path, "toy", "resnet50", "tiny"), mode="r+")
    store.embeddings[3] = store.embeddings[3][::-1]  # finite, so not damage: numbers some other model gave
    with pytest.raises(FingerprintMismatch, match=f"gives {paths[3]} a default embedding .* --overwrite"):
        extract_dataset(ExtractRequest(tmp_path, "toy", "resnet50", layers="all", **common), num_workers=0)
    summary = extract_dataset(ExtractRequest(tmp_path, "toy", "resnet50", layers="all", overwrite=True, **common),
                              num_workers=0)
    assert summary.rows_computed == 4 and load_layer(tmp_path, "toy", "resnet50", 2, tag="tiny").shape == (4, 16)


def test_parse_layers_counts_from_one():
    assert parse_layers("all", 3) == [1, 2, 3] and parse_layers("4,3,4", 4) == [4, 3]
    for bad in ("0", "5", "x"):
        with pytest.raises(ValueError, match="^layers"):
            parse_layers(bad, 4)


def test_cli_bad_layers_and_layerless_backbones_fail_in_one_line(tmp_path):
    make_dataset(tmp_path, n=2)
    for backbone, layers, says in [("dinov2", "9", "layers 1..2"), ("nss", "all", "no layer taps")]:
        result = CliRunner().invoke(app, ["extract", "--backbone", backbone, "--dataset", "toy", "--weights", "tiny", "--layers",
                                          layers, "--cache", str(tmp_path), "--workers", "0"])
        assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output, result.output


def test_layers_pooled_by_an_earlier_rule_are_refused_and_layer_runs_are_keyed_by_the_rule(tmp_path, one_thread):
    from iqa.cache.store import LAYER_POOLING, StaleStore
    from iqa.heads.training.config import RunConfig

    make_dataset(tmp_path, n=3)
    request = ExtractRequest(tmp_path, "toy", "dinov2", weights="tiny", dtype="float32", layers="1", **QUIET)
    assert extract_dataset(request, num_workers=0).ok
    store = EmbeddingStore(store_path(tmp_path, "toy", "dinov2", "tiny"), mode="r+")
    assert store.group.attrs["layer_pooling"] == LAYER_POOLING
    del store.group.attrs["layer_pooling"]  # as a store written before the class token joined the layers
    problems = verify_store(store_path(tmp_path, "toy", "dinov2", "tiny"))
    assert [p for p in problems if p.startswith("stale: holds layers pooled by an earlier rule")], problems
    with pytest.raises(StaleStore, match=r"pooled by an earlier rule \(patch-token mean alone\).*--overwrite"):
        load_layer(tmp_path, "toy", "dinov2", 1, tag="tiny")
    with pytest.raises(StaleStore, match="earlier rule"):  # nor are new layers added beside old-rule ones
        extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", weights="tiny", dtype="float32", layers="2", **QUIET),
                        num_workers=0)
    assert load_cached(tmp_path, "toy", "dinov2", tag="tiny").embeddings.shape[0] == 3  # the default embedding still reads
    plain = RunConfig("toy", "toy", "dinov2", "baseline", "lrelu", "lrelu", 8)
    assert "layer_pooling" not in plain.recipe() and replace(plain, layers=(1,)).recipe()["layer_pooling"] == LAYER_POOLING
