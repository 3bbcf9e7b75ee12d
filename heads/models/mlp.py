"""StackedMLP: M independent heads d -> 512 -> 512 -> 1 evaluated with one batched matmul per layer.

Each layer holds all members' weights in one [M, in, out] parameter for `torch.baddbmm` (stacking
per-member tensors every step cost a fifth of the step on the CPU). Row m is member m: it draws its
weights and its dropout masks from its own seed, and no operation mixes rows, so a member's
training does not depend on its stack-mates (Adam is elementwise).
M = 1 is the head that end-to-end fine-tuning uses: input [1, batch, d].
"""

import math

import numpy as np
import torch
from torch import nn

from iqa.heads.models.activations import ACTIVATIONS, activation_member_tensors, make_activation

HIDDEN = 512
HEADS = {"baseline": ("lrelu", "lrelu"), "sig": ("sigmoid", "lrelu"), "gated": ("gated", "gated")}
DROPOUT_MODES = ("input", "layers")


def head_activations(head: str) -> tuple[str, str]:
    """(act1, act2) of a named head (HEADS) or of an explicit pair written act1+act2, e.g. sigmoid+gelu."""
    if head in HEADS:
        return HEADS[head]
    pair = tuple(head.split("+"))
    if len(pair) != 2 or any(a not in ACTIVATIONS for a in pair):
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)} or a pair act1+act2 of "
                         f"{', '.join(ACTIVATIONS)}")
    return pair


def member_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed per (run seed, purpose) so init, data order and dropout do not share a stream."""
    return int(np.random.SeedSequence([seed, *purpose.encode()]).generate_state(2, np.uint64)[0] >> 1)


def topk_mask(x: torch.Tensor, keep_percent: torch.Tensor) -> torch.Tensor:
    """Zero every feature outside the top-k percent by |value| of its own sample (Table 4).

    x is [M, B, D], keep_percent is [M]; a sample keeps ceil(k/100 * D) features (ties at the
    threshold are all kept). k = 100 keeps everything.
    """
    d = x.shape[-1]
    counts = torch.ceil(keep_percent * d / 100).long().clamp(1, d).tolist()
    magnitude = x.abs()
    # The count-th largest magnitude is the (d - count + 1)-th smallest: a selection, not a full sort.
    threshold = torch.stack([magnitude[m].kthvalue(d - c + 1, dim=-1, keepdim=True).values for m, c in enumerate(counts)])
    return x * (magnitude >= threshold)


class TopkMasked(nn.Module):
    """A stack of heads whose members each see only the top-k percent of their input features (Table 4)."""

    def register_masks(self, mask_k: list[float] | None, members: int) -> None:
        """Each member's top-k level (None: all 100) as `mask_k`, an [M] buffer, and `masking`, a Python
        flag (no device sync per step)."""
        mask_k = [100.0] * members if mask_k is None else [float(k) for k in mask_k]
        if len(mask_k) != members or any(not 0 < k <= 100 for k in mask_k):
            raise ValueError("mask k needs one value per member, each in (0, 100]")
        self.register_buffer("mask_k", torch.tensor(mask_k))
        self.masking = any(k < 100 for k in mask_k)

    def mask_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's top-k feature masking of x [M, B, D] (identity at k = 100)."""
        return topk_mask(x, self.mask_k) if self.masking else x


class MemberDropout:
    """Dropout with rate 1 - keep per member (`self.keep`), each member's mask from its own generator (`self.seeds`)."""

    _dropout_generators: list[torch.Generator] | None = None

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or all(p == 1 for p in self.keep):
            return h
        if self._dropout_generators is None or self._dropout_generators[0].device.type != h.device.type:
            self._dropout_generators = [
                torch.Generator(h.device).manual_seed(member_seed(s, "dropout")) for s in self.seeds
            ]
        scales = []
        for p, g in zip(self.keep, self._dropout_generators):
            if p == 1:
                scales.append(torch.ones(h.shape[1:], device=h.device, dtype=h.dtype))
            else:
                kept = torch.rand(h.shape[1:], generator=g, device=h.device) < p
                scales.append(kept.to(h.dtype) / p)
        return h * torch.stack(scales)


class StackedLinear(nn.Module):
    """M linear layers: weight [M, in, out], bias [M, out]; member m gets nn.Linear's init from its own generator."""

    def __init__(self, generators: list[torch.Generator], in_dim: int, out_dim: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)
        # weight then bias from each member's generator, in that order, as a member alone would draw them
        drawn = [
            (torch.empty(in_dim, out_dim).uniform_(-bound, bound, generator=g),
             torch.empty(out_dim).uniform_(-bound, bound, generator=g))
            for g in generators
        ]
        self.weight = nn.Parameter(torch.stack([w for w, _ in drawn]))
        self.bias = nn.Parameter(torch.stack([b for _, b in drawn]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias[:, None, :].to(x.dtype), x, self.weight.to(x.dtype))

    def member_tensors(self, m: int) -> list[torch.Tensor]:
        return [self.weight[m], self.bias[m]]


class StackedMLP(TopkMasked, MemberDropout):
    """M heads sharing one architecture (act1, act2, dropout placement); they differ in seed, mask k and keep."""

    def __init__(
        self,
        in_dim: int,
        seeds: list[int],
        act1: str = "lrelu",
        act2: str = "lrelu",
        mask_k: list[float] | None = None,
        dropout: str | None = None,
        keep: list[float] | None = None,
        hidden: int = HIDDEN,
    ):
        super().__init__()
        members = len(seeds)
        if dropout is not None and dropout not in DROPOUT_MODES:
            raise ValueError(f"unknown dropout mode {dropout!r}; use 'input' or 'layers'")
        self.seeds, self.dropout = list(seeds), dropout
        self.register_masks(mask_k, members)
        keep = [1.0] * members if keep is None else [float(p) for p in keep]
        if len(keep) != members or any(not 0 < p <= 1 for p in keep):
            raise ValueError("keep needs one value per member, each in (0, 1]")
        self.keep = keep

        init = [torch.Generator().manual_seed(member_seed(s, "init")) for s in seeds]
        self.layer1 = StackedLinear(init, in_dim, hidden)
        self.act1 = make_activation(act1, members, hidden)
        self.layer2 = StackedLinear(init, hidden, hidden)
        self.act2 = make_activation(act2, members, hidden)
        self.layer3 = StackedLinear(init, hidden, 1)

    def member_tensors(self, m: int) -> list[torch.Tensor]:
        """Member m's weights, biases and gate parameters, in layer order (views into the stack)."""
        tensors = []
        for layer, act in ((self.layer1, self.act1), (self.layer2, self.act2), (self.layer3, None)):
            tensors += layer.member_tensors(m) + (activation_member_tensors(act, m) if act else [])
        return tensors

    def features(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """Hidden features before the output layer, [M, B, hidden] (for t-SNE).

        `inputs_masked`: x already went through `mask_inputs` (the cached trainer masks every
        embedding once, since a sample's mask depends on nothing but its own values).
        """
        if not inputs_masked:
            x = self.mask_inputs(x)
        if self.dropout == "input":
            x = self._drop(x)
        h = self.act1(self.layer1(x))
        if self.dropout == "layers":
            h = self._drop(h)
        h = self.act2(self.layer2(h))
        if self.dropout == "layers":
            h = self._drop(h)
        return h

    def forward(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """x [M, B, in_dim] -> predicted quality [M, B]."""
        return self.layer3(self.features(x, inputs_masked)).squeeze(-1)
