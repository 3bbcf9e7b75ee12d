"""Loading a backbone: a module mapping a normalised batch [B, 3, H, W] to pooled embeddings [B, D].

Weights come from the registry's Hugging Face id, from `source` (another id or a local
directory, read offline), or nowhere: `random_init` builds the full-size architecture from the
registry's config and `tiny` a tiny model of the same class (both seeded, so every process
builds the same weights). Worker entries load as the identity: their batch already holds the
features computed in the decode workers.
"""

import hashlib
import os
import threading
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from torch import nn

from iqa.extract.registry import BackboneSpec
from iqa.extract.timm_tower import TimmTap

INIT_SEED = 0
_INIT_LOCK = threading.Lock()  # seeded init uses the global RNG: one build at a time per process


class BackboneLoadError(RuntimeError):
    """Weights could not be loaded; the message is one line meant for the user."""


def pool(outputs, pooling: str, prefix_tokens: int) -> torch.Tensor:
    """The registry's pooling rule applied to a transformers model output."""
    if pooling == "pooler_output":
        return outputs.pooler_output.flatten(1)  # ResNet's is [B, C, 1, 1]
    if pooling == "image_embeds":
        return outputs.image_embeds
    if pooling == "mean_patch":  # patch tokens only: skip CLS and any register tokens
        return outputs.last_hidden_state[:, prefix_tokens:].mean(dim=1)
    raise ValueError(f"unknown pooling rule {pooling!r}")


def layer_states(outputs) -> tuple[torch.Tensor, ...]:
    """Each block's (or stage's) output, the embedding layer left out: entry n-1 is layer n.

    Swin's `reshaped_hidden_states` are its stage maps [B, C, H, W] (taken before the patch
    merging that starts the next stage); ResNet and ConvNeXt give maps in `hidden_states` too."""
    states = getattr(outputs, "reshaped_hidden_states", None) or outputs.hidden_states
    return tuple(states[1:])


def pool_layer(state: torch.Tensor, prefix_tokens: int, norm: nn.Module | None) -> torch.Tensor:
    """A stage map [B, C, H, W] -> its global average; tokens [B, T, D] -> the mean over patch
    tokens (prefix left out, as `mean_patch` does) after the model's own final norm, if any."""
    if state.dim() == 4:
        return state.mean(dim=(2, 3))
    if norm is not None:
        state = norm(state)
    return state[:, prefix_tokens:].mean(dim=1)


class PooledBackbone(nn.Module):
    """A vision tower plus its pooling rule; `source` and `revision` say where the weights came from,
    `spec` is the registry entry with the loaded checkpoint's resolution and width (`checkpoint_spec`).

    With `layers` set (`use_layers`), forward returns the default embedding followed by each
    named layer's pooled vector (layers counted from 1), concatenated: one pass gives them all."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, source: str, revision: str | None,
                 resolution: int | None = None, preprocess: str = "square"):
        super().__init__()
        self.model = model
        self.pooling = spec.pooling
        self.spec, self.interpolate = checkpoint_spec(spec, model, resolution, preprocess)
        # DINOv2/v3: one CLS token, then the register tokens (DINOv3 has 4), then the patches.
        self.prefix_tokens = int(spec.class_token) + getattr(getattr(model, "config", None), "num_register_tokens", 0)
        self.source = source
        self.revision = revision
        self.layers: tuple[int, ...] = ()

    def _outputs(self, pixel_values: torch.Tensor, hidden: bool):
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if hidden:
            extra["output_hidden_states"] = True
            if getattr(self.model.config, "model_type", "") == "swin":
                extra["output_hidden_states_before_downsampling"] = True  # a stage's own map, not the merged one
        return self.model(pixel_values=pixel_values, **extra)

    def layer_widths(self, pixel_values: torch.Tensor) -> list[int]:
        """The width of every layer's pooled vector (one probe pass); its length is the layer count."""
        if self.pooling == "timm_tap":
            return self.model.layer_widths()
        if self.pooling not in ("pooler_output", "image_embeds", "mean_patch"):
            raise ValueError(f"--layers works for transformers and timm backbones; {self.spec.key} has no layer taps")
        with torch.inference_mode():
            return [pool_layer(s, self.prefix_tokens, None).shape[1]
                    for s in layer_states(self._outputs(pixel_values, hidden=True))]

    def use_layers(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.pooling == "worker":
            return pixel_values.float()
        if self.pooling == "timm_tap":
            return self.model(pixel_values, self.layers)
        outputs = self._outputs(pixel_values, hidden=bool(self.layers))
        pooled = pool(outputs, self.pooling, self.prefix_tokens)
        if not self.layers:
            return pooled
        states = layer_states(outputs)
        norm = getattr(self.model, self.spec.layer_norm) if self.spec.layer_norm else None
        return torch.cat([pooled, *(pool_layer(states[n - 1], self.prefix_tokens, norm) for n in self.layers)], dim=1)


def checkpoint_spec(spec: BackboneSpec, model: nn.Module, resolution: int | None,
                    preprocess: str) -> tuple[BackboneSpec, bool]:
    """(the spec at the checkpoint's geometry, whether position embeddings are interpolated).

    Fixed position embeddings (SigLIP, CLIP, Perception) run at the checkpoint's own image size;
    rotary/interpolating models (DINOv2, DINOv3, ResNet) at the registry's resolution rounded to
    the patch size. `resolution` overrides either. Width comes from the loaded config."""
    if preprocess not in ("square", "native"):
        raise ValueError(f"--preprocess must be square or native, got {preprocess!r}")
    if spec.features_in_worker is not None:
        return spec, False
    if spec.pooling == "timm_tap":
        native, patch, dim = model.model.patch_embed.img_size[0], model.model.patch_embed.patch_size[0], spec.dim
    else:
        config = model.config
        native, patch = getattr(config, "image_size", None), getattr(config, "patch_size", 1)
        dim = (config.projection_dim if spec.pooling == "image_embeds"
               else config.hidden_sizes[-1] if hasattr(config, "hidden_sizes") else config.hidden_size)
    if resolution is not None and resolution < patch:
        raise ValueError(f"--resolution must be at least the patch size {patch}, got {resolution}")
    if spec.fixed_positions:
        side = resolution or native
    else:
        side = max(patch, round((resolution or spec.resolution) / patch) * patch)
    interpolate = spec.fixed_positions and side != native
    return replace(spec, resolution=side, dim=dim, preprocess=preprocess), interpolate


def model_tag(tiny: bool, random_init: bool) -> str | None:
    """The label of an untrained model, and its store's tag: a store's name must say that it holds
    no pretrained features (dinov2@tiny.zarr, never dinov2.zarr)."""
    return "tiny" if tiny else "random-init" if random_init else None


def load_backbone(
    spec: BackboneSpec, source: str | None = None, random_init: bool = False, tiny: bool = False,
    resolution: int | None = None, preprocess: str = "square",
) -> PooledBackbone:
    """The backbone of `spec`; `resolution` overrides the checkpoint's input side, `preprocess` is
    "square" (whole image) or "native" (shortest side, centre crop); both land in `.spec`."""
    geometry = dict(resolution=resolution, preprocess=preprocess)
    if spec.features_in_worker is not None:
        fn = spec.features_in_worker
        return PooledBackbone(nn.Identity(), spec, f"{fn.__module__}.{fn.__qualname__}", spec.revision, **geometry)
    if spec.pooling == "timm_tap":
        return _load_timm(spec, source, random_init, tiny, **geometry)
    if spec.pooling == "cleandift":
        return _load_cleandift(spec, source, random_init, tiny, **geometry)
    cls = getattr(transformers, spec.model_class)
    sdpa = {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}
    if tiny or random_init:
        config = cls.config_class(**(spec.tiny_config if tiny else spec.config))
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = cls._from_config(config, **sdpa)
        return PooledBackbone(model.eval(), spec, f"{model_tag(tiny, random_init)}:{spec.model_class}", None, **geometry)
    source = source or spec.hf_id
    offline = Path(source).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(source, local_files_only=offline)
        if str(config.get("model_type", "")).startswith("siglip2"):
            raise BackboneLoadError(
                f"{source!r} is a SigLIP2 NaFlex checkpoint (model_type siglip2): it needs a registry entry "
                f"with model_class Siglip2VisionModel (variable-size patches), not {spec.model_class}"
            )
        model = cls.from_pretrained(source, local_files_only=offline, dtype=torch.float32, **sdpa)
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, BackboneLoadError):
            raise

        raise BackboneLoadError(
            f"could not load {spec.key} weights from {source!r} ({str(err).splitlines()[0][:120]}); "
            f"download them where you can and pass the folder with --model /path/to/dir, or use --random-init"
        ) from None
    return PooledBackbone(model.eval(), spec, source, getattr(model.config, "_commit_hash", None), **geometry)


def _load_cleandift(spec: BackboneSpec, source: str | None, random_init: bool, tiny: bool,
                    resolution: int | None, preprocess: str) -> nn.Module:
    """The diffusion feature extractor; it takes any input side divisible by 64 (VAE x UNet strides)."""
    from iqa.extract import cleandift

    if preprocess not in ("square", "native"):
        raise ValueError(f"--preprocess must be square or native, got {preprocess!r}")
    if tiny or random_init:
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = cleandift.build_cleandift(spec.tiny_config if tiny else spec.config,
                                              f"{model_tag(tiny, random_init)}:{spec.model_class}")
    elif source is None or not Path(source).is_dir():
        raise BackboneLoadError("cleandift loads from a local SD-2.1 folder with the CleanDIFT UNet: pass --model DIR")
    else:
        model = cleandift.load_cleandift(source).eval()
    model.spec = replace(spec, resolution=resolution or spec.resolution, preprocess=preprocess)
    return model


def _load_timm(spec: BackboneSpec, source: str | None, random_init: bool, tiny: bool,
               resolution: int | None, preprocess: str) -> PooledBackbone:
    try:
        import timm
    except ImportError:
        raise BackboneLoadError(
            f"the {spec.key} backbone loads through timm: `pip install 'iqa[perception]' torchvision` "
            f"(torchvision matching your torch build)"
        ) from None
    size = {"img_size": resolution} if resolution else {}  # timm resamples the position grid on load
    source = None if tiny or random_init else source or spec.hf_id
    try:
        if source is None:  # by architecture name: no network
            with _INIT_LOCK, torch.random.fork_rng(devices=[]):
                torch.manual_seed(INIT_SEED)
                model = timm.create_model(spec.timm_name, pretrained=False, **{**(spec.tiny_config if tiny else {}), **size})
            source = f"{model_tag(tiny, random_init)}:{spec.timm_name}"
        elif Path(source).is_file():  # a local weights file
            model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": source}, **size)
        else:
            model = timm.create_model(f"hf-hub:{source}", pretrained=True, **size)
    except (OSError, RuntimeError, ValueError) as err:
        raise BackboneLoadError(
            f"could not load {spec.key} weights from {source!r} ({str(err).splitlines()[0][:120]}); "
            f"pass a local weights file with --model /path/to/open_clip_model.safetensors"
        ) from None
    return PooledBackbone(TimmTap(model, spec.tap_block).eval(), spec, source, None,
                          resolution=resolution, preprocess=preprocess)


def weights_sha256(module: nn.Module) -> str:
    """Checksum of every parameter and buffer, by name: the same weights give the same sum from any source."""
    return state_sha256(module.state_dict())


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Checksum of named tensors (a state dict), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
