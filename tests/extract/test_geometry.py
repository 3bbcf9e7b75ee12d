"""Checkpoints of a registered family at their own geometry: tiny models saved to disk."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from typer.testing import CliRunner

from iqa.cli import app
from iqa.extract.backbones import BackboneLoadError, load_backbone
from iqa.extract.preprocess import resize_uint8
from iqa.extract.registry import get_spec
from helpers import bright_dataset, make_dataset

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)


def save(tmp_path, cls, name, **config):
    model = getattr(transformers, cls)._from_config(getattr(transformers, cls).config_class(**{**TINY, **config}))
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def extract_fingerprint(tmp_path, backbone, model_dir, *extra):
    result = CliRunner().invoke(app, ["extract", "--backbone", backbone, "--dataset", "toy", "--model", model_dir,
                                      "--cache", str(tmp_path), "--workers", "0", "--tag", model_dir[-8:], *extra])
    assert result.exit_code == 0, result.output
    store = next(tmp_path.glob(f"**/{backbone}@{model_dir[-8:]}.zarr"))
    return json.loads((store / "zarr.json").read_text())["attributes"]["fingerprint"]


@pytest.mark.parametrize("cls,backbone,config,resolution,dim", [
    *[("SiglipVisionModel", "siglip2", dict(image_size=s), s, 32) for s in (32, 48, 64)],
    *[("CLIPVisionModelWithProjection", "clip", dict(image_size=32, projection_dim=p), 32, p) for p in (16, 24)],
    ("Dinov2Model", "dinov2", dict(image_size=32, mlp_ratio=2), 520, 32),
    ("Dinov2Model", "dinov2", dict(image_size=64, mlp_ratio=2, hidden_size=48), 520, 48),
    ("DINOv3ViTModel", "dinov3-s", dict(num_register_tokens=4), 512, 32),
    ("DINOv3ViTModel", "dinov3-s", dict(num_register_tokens=0, hidden_size=48), 512, 48),
])
def test_extract_runs_at_the_checkpoints_own_geometry(tmp_path, cls, backbone, config, resolution, dim):
    make_dataset(tmp_path, n=2)
    fingerprint = extract_fingerprint(tmp_path, backbone, save(tmp_path, cls, f"{backbone}-{resolution}-{dim}", **config))
    assert (fingerprint["resolution"], fingerprint["dim"], fingerprint["preprocess"]) == (resolution, dim, "square")


def test_finetuning_runs_at_the_checkpoints_own_geometry(tmp_path):
    """A fixed-position checkpoint at 48 px fine-tunes at 48 px (the registry's 512 would not fit its positions)."""
    from iqa.heads.finetune.loop import finetune, finetune_config

    bright_dataset(tmp_path, n=20)
    source = save(tmp_path, "SiglipVisionModel", "siglip-48", image_size=48)
    config = finetune_config("bright", "siglip2", mode="frozen", epochs=1)
    run = finetune(tmp_path, config, "cpu", "float32", source, num_workers=0, progress=False)
    assert run.result.status == "done"
    from iqa.extract.checkpoint import load_checkpoint

    assert load_checkpoint(run.run_dir)["fingerprint"]["resolution"] == 48


def test_resolution_override_interpolates_fixed_positions(tmp_path):
    make_dataset(tmp_path, n=2)
    fingerprint = extract_fingerprint(tmp_path, "siglip2", save(tmp_path, "SiglipVisionModel", "siglip-32", image_size=32),
                                      "--resolution", "48", "--preprocess", "native")
    assert (fingerprint["resolution"], fingerprint["preprocess"], fingerprint["resample"]) == (48, "native", "bilinear")


def test_dinov2_rounds_an_override_to_the_patch_size():
    model = load_backbone(get_spec("dinov2", weights="tiny"), weights="tiny", resolution=45)
    assert model.spec.resolution == 48


def test_siglip2_naflex_checkpoint_is_refused_in_one_line(tmp_path):
    transformers.Siglip2VisionConfig(**TINY).save_pretrained(tmp_path / "naflex")
    with pytest.raises(BackboneLoadError, match="Siglip2VisionModel"):
        load_backbone(get_spec("siglip2"), source=str(tmp_path / "naflex"))


def test_native_preprocess_is_shortest_side_then_centre_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    spec = load_backbone(get_spec("dinov2", weights="tiny"), weights="tiny", preprocess="native").spec
    side = spec.shortest_side()
    assert side == round(32 * 256 / 224)
    by_hand = image.resize((round(70 * side / 30), side), Image.Resampling.BICUBIC)
    left, top = (by_hand.width - 32) // 2, (side - 32) // 2
    by_hand = np.asarray(by_hand.crop((left, top, left + 32, top + 32))).transpose(2, 0, 1)
    assert np.array_equal(resize_uint8(image, 32, spec.resample, side).numpy(), by_hand)


def test_perception_runs_offline_through_timm_with_its_cfg_normalisation():
    import torchvision_stub

    torchvision_stub.install()
    timm = pytest.importorskip("timm")
    spec = get_spec("perception")
    cfg = timm.models.get_pretrained_cfg("vit_pe_core_large_patch14_336.fb")
    assert (spec.mean, spec.std, spec.crop_pct) == (tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct)
    model = load_backbone(get_spec("perception", weights="tiny"), weights="tiny")
    assert len(model.model.model.blocks) == 2 and model.spec.resolution == 32  # the whole tower: --layers reaches past the tap
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


def test_perception_fingerprint_names_the_tapped_block():
    """The weights checksum covers the whole tower wherever it is tapped, so the pooling rule names the block."""
    from dataclasses import replace

    import torchvision_stub

    from iqa.extract.backbones import weights_sha256
    from iqa.extract.run import pooling_rule

    torchvision_stub.install()
    pytest.importorskip("timm")
    last = load_backbone(get_spec("perception", weights="tiny"), weights="tiny")
    first = load_backbone(replace(get_spec("perception", weights="tiny"), tap_block=0), weights="tiny")
    assert weights_sha256(last) == weights_sha256(first)
    assert (pooling_rule(last.spec), pooling_rule(first.spec)) == ("timm_tap:block1", "timm_tap:block0")
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(last(x), first(x))
