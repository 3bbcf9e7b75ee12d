import pytest
import torch

from iqa.extract.backbones import BackboneLoadError, load_backbone, weights_sha256
from iqa.extract.registry import BACKBONES, QK_LEGACY, QK_PROJ, get_spec, lora_target_modules

TINY_CLASSES = ["siglip2", "clip", "dinov2", "dinov3", "resnet152", "pvt-v2-b2", "efficientnet-b0", "mobilenet-v2"]
CONVOLUTIONAL = ("ResNetModel", "PvtV2Model", "EfficientNetModel", "MobileNetV2Model")  # no sdpa attention to ask for


def batch(resolution: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))


# What each pooling rule should give, written out from the model's raw outputs.
HAND_POOLING = {
    "siglip2": lambda out: out.pooler_output,
    "clip": lambda out: out.image_embeds,
    "dinov2": lambda out: out.last_hidden_state[:, 1:].mean(dim=1),  # skip CLS
    "dinov3": lambda out: out.last_hidden_state[:, 5:].mean(dim=1),  # skip CLS + 4 registers
    "resnet152": lambda out: out.pooler_output[:, :, 0, 0],
    "pvt-v2-b2": lambda out: out.last_hidden_state.mean(dim=(2, 3)),
    "efficientnet-b0": lambda out: out.last_hidden_state.mean(dim=(2, 3)),  # its head conv, averaged
    "mobilenet-v2": lambda out: out.last_hidden_state.mean(dim=(2, 3)),
}


@pytest.mark.parametrize("key", TINY_CLASSES)
def test_tiny_model_pools_by_the_registry_rule(key):
    spec = get_spec(key).as_tiny()
    backbone = load_backbone(spec, weights="tiny")
    x = batch(spec.resolution)
    with torch.no_grad():
        pooled = backbone(x)
        expected = HAND_POOLING[key](backbone.model(pixel_values=x))
    assert pooled.shape == (3, expected.shape[1])
    torch.testing.assert_close(pooled, expected)
    assert type(backbone.model).__name__ == spec.model_class
    if spec.model_class not in CONVOLUTIONAL:
        assert backbone.model.config._attn_implementation == "sdpa"


def test_dinov3_token_layout_is_cls_registers_then_patches():
    spec = get_spec("dinov3").as_tiny()
    backbone = load_backbone(spec, weights="tiny")
    with torch.no_grad():
        hidden = backbone.model(pixel_values=batch(spec.resolution)).last_hidden_state
    patches = (spec.resolution // spec.tiny_config["patch_size"]) ** 2
    assert hidden.shape[1] == 1 + 4 + patches


def test_tiny_and_random_init_weights_are_reproducible():
    spec = get_spec("dinov2")
    assert weights_sha256(load_backbone(spec, weights="tiny")) == weights_sha256(load_backbone(spec, weights="tiny"))
    small = get_spec("dinov3-s")
    model = load_backbone(small, weights="random-init")  # full-size ViT-S/16, no download
    assert sum(p.numel() for p in model.parameters()) > 20_000_000
    with torch.no_grad():
        assert model(batch(64, n=1)).shape == (1, small.dim)


@pytest.mark.parametrize("key, millions, stages", [  # published sizes less the 1000-class classifier
    ("pvt-v2-b0", 3.7 - 0.257, [32, 64, 160, 256]), ("efficientnet-b0", 5.3 - 1.281, [24, 40, 112, 320]),
    ("mobilenet-v2", 3.5 - 1.281, [24, 32, 96, 320]),
])
def test_full_size_life_iqa_configs_match_the_published_models(key, millions, stages, one_thread):
    model = load_backbone(get_spec(key), weights="random-init")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.05
    with torch.no_grad():
        assert model.layer_sizes(batch(224, n=1)) == [(w, w) for w in stages]  # the four stages' widths at strides 4-32, maps as wide


def test_local_directory_loads_offline(tmp_path):
    spec = get_spec("clip")
    tiny = load_backbone(spec, weights="tiny")
    tiny.model.save_pretrained(tmp_path)
    loaded = load_backbone(spec, source=str(tmp_path))
    assert loaded.source == str(tmp_path)
    assert weights_sha256(loaded) == weights_sha256(tiny)


def test_missing_weights_fail_in_one_line_naming_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(get_spec("siglip2"))
    message = str(err.value)
    assert "google/siglip2-so400m-patch16-512" in message and "with model /path/to/dir" in message and "\n" not in message
    from iqa.cli import message as cli_message

    assert "with --model /path/to/dir, or use --weights random-init" in cli_message(err.value)  # the command line names flags


@pytest.mark.skipif(__import__("importlib").util.find_spec("timm") is not None, reason="timm is installed here")
def test_perception_without_timm_says_what_to_install():
    with pytest.raises(BackboneLoadError, match="pip install timm torchvision"):
        load_backbone(get_spec("perception"))


def test_lora_targets_follow_either_naming():
    names = [n for n, _ in load_backbone(get_spec("dinov2"), weights="tiny").named_modules()]
    found = lora_target_modules(get_spec("dinov2"), names)
    assert found and all(n.endswith(("q_proj", "k_proj")) for n in found) and len(found) == 2 * 2  # 2 layers
    legacy = ["encoder.layer.0.attention.attention.query", "encoder.layer.0.attention.attention.key",
              "encoder.layer.0.attention.attention.value", "encoder.layer.0.attention.output.dense"]
    assert lora_target_modules(get_spec("dinov2"), legacy) == legacy[:2]
    assert get_spec("dinov2").lora_targets == (QK_PROJ, QK_LEGACY)
    resnet = [n for n, _ in load_backbone(get_spec("resnet152"), weights="tiny").named_modules()]
    convs = lora_target_modules(get_spec("resnet152"), resnet)
    assert len(convs) == 2 * 3 and not any("embedder" in n or "shortcut" in n for n in convs)


def test_every_neural_entry_has_configs_and_known_class():
    import transformers

    for spec in BACKBONES.values():
        if spec.model_class:  # cleandift's UNet is a diffusers class
            module = __import__("diffusers") if spec.pooling == "cleandift" else transformers
            assert hasattr(module, spec.model_class) and spec.config and spec.tiny_config, spec.key
