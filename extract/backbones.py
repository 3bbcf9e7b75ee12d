"""Loading a backbone: a module mapping a normalised batch [B, 3, H, W] to pooled embeddings [B, D].

A registry entry says what a backbone is (architecture, weights, input recipe); its family, named
by the entry's pooling rule (`family_of`), says how that kind of backbone loads and how its
features are taken. Callers ask the family (`in_worker`, `spatial`, `tunable`, `layer_taps`, `layer_maps`)
instead of branching on the entry's kind:

| family | pooling rule | loads | features |
|---|---|---|---|
| `VisionTower` | pooler_output, image_embeds, mean_patch, mean_map | a transformers vision tower | its output pooled by the rule (`pool`); `--layers` taps |
| `TimmTapped` | timm_tap | a timm model by architecture name | one block's output through the model's own head; `--layers` taps |
| `WorkerFeatures` | worker | nothing (the identity) | computed from the decoded image in the decode workers |
| `CleanDift` | cleandift | SD-2.1 through diffusers (extract/cleandift.py) | pooled UNet decoder taps |

`weights` (extract/registry.py's WEIGHTS) says where the weights come from: `pretrained`, from the
registry's Hugging Face id or from `source` (another id or a local directory, read offline), or
nowhere: `random-init` builds the full-size architecture from the registry's config and `tiny` a
tiny model of the same class (both seeded, so every process builds the same weights).
"""

import hashlib
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from torch import nn

from iqa.extract.errors import BackboneLoadError
from iqa.extract.registry import BackboneSpec, check_weights, random_source
from iqa.extract.timm_tower import TimmTap
from iqa.errors import IqaError, SettingError

INIT_SEED = 0
_INIT_LOCK = threading.Lock()  # seeded init uses the global RNG: one build at a time per process


@contextmanager
def seeded_init():
    """Random weights that are the same in every process: a fixed seed, the caller's RNG left as it was. The
    seed is torch's global generator's, so nothing may draw from it in another thread meanwhile: iqa's own
    loaders draw from generators of their own."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        yield


def pool(outputs, pooling: str, prefix_tokens: int) -> torch.Tensor:
    """The registry's pooling rule applied to a transformers model output."""
    if pooling == "pooler_output":
        return outputs.pooler_output.flatten(1)  # ResNet's is [B, C, 1, 1]
    if pooling == "image_embeds":
        return outputs.image_embeds
    if pooling == "mean_patch":  # patch tokens only: skip CLS and any register tokens
        return outputs.last_hidden_state[:, prefix_tokens:].mean(dim=1)
    if pooling == "mean_map":  # a last stage map [B, C, H, W] (PVTv2 has no pooler): its global average
        return outputs.last_hidden_state.mean(dim=(2, 3))
    raise ValueError(f"unknown pooling rule {pooling!r}")


def layer_states(outputs, stage_side: int | None = None) -> tuple[torch.Tensor, ...]:
    """Each block's (or stage's) output, the embedding layer left out: entry n-1 is layer n.

    Swin's `reshaped_hidden_states` are its stage maps [B, C, H, W] (taken before the patch
    merging that starts the next stage); ResNet and ConvNeXt give maps in `hidden_states` too.
    With `stage_side` (the input's side; `BackboneSpec.stride_stages`), the states are per block
    (EfficientNet, MobileNetV2) or per stage without an embedding entry (PVTv2), and a stage is the
    last map at each resolution from stride 4 on (strides 4, 8, 16, 32: the feature pyramid
    detectors and Life-IQA take); stride-2 maps are the stem's."""
    states = getattr(outputs, "reshaped_hidden_states", None) or outputs.hidden_states
    if stage_side is None:
        return tuple(states[1:])
    last = [i + 1 == len(states) or states[i + 1].shape[-1] != s.shape[-1] for i, s in enumerate(states)]
    return tuple(s for s, end in zip(states, last) if end and s.shape[-1] * 3 <= stage_side)


def pool_layer(state: torch.Tensor, prefix_tokens: int, norm: nn.Module | None, class_token: bool = False) -> torch.Tensor:
    """A stage map [B, C, H, W] -> its global average; tokens [B, T, D] -> the mean over patch tokens
    (prefix left out, as `mean_patch` does) after the model's own final norm, if any, followed by the
    class token where the model has one ([B, 2D]: DINOv2's linear-probe feature; the mean comes first,
    so a mean-pooled model's last layer starts with its default embedding). The rule is
    cache.store.LAYER_POOLING: change both together."""
    if state.dim() == 4:
        return state.mean(dim=(2, 3))
    if norm is not None:
        state = norm(state)
    mean = state[:, prefix_tokens:].mean(dim=1)
    return torch.cat([mean, state[:, 0]], dim=1) if class_token else mean


def layer_map(state: torch.Tensor, prefix_tokens: int, norm: nn.Module | None, side: int) -> torch.Tensor:
    """A stage map [B, C, H, W], or tokens [B, T, D] as their patch grid (prefix left out, after the final
    norm, as `pool_layer` takes them), average-pooled to side x side (adaptive_avg_pool2d) -> [B, side*side*C],
    the positions row-major, each position's channels together (the store's `map<n>` rows). Its average
    over positions is `pool_layer`'s mean where side divides the grid."""
    if state.dim() == 3:
        if norm is not None:
            state = norm(state)
        patches = state[:, prefix_tokens:]
        grid = math.isqrt(patches.shape[1])
        if grid * grid != patches.shape[1]:
            raise SettingError(f"`spatial` needs a square patch grid; this layer has {patches.shape[1]} patch tokens")
        state = patches.transpose(1, 2).reshape(len(patches), -1, grid, grid)
    return nn.functional.adaptive_avg_pool2d(state, side).flatten(2).transpose(1, 2).flatten(1)


class Family:
    """What callers ask of a kind of backbone without loading one; `load` builds one."""

    in_worker = False  # features computed on the CPU from the decoded image, in the decode workers: no network
    spatial = True  # a spatial feature map Grad-CAM can take
    tunable = True  # weights LoRA or full fine-tuning can train
    layer_taps = False  # per-block outputs `--layers` can store
    layer_maps = False  # and their spatial maps `--spatial` can store

    @classmethod
    def load(cls, spec: BackboneSpec, source: str | None, weights: str,
             resolution: int | None, preprocess: str) -> nn.Module:
        """The backbone with `.spec` at the loaded checkpoint's geometry, `.source` and `.revision`."""
        raise NotImplementedError

    @classmethod
    def parameters_used(cls, model: nn.Module) -> int:
        """The parameters the default embedding's forward pass reads (Table S5's count): all of them."""
        return sum(p.numel() for p in model.parameters())


def check_preprocess(preprocess: str) -> str:
    if preprocess not in ("square", "native"):
        raise SettingError(f"`preprocess` must be square or native, got {preprocess!r}")
    return preprocess


class PooledBackbone(Family, nn.Module):
    """One loaded model and its family's pooling; `source` and `revision` say where the weights came from,
    `spec` is the registry entry with the loaded checkpoint's resolution and width (`at_checkpoint`)."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, source: str, revision: str | None,
                 resolution: int | None = None, preprocess: str = "square"):
        super().__init__()
        self.model = model
        self.checkpoint_side = None  # set by at_checkpoint where the checkpoint's own side is not the one run
        self.spec, self.interpolate = self.at_checkpoint(spec, resolution, check_preprocess(preprocess))
        if random_source(source):  # built from the registry's own config
            self.checkpoint_side = None
        self.source = source
        self.revision = revision

    def geometry(self, spec: BackboneSpec) -> tuple[int | None, int, int]:
        """(the checkpoint's own input side, if fixed; its patch size; its embedding width)."""
        raise NotImplementedError

    def at_checkpoint(self, spec: BackboneSpec, resolution: int | None,
                      preprocess: str) -> tuple[BackboneSpec, bool]:
        """(the spec at the checkpoint's geometry, whether position embeddings are interpolated).

        Fixed position embeddings (SigLIP, CLIP, Perception) run at the checkpoint's own image size;
        rotary/interpolating models (DINOv2, DINOv3, ResNet) at the registry's resolution rounded to
        the patch size. `resolution` overrides either. Width comes from the loaded config."""
        native, patch, dim = self.geometry(spec)
        if resolution is not None and resolution < patch:
            raise SettingError(f"`resolution` must be at least the patch size {patch}, got {resolution}")
        if spec.fixed_positions:
            side = resolution or native
        else:
            side = max(patch, round((resolution or spec.resolution) / patch) * patch)
        interpolate = spec.fixed_positions and side != native
        if not spec.fixed_positions and resolution is None and native and native != side:
            self.checkpoint_side = native  # the recipe's side is kept; `resolution_notes` tells the user
        return replace(spec, resolution=side, dim=dim, preprocess=preprocess), interpolate


class VisionTower(PooledBackbone):
    """A transformers vision tower plus its pooling rule (`pool`).

    With `layers` set (`use_layers`), forward returns the default embedding followed by each
    named layer's pooled vector (layers counted from 1) and, with a map side, each one's map
    (`layer_map`), concatenated: one pass gives them all."""

    layer_taps = layer_maps = True

    def __init__(self, model: nn.Module, spec: BackboneSpec, source: str, revision: str | None,
                 resolution: int | None = None, preprocess: str = "square"):
        super().__init__(model, spec, source, revision, resolution, preprocess)
        self.pooling = spec.pooling
        # DINOv2/v3: one CLS token, then the register tokens (DINOv3 has 4), then the patches.
        self.prefix_tokens = int(spec.class_token) + getattr(model.config, "num_register_tokens", 0)
        self.layers: tuple[int, ...] = ()
        self.map_side: int | None = None

    @classmethod
    def load(cls, spec, source, weights, resolution, preprocess) -> "VisionTower":
        geometry = dict(resolution=resolution, preprocess=preprocess)
        model_class = getattr(transformers, spec.model_class)
        sdpa = {"attn_implementation": "sdpa"} if getattr(model_class, "_supports_sdpa", False) else {}
        if weights != "pretrained":
            config = model_class.config_class(**(spec.tiny_config if weights == "tiny" else spec.config))
            with seeded_init():
                model = model_class._from_config(config, **sdpa)
            return cls(model.eval(), spec, f"{weights}:{spec.model_class}", None, **geometry)
        source = source or spec.hf_id
        offline = Path(source).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        try:
            config, _ = transformers.PretrainedConfig.get_config_dict(source, local_files_only=offline)
            if str(config.get("model_type", "")).startswith("siglip2"):
                raise BackboneLoadError(
                    f"{source!r} is a SigLIP2 NaFlex checkpoint (model_type siglip2): it needs a registry entry "
                    f"with model_class Siglip2VisionModel (variable-size patches), not {spec.model_class}"
                )
            model = model_class.from_pretrained(source, local_files_only=offline, dtype=torch.float32, **sdpa)
        except (OSError, ValueError, RuntimeError) as err:
            if isinstance(err, BackboneLoadError):
                raise

            raise BackboneLoadError(
                f"could not load {spec.key} weights from {source!r} ({str(err).splitlines()[0][:120]}); "
                f"download them where you can and pass the folder with `model` /path/to/dir, or use `weights` random-init"
            ) from None
        return cls(model.eval(), spec, source, getattr(model.config, "_commit_hash", None), **geometry)

    def geometry(self, spec: BackboneSpec) -> tuple[int | None, int, int]:
        config = self.model.config
        # EfficientNet names its head width hidden_dim; MobileNetV2's config has none (its head is 1280 wide)
        dim = (config.projection_dim if spec.pooling == "image_embeds"
               else config.hidden_sizes[-1] if hasattr(config, "hidden_sizes")
               else getattr(config, "hidden_dim", None) or getattr(config, "hidden_size", spec.dim))
        return getattr(config, "image_size", None), getattr(config, "patch_size", 1), dim

    def _outputs(self, pixel_values: torch.Tensor, hidden: bool):
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if hidden:
            extra["output_hidden_states"] = True
            if getattr(self.model.config, "model_type", "") == "swin":
                extra["output_hidden_states_before_downsampling"] = True  # a stage's own map, not the merged one
        return self.model(pixel_values=pixel_values, **extra)

    def _layer_states(self, outputs, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return layer_states(outputs, pixel_values.shape[-1] if self.spec.stride_stages else None)

    def layer_sizes(self, pixel_values: torch.Tensor) -> list[tuple[int, int]]:
        """(the width of its pooled vector, the channels of its map) for every layer, from one probe pass;
        the list's length is the layer count."""
        with torch.inference_mode():
            return [(pool_layer(s, self.prefix_tokens, None, self.spec.class_token).shape[1],
                     layer_map(s, self.prefix_tokens, None, 1).shape[1])
                    for s in self._layer_states(self._outputs(pixel_values, hidden=True), pixel_values)]

    def use_layers(self, layers: tuple[int, ...], map_side: int | None = None) -> None:
        self.layers, self.map_side = tuple(layers), map_side

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self._outputs(pixel_values, hidden=bool(self.layers))
        pooled = pool(outputs, self.pooling, self.prefix_tokens)
        if not self.layers:
            return pooled
        every = self._layer_states(outputs, pixel_values)
        states = [every[n - 1] for n in self.layers]
        norm = getattr(self.model, self.spec.layer_norm) if self.spec.layer_norm else None
        maps = [layer_map(s, self.prefix_tokens, norm, self.map_side) for s in states] if self.map_side else []
        return torch.cat([pooled, *(pool_layer(s, self.prefix_tokens, norm, self.spec.class_token) for s in states),
                          *maps], dim=1)


class TimmTapped(PooledBackbone):
    """A timm model (the Perception Encoder) read at the registry's `tap_block` (extract/timm_tower.py);
    with `layers` set (`use_layers`), each named block's pooled vector follows the default embedding."""

    layer_taps = True

    def __init__(self, model: nn.Module, spec: BackboneSpec, source: str, revision: str | None,
                 resolution: int | None = None, preprocess: str = "square"):
        super().__init__(model, spec, source, revision, resolution, preprocess)
        self.layers: tuple[int, ...] = ()

    @classmethod
    def load(cls, spec, source, weights, resolution, preprocess) -> "TimmTapped":
        try:
            import timm
        except ImportError:
            raise BackboneLoadError(
                f"the {spec.key} backbone loads through timm: `pip install 'iqa[perception]' torchvision` "
                f"(torchvision matching your torch build)"
            ) from None
        size = {"img_size": resolution} if resolution else {}  # timm resamples the position grid on load
        source = (source or spec.hf_id) if weights == "pretrained" else None
        try:
            if source is None:  # by architecture name: no network
                tiny = spec.tiny_config if weights == "tiny" else {}
                with seeded_init():
                    model = timm.create_model(spec.timm_name, pretrained=False, **{**tiny, **size})
                source = f"{weights}:{spec.timm_name}"
            elif Path(source).is_file():  # a local weights file
                model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": source}, **size)
            else:
                model = timm.create_model(f"hf-hub:{source}", pretrained=True, **size)
        except (OSError, RuntimeError, ValueError) as err:
            raise BackboneLoadError(
                f"could not load {spec.key} weights from {source!r} ({str(err).splitlines()[0][:120]}); "
                f"pass a local weights file with `model` /path/to/open_clip_model.safetensors"
            ) from None
        return cls(TimmTap(model, spec.tap_block).eval(), spec, source, None, resolution=resolution, preprocess=preprocess)

    def geometry(self, spec: BackboneSpec) -> tuple[int | None, int, int]:
        embed = self.model.model.patch_embed
        return embed.img_size[0], embed.patch_size[0], spec.dim

    @classmethod
    def parameters_used(cls, model: "TimmTapped") -> int:
        """The whole tower is kept for `--layers`, but the default embedding stops at the tapped block."""
        unused = model.model.model.blocks[model.spec.tap_block + 1:]
        return super().parameters_used(model) - sum(p.numel() for p in unused.parameters())

    def layer_sizes(self, pixel_values: torch.Tensor) -> list[tuple[int, None]]:
        """(the width of its pooled vector, None: no maps are stored of a timm tower's layers) for every layer."""
        return [(width, None) for width in self.model.layer_widths()]

    def use_layers(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)

    def use_layer_pool(self, layer_pool: str) -> None:
        """How each stored layer is pooled (extract/timm_tower.py LAYER_POOLS)."""
        self.model = TimmTap(self.model.model, self.spec.tap_block, layer_pool)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, self.layers)


class WorkerFeatures(PooledBackbone):
    """The registry's `features_in_worker` function, run in the decode workers; the model is the
    identity: its batch already holds the features."""

    in_worker, spatial, tunable = True, False, False

    @classmethod
    def load(cls, spec, source, weights, resolution, preprocess) -> "WorkerFeatures":
        fn = spec.features_in_worker
        return cls(nn.Identity(), spec, f"{fn.__module__}.{fn.__qualname__}", spec.revision,
                   resolution=resolution, preprocess=preprocess)

    def at_checkpoint(self, spec, resolution, preprocess) -> tuple[BackboneSpec, bool]:
        return spec, False  # no input geometry: the features see the decoded image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.float()


class CleanDift(Family):
    """CleanDIFT SD-2.1, extract/cleandift.py's own module; it takes any input side divisible by 64
    (VAE x UNet strides)."""

    spatial = False  # its taps are pooled inside the module

    @classmethod
    def load(cls, spec, source, weights, resolution, preprocess) -> nn.Module:
        from iqa.extract import cleandift

        check_preprocess(preprocess)
        if weights != "pretrained":
            with seeded_init():
                model = cleandift.build_cleandift(spec.tiny_config if weights == "tiny" else spec.config,
                                                  f"{weights}:{spec.model_class}")
        elif source is None or not Path(source).is_dir():
            raise BackboneLoadError("cleandift loads from a local SD-2.1 folder with the CleanDIFT UNet: pass `model` DIR")
        else:
            model = cleandift.load_cleandift(source).eval()
        model.spec = replace(spec, resolution=resolution or spec.resolution, preprocess=preprocess)
        return model


# Pooling rules that are families of their own; every other rule pools a transformers output (`pool`).
FAMILIES: dict[str, type[Family]] = {"timm_tap": TimmTapped, "worker": WorkerFeatures, "cleandift": CleanDift}


def family_of(spec: BackboneSpec) -> type[Family]:
    """The family of a registry entry, named by its pooling rule."""
    return FAMILIES.get(spec.pooling, VisionTower)


def checkpoint_tag(source: str | None) -> str | None:
    """A local checkpoint's store tag, from its folder (or file) name: its store is never the registry
    model's (`dinov2@my-run.zarr`, not `dinov2.zarr`), and tables and cards name it for what it is.
    None for a hub id or the registry's weights."""
    if not source or not Path(source).exists():
        return None
    path = Path(source).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem if path.is_file() else path.name).strip(".-")
    return name or "local"


def load_backbone(
    spec: BackboneSpec, source: str | None = None, weights: str = "pretrained",
    resolution: int | None = None, preprocess: str = "square",
) -> nn.Module:
    """The backbone of `spec` with `weights` (pretrained from `source` or the registry's id, random-init,
    or tiny: `spec` is then the tiny twin, `get_spec(key, "tiny")`), built by its family; `resolution`
    overrides the checkpoint's input side, `preprocess` is "square" (whole image) or "native" (shortest
    side, centre crop); both land in `.spec`."""
    return family_of(spec).load(spec, source, check_weights(weights), resolution, preprocess)


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
