"""Attribution maps of a quality target: Grad-CAM on the backbone's spatial features, Integrated Gradients.

Both come from captum (pure PyTorch). Grad-CAM needs a [B, C, h, w] layer; a ViT's blocks give
tokens [B, N, C], so `SpatialTap` hooks the last block and routes its patch tokens through an
identity module as a [B, C, h, w] grid (the prefix tokens, CLS and registers, pass around it
unchanged; Swin and PVT stages have none, and a grid their downsampling shrank). captum's LayerGradCam then hooks that identity: the same forward numbers, a map on the
patch grid. A CNN's last stage already yields a map.

Which block: the last one's output, except where the pooled vector is read from the CLS token
alone (CLIP's `image_embeds`): there the last block's patch outputs never reach the CLS output,
their gradient is zero, and the tap sits on the input of the last block (the penultimate output),
as Grad-CAM for CLIP-style ViTs usually does.

A target is a function of the pooled embedding [B, D] -> [B]: the head's score (`score_target`),
its negative (what lowers quality), or a feature band's sum (`band_target`).
"""

import math
from collections.abc import Callable

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from torch import nn

from iqa.extract.backbones import family_of
from iqa.extract.preprocess import normalise
from iqa.errors import SettingError

BLOCK_LISTS = ("layer", "layers", "blocks", "stages")  # what transformers and timm call their block lists
CLS_POOLED = ("image_embeds",)  # poolings that read the CLS token only
METHODS = ("gradcam", "ig")
TARGETS = ("high", "low")
IG_STEPS = 32
UNEXPLAINABLE = {  # why a backbone without spatial features has none, in a user's words
    "worker": "its features are image statistics computed on the CPU, not a network's feature maps",
    "cleandift": "its features are pooled inside the diffusion model, before any map could be read",
}

Target = Callable[[torch.Tensor], torch.Tensor]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's main list of blocks (the shallowest ModuleList named like one)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS and len(module):
            return module
    raise ValueError(f"{type(model).__name__} has no list of blocks to take spatial features from")


def explainable_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's blocks; refuses a backbone with no spatial features (NSS, CleanDIFT's pooled taps)."""
    if not family_of(backbone.spec).spatial:
        why = UNEXPLAINABLE.get(backbone.spec.pooling, "its features are pooled inside the backbone")
        raise SettingError(f"{backbone.spec.key} has no spatial features to explain: {why}")
    return blocks_of(backbone.model)


class SpatialTap(nn.Module):
    """Identity on the backbone's spatial features [B, C, h, w]; hooked into the tapped block while alive.

    Use as a context manager: `with SpatialTap(backbone) as tap: LayerGradCam(f, tap)`.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        blocks = explainable_blocks(backbone)
        self.block = blocks[-2] if backbone.spec.pooling in CLS_POOLED and len(blocks) > 1 else blocks[-1]
        self.backbone = [backbone]  # in a list: not a submodule of the tap
        self._handle = None

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid

    def _reroute(self, module, args, output):
        tokens = first_tensor(output)
        if tokens.dim() == 4:  # a CNN stage: already a map
            return with_first_tensor(output, self(tokens))
        # [B, N, C]: the patch grid is the largest square in N, the rest the prefix (CLS, registers) that
        # ViTs put first; a hierarchical model (Swin, PVT) has no prefix and a grid its stages shrank
        b, n, c = tokens.shape
        side = math.isqrt(n)
        prefix = n - side * side
        grid = tokens[:, prefix:].transpose(1, 2).reshape(b, c, side, side)
        return with_first_tensor(output, torch.cat([tokens[:, :prefix], self(grid).flatten(2).transpose(1, 2)], dim=1))

    def __enter__(self) -> "SpatialTap":
        self._handle = self.block.register_forward_hook(self._reroute)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def first_tensor(output) -> torch.Tensor:
    """A block's main output: the tensor itself, or the first one in its (nested) tuple (Swin's stages return
    (tokens, tokens before downsampling, sizes), PVT-v2's ((tokens,), height, width))."""
    return output if isinstance(output, torch.Tensor) else first_tensor(output[0])


def with_first_tensor(output, tensor: torch.Tensor):
    """`output` with its main tensor replaced, the rest of its structure as it was."""
    if isinstance(output, torch.Tensor):
        return tensor
    return (with_first_tensor(output[0], tensor), *output[1:])


def score_target(head: nn.Module, target: str = "high") -> Target:
    """The head's predicted quality (`high`: what raises it) or its negative (`low`: what lowers it)."""
    if target not in TARGETS:
        raise SettingError(f"`target` must be high or low, got {target!r}")
    sign = 1.0 if target == "high" else -1.0
    return lambda pooled: sign * head(pooled.float()[None])[0]


def band_masks(pooled: torch.Tensor, bands: list[tuple[float, float]]) -> torch.Tensor:
    """[len(bands), B, D] 0/1 masks: band (a, b) holds the features ranked from a% to b% of D from the top
    by |value| in each image's own embedding (ranks, so bands that tile 0-100 partition the features)."""
    d = pooled.shape[-1]
    rank = pooled.abs().argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = largest |value|
    return torch.stack([((rank >= int(a * d / 100)) & (rank < int(b * d / 100))).float() for a, b in bands])


def band_target(mask: torch.Tensor) -> Target:
    """The sum of the pooled features inside `mask` [B, D] (fixed, computed on the unperturbed image).

    IG runs its path steps as one batch, step after step, each step holding the B images in order."""
    def target(pooled: torch.Tensor) -> torch.Tensor:
        per_image = mask.to(pooled.device).repeat(pooled.shape[0] // mask.shape[0], 1)
        return (pooled.float() * per_image).sum(-1)

    return target


def parse_bands(text: str) -> list[tuple[float, float]]:
    """'0-1,1-10' -> [(0, 1), (1, 10)]: percent from the top."""
    bands = []
    for part in text.split(","):
        try:
            a, b = (float(x) for x in part.split("-"))
        except ValueError:
            raise SettingError(f"`bands` takes ranges like 0-1,1-10 (percent from the top), got {part!r}") from None
        if not 0 <= a < b <= 100:
            raise ValueError(f"band {part!r} must satisfy 0 <= low < high <= 100")
        bands.append((a, b))
    return bands


def normalised_input(backbone: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, 3, R, R] as the backbone takes them: on its device, normalised with its mean and std."""
    return normalise(pixels.to(next(backbone.parameters()).device), backbone.spec.mean, backbone.spec.std)


def attribute(backbone: nn.Module, target: Target, pixels: torch.Tensor, method: str = "gradcam") -> torch.Tensor:
    """[B, R, R] attribution of `target` for uint8 pixels [B, 3, R, R] at the backbone's input side.

    Grad-CAM is ReLU'd (the regions that raise the target) and upsampled bilinearly from the patch
    grid; IG is summed over colour channels, from the mean image (zero after normalisation)."""
    if method not in METHODS:
        raise SettingError(f"`method` must be gradcam or ig, got {method!r}")
    inputs = normalised_input(backbone, pixels)

    def forward(x):
        return target(backbone(x))

    with torch.enable_grad():
        if method == "ig":
            ig = IntegratedGradients(forward).attribute(inputs, baselines=torch.zeros_like(inputs), n_steps=IG_STEPS,
                                                        internal_batch_size=IG_STEPS)
            return ig.sum(1).detach().cpu()
        with SpatialTap(backbone) as tap:
            cam = LayerGradCam(forward, tap).attribute(inputs, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), "bilinear")[:, 0].detach().cpu()
