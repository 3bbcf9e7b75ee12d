"""`--layer-pool head`: each Perception layer pooled like the default embedding (Suppl. B.1, Fig. S5)."""

from dataclasses import replace

import pytest
import torch
import torchvision_stub
from helpers import timm_blocks_by_hand
from helpers import QUIET, make_dataset

from iqa.cache.store import FingerprintMismatch
from iqa.cache.load import load_cached
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.extract.run import ExtractRequest, extract_dataset

torchvision_stub.install()  # perception loads through timm, which imports torchvision


def test_each_layer_goes_through_the_default_embeddings_head(one_thread):
    """Tap on block 2 of 3: with head pooling, layer 2 is the default embedding and layers 1 and 3 are
    final norm -> attention pooling -> projection of their own blocks, computed by hand."""
    tiny = get_spec("perception", weights="tiny")
    backbone = load_backbone(replace(tiny, tiny_config=dict(tiny.tiny_config, depth=3), tap_block=1), weights="tiny")
    tower = backbone.model.model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blocks = timm_blocks_by_hand(tower, x)
    backbone.use_layer_pool("head")
    backbone.use_layers((3, 1, 2))
    with torch.no_grad():
        stored = backbone(x)
        by_hand = [tower.forward_head(tower.norm(blocks[n - 1])) for n in (3, 1, 2)]
    width = by_hand[0].shape[1]
    assert backbone.layer_sizes(x) == [(width, None)] * 3
    torch.testing.assert_close(stored[:, width:], torch.cat(by_hand, 1))
    torch.testing.assert_close(stored[:, -width:], stored[:, :width])  # layer 2 = block 2 through the head = the default


def test_head_pooling_is_recorded_in_the_fingerprint_and_only_for_the_timm_tower(tmp_path, one_thread):
    make_dataset(tmp_path, n=3)
    common = dict(weights="tiny", dtype="float32", store_dtype="float32", chunk_rows=2, **QUIET)
    extract_dataset(ExtractRequest(tmp_path, "toy", "perception", tag="tokens", layers="all", **common), num_workers=0)
    extract_dataset(ExtractRequest(tmp_path, "toy", "perception", tag="head", layers="all", layer_pool="head", **common),
                    num_workers=0)
    tokens, head = (load_cached(tmp_path, "toy", "perception", tag=t) for t in ("tokens", "head"))
    assert "layer_pool" not in tokens.fingerprint and head.fingerprint["layer_pool"] == "head"
    assert tokens.fingerprint_id != head.fingerprint_id  # layer runs on the two stores never share a key
    assert (tokens.embeddings == head.embeddings).all()  # the default embedding is the same
    with pytest.raises(FingerprintMismatch):  # a store pooled one way is not extended the other way
        extract_dataset(ExtractRequest(tmp_path, "toy", "perception", tag="head", layers="all", **common), num_workers=0)
    with pytest.raises(ValueError, match="timm tower"):
        extract_dataset(ExtractRequest(tmp_path, "toy", "dinov2", layers="all", layer_pool="head", **common), num_workers=0)
