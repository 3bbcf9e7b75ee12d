"""Grad-CAM on every backbone family with spatial features (tiny random-weight models): the tap leaves the
numbers alone and a real gradient reaches a map on the image (ViTs with CLS and registers, CNN stages,
Swin and PVT stages with neither and a shrunk grid, the timm Perception Encoder)."""

import pytest
import torch
import torchvision_stub

from iqa.extract.backbones import family_of, load_backbone
from iqa.extract.registry import BACKBONES, get_spec
from iqa.heads.explain.attribution import SpatialTap, attribute, score_target
from iqa.heads.models.mlp import StackedMLP

torchvision_stub.install()  # the Perception Encoder loads through timm, which imports torchvision


def one_key_per_family() -> list[str]:
    """The first registry key of each (family, model class) whose features are spatial."""
    chosen = {}
    for key, spec in BACKBONES.items():
        family = family_of(spec)
        if family.spatial:
            chosen.setdefault((getattr(family, "__name__", type(family).__name__), spec.model_class), key)
    return list(chosen.values())


def test_the_families_include_swin_and_the_other_hierarchical_models():
    assert {"swin-t", "pvt-v2-b0", "convnext-t", "resnet152", "dinov2", "clip"} <= set(one_key_per_family())


@pytest.mark.parametrize("key", one_key_per_family())
def test_gradcam_works_on_every_spatial_family(key, one_thread):
    # 128 px: the hierarchical models (stride 32) still end on a 4 x 4 grid, where a map can vary
    backbone = load_backbone(get_spec(key, weights="tiny"), weights="tiny", resolution=128)
    # HF's random init (std 0.02) shrinks the signal through a deep CNN without residuals (EfficientNet) until
    # it underflows to zero; Kaiming-scaled convolutions keep it, as trained weights do
    for module in backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, generator=torch.Generator().manual_seed(0))
    side = backbone.spec.resolution
    pixels = torch.randint(0, 256, (1, 3, side, side), dtype=torch.float32)
    with torch.no_grad():
        plain = backbone(pixels)
        with SpatialTap(backbone):
            tapped = backbone(pixels)
    assert torch.equal(plain, tapped)
    head = StackedMLP(plain.shape[1], [8])
    cam = attribute(backbone, score_target(head), pixels.to(torch.uint8))
    assert cam.shape == (1, side, side) and torch.isfinite(cam).all() and cam.std() > 0
