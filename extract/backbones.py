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
from pathlib import Path

import torch
import transformers
from torch import nn

from iqa.extract.registry import PERCEPTION_TAP_BLOCK, BackboneSpec

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


class PooledBackbone(nn.Module):
    """A vision tower plus its pooling rule; `source` and `revision` say where the weights came from."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, source: str, revision: str | None):
        super().__init__()
        self.model = model
        self.pooling = spec.pooling
        # DINOv2/v3: one CLS token, then the register tokens (DINOv3 has 4), then the patches.
        self.prefix_tokens = 1 + getattr(getattr(model, "config", None), "num_register_tokens", 0)
        self.source = source
        self.revision = revision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.pooling == "worker":
            return pixel_values.float()
        if self.pooling == "timm_tap":
            return self.model(pixel_values)
        return pool(self.model(pixel_values=pixel_values), self.pooling, self.prefix_tokens)


def model_tag(tiny: bool, random_init: bool) -> str | None:
    """The label of an untrained model, and its store's tag: a store's name must say that it holds
    no pretrained features (dinov2@tiny.zarr, never dinov2.zarr)."""
    return "tiny" if tiny else "random-init" if random_init else None


def load_backbone(
    spec: BackboneSpec, source: str | None = None, random_init: bool = False, tiny: bool = False
) -> PooledBackbone:
    if spec.features_in_worker is not None:
        fn = spec.features_in_worker
        return PooledBackbone(nn.Identity(), spec, f"{fn.__module__}.{fn.__qualname__}", spec.revision)
    if spec.pooling == "timm_tap":
        return _load_timm(spec, source, random_init or tiny)
    if spec.pooling == "cleandift":
        return _load_cleandift(spec, source, random_init, tiny)
    cls = getattr(transformers, spec.model_class)
    sdpa = {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}
    if tiny or random_init:
        config = cls.config_class(**(spec.tiny_config if tiny else spec.config))
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = cls._from_config(config, **sdpa)
        return PooledBackbone(model.eval(), spec, f"{model_tag(tiny, random_init)}:{spec.model_class}", None)
    source = source or spec.hf_id
    offline = Path(source).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        model = cls.from_pretrained(source, local_files_only=offline, dtype=torch.float32, **sdpa)
    except (OSError, ValueError) as err:
        raise BackboneLoadError(
            f"could not load {spec.key} weights from {source!r} ({str(err).splitlines()[0][:120]}); "
            f"download them where you can and pass the folder with --model /path/to/dir, or use --random-init"
        ) from None
    return PooledBackbone(model.eval(), spec, source, getattr(model.config, "_commit_hash", None))


def _load_cleandift(spec: BackboneSpec, source: str | None, random_init: bool, tiny: bool) -> nn.Module:
    from iqa.extract import cleandift

    if tiny or random_init:
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            return cleandift.build_cleandift(spec.tiny_config if tiny else spec.config,
                                             f"{model_tag(tiny, random_init)}:{spec.model_class}")
    if source is None or not Path(source).is_dir():
        raise BackboneLoadError("cleandift loads from a local SD-2.1 folder with the CleanDIFT UNet: pass --model DIR")
    return cleandift.load_cleandift(source).eval()


class _TimmTap(nn.Module):
    """Blocks up to the tapped one, then the model's own norm, attention pooling and projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.prune_intermediate_layers(indices=[PERCEPTION_TAP_BLOCK], prune_norm=False, prune_head=False)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x))


def _load_timm(spec: BackboneSpec, source: str | None, random_init: bool) -> PooledBackbone:
    try:
        import timm
    except ImportError:
        raise BackboneLoadError(
            f"the {spec.key} backbone loads through timm: `pip install timm torchvision` (matching your torch build)"
        ) from None
    source = source or spec.hf_id
    name = spec.hf_id.split("/", 1)[1]
    try:
        if Path(source).is_file():  # a local weights file
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": source})
        else:
            model = timm.create_model(f"hf-hub:{source}", pretrained=not random_init)
    except (OSError, RuntimeError) as err:
        raise BackboneLoadError(
            f"could not load {spec.key} weights from {source!r} ({str(err).splitlines()[0][:120]}); "
            f"pass a local weights file with --model /path/to/open_clip_model.safetensors"
        ) from None
    return PooledBackbone(_TimmTap(model).eval(), spec, source, None)


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
