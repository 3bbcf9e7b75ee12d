"""StackedFusion: M fusion heads over stored stages (`--layers 4,3 --fuse attention|smart`).

SMART-IQA's channel attention over stages (Sec. III-C, III-D) on pooled stage vectors, in two variants.
`smart` is the paper's (Eq. 4-10, on pooled vectors: H_target = W_target = 1):

    u_s   = ReLU(P_s x_s + p_s)                     each stage projected to a common width (Eq. 4, the 1x1 conv)
    z     = ReLU(W1 x_K + b1)                       read from the deepest stage K alone (Eq. 6-7)
    alpha = sigmoid(W2 z + b2)                      one weight in (0, 1) per stage, each on its own (Eq. 8)
    v     = [alpha_1 u_1, ..., alpha_K u_K]         concatenated: K x FUSE_WIDTH wide (Eq. 9-10)

`attention` (iqa's earlier reading) projects without the ReLU, takes a softmax over the stages and sums:

    u_s   = P_s x_s + p_s
    alpha = softmax(W2 z + b2)                      the weights are shares of one whole (as Fig. 4 reads them)
    v     = sum_s alpha_s u_s                       one stage's width whatever the number of stages

Either way the run's usual head reads v. The input is the stages' vectors concatenated in the order
named (the pairing study's input), split here by their widths; the deepest stage is the one of
highest number, and `smart` concatenates in the order named. Every tensor is [M, ...], member m's
rows drawn from its own generator ("fusion", apart from the head's "init" stream), and no operation
mixes rows: members train as if alone, as the MLP's do (heads/models/mlp.py).
"""

import torch
from torch import nn

from iqa.heads.models.mlp import StackedLinear, TopkMasked, member_seed
from iqa.errors import SettingError

FUSIONS = ("attention", "smart")
FUSE_WIDTH = 512  # SMART-IQA's C_unified (App. B)
GATE_HIDDEN = 128  # its d_hidden of the gating network


def fusion_recipe(fuse: str = "attention") -> dict:
    if fuse == "smart":
        return {"width": FUSE_WIDTH, "gate_hidden": GATE_HIDDEN, "projection": "ReLU", "gate": "sigmoid per stage",
                "combine": "concatenation"}
    return {"width": FUSE_WIDTH, "gate_hidden": GATE_HIDDEN, "gate": "softmax over stages", "combine": "weighted sum"}


def fused_width(fuse: str, stages: int) -> int:
    """The width of v, the head's input: one stage's (attention) or all of them side by side (smart)."""
    return FUSE_WIDTH * stages if fuse == "smart" else FUSE_WIDTH


def check_fusion(fuse: str, layers: tuple[int, ...] | None) -> None:
    if fuse not in FUSIONS:
        raise ValueError(f"unknown fusion {fuse!r}; choose from {', '.join(FUSIONS)}")
    if layers is None or len(layers) < 2:
        raise SettingError("`fuse` weighs stages against each other: give two or more with `layers`, e.g. `layers` 4,3")


class StackedFusion(TopkMasked):
    """M fusion heads over `stages` ((layer, width) in input order), each feeding its member of `head`
    (a stacked head of input width `fused_width`, built without masking: the fusion masks its own input)."""

    def __init__(self, stages: tuple[tuple[int, int], ...], seeds: list[int], mask_k: list[float] | None, head: nn.Module,
                 fuse: str = "attention"):
        super().__init__()
        self.fuse = fuse
        members = len(seeds)
        self.layers = tuple(int(n) for n, _ in stages)
        self.widths = [int(w) for _, w in stages]
        self.deepest = self.layers.index(max(self.layers))
        self.seeds, self.dropout, self.keep = list(seeds), head.dropout, head.keep
        self.register_masks(mask_k, members)

        init = [torch.Generator().manual_seed(member_seed(s, "fusion")) for s in seeds]
        self.project = nn.ModuleList(StackedLinear(init, w, FUSE_WIDTH) for w in self.widths)
        self.gate1 = StackedLinear(init, self.widths[self.deepest], GATE_HIDDEN)
        self.gate2 = StackedLinear(init, GATE_HIDDEN, len(self.widths))
        self.head = head

    @property
    def act1(self) -> nn.Module | None:  # the trainer records gated activations' curves by these names
        return getattr(self.head, "act1", None)

    @property
    def act2(self) -> nn.Module | None:
        return getattr(self.head, "act2", None)

    def _stage_weights(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits = self.gate2(nn.functional.relu(self.gate1(parts[self.deepest])))
        return torch.sigmoid(logits) if self.fuse == "smart" else torch.softmax(logits, -1)

    def stage_weights(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """alpha, [M, B, stages] (rows sum to 1 under attention), in the order the stages were named."""
        x = x if inputs_masked else self.mask_inputs(x)
        return self._stage_weights(x.split(self.widths, -1))

    def fused(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """v: [M, B, fused_width], the projected stages weighted and summed (attention) or concatenated (smart)."""
        parts = (x if inputs_masked else self.mask_inputs(x)).split(self.widths, -1)
        projected = torch.stack([p(part) for p, part in zip(self.project, parts)], -1)  # [M, B, width, stages]
        if self.fuse == "smart":
            projected = nn.functional.relu(projected)
        weighted = projected * self._stage_weights(parts)[..., None, :]
        return weighted.transpose(-1, -2).flatten(-2) if self.fuse == "smart" else weighted.sum(-1)

    def features(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """The head's hidden features on v (for t-SNE)."""
        return self.head.features(self.fused(x, inputs_masked), inputs_masked=True)

    def forward(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """x [M, B, sum of widths] -> predicted quality [M, B]."""
        return self.head(self.fused(x, inputs_masked), inputs_masked=True)
