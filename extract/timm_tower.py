"""A timm vision tower (the Perception Encoder) as iqa uses it: the default embedding taken at a
tapped block, each block's pooled vector for `--layers`, and query/key projections LoRA can target.

The default embedding is timm's own head on the tapped block: block `tap_block` -> the final norm
-> attention pooling -> projection. A layer's vector (`--layers`, layer n = block n-1) is, by default
(`layer_pool="tokens"`), the mean over the patch tokens of that block's output followed by its class
token, no norm applied (PE's own intermediate features are un-normalised), so layer tap_block+1 is not
the default embedding. With `layer_pool="head"` each layer goes through the default embedding's own
head (final norm, attention pooling, projection), as the supplement's "tapped at layer 20, pooled,
projected" reads: layer tap_block+1 is then the default embedding, and a sweep's layers compare with it.

The whole tower is kept (no block is pruned: `--layers` reaches past the tap, and the weights
checksum covers the checkpoint as published); a pass stops at the last block it needs.

timm fuses the attention projections into one `qkv` Linear, so LoRA on it would adapt the values
too. `split_qkv` replaces each with `SplitQkv`, separate `q`, `k`, `v` Linears whose weights are
slices of the fused one and whose outputs are concatenated in timm's order (the same numbers up to
float rounding); LoRA then targets `attn.qkv.q` and `attn.qkv.k` alone.
"""

import torch
from torch import nn

LAYER_POOLS = ("tokens", "head")  # a layer's vector: patch mean + class token, or the default embedding's head


class TimmTap(nn.Module):
    """A timm ViT [B, 3, H, W] -> the default embedding, then the pooled vector of each layer asked."""

    def __init__(self, model: nn.Module, tap_block: int, layer_pool: str = "tokens"):
        super().__init__()
        if layer_pool not in LAYER_POOLS:
            raise ValueError(f"--layer-pool must be one of {', '.join(LAYER_POOLS)}, got {layer_pool!r}")
        self.model = model
        self.tap_block = tap_block
        self.layer_pool = layer_pool

    @property
    def class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def layer_widths(self) -> list[int]:
        width = self.model.embed_dim * (2 if self.class_token else 1)
        if self.layer_pool == "head":  # the head's output width (a projection, where the model has one)
            tokens = torch.zeros(1, max(self.model.num_prefix_tokens, 1) + 1, self.model.embed_dim)
            with torch.no_grad():
                width = self._head(tokens[:, 1:], tokens[:, :1]).shape[1]
        return [width] * len(self.model.blocks)

    def _head(self, patches: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(torch.cat([prefix, patches], dim=1)))

    def _pooled(self, patches: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """A layer's vector: the default embedding's head on it, or its patch tokens' mean then its class token
        (as extract/backbones.pool_layer; no norm: PE's own intermediate features are un-normed)."""
        if self.layer_pool == "head":
            return self._head(patches, prefix)
        return torch.cat([patches.mean(dim=1), *([prefix[:, 0]] if self.class_token else [])], dim=1)

    def forward(self, x: torch.Tensor, layers: tuple[int, ...] = ()) -> torch.Tensor:
        blocks = sorted({self.tap_block, *(n - 1 for n in layers)})
        states = self.model.forward_intermediates(x, indices=blocks, return_prefix_tokens=True, norm=False,
                                                  stop_early=True, output_fmt="NLC", intermediates_only=True)
        by_block = dict(zip(blocks, states))
        return torch.cat([self._head(*by_block[self.tap_block]), *(self._pooled(*by_block[n - 1]) for n in layers)], dim=1)


class SplitQkv(nn.Module):
    """A fused qkv Linear as three: `q`, `k`, `v`, concatenated back in the fused layout."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        width = fused.out_features // 3
        parts = []
        for i in range(3):
            part = nn.Linear(fused.in_features, width, bias=fused.bias is not None,
                             device=fused.weight.device, dtype=fused.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(fused.weight[i * width:(i + 1) * width])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * width:(i + 1) * width])
            parts.append(part)
        self.q, self.k, self.v = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(module: nn.Module) -> nn.Module:
    """`module` with every attention's fused `qkv` Linear replaced by a `SplitQkv` (in place; again is a no-op)."""
    for name, attn in list(module.named_modules()):
        fused = getattr(attn, "qkv", None)
        if not isinstance(fused, nn.Linear):
            continue
        if getattr(attn, "q_bias", None) is not None:  # EVA's variant reads qkv.weight itself, never calls qkv
            raise ValueError(f"{name} adds separate q/v biases to its fused qkv: it cannot be split")
        attn.qkv = SplitQkv(fused)
    return module
