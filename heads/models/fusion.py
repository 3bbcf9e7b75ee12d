"""StackedFusion: M fusion heads over stored stages (`--layers 4,3 --fuse attention|smart [--spatial 7]`).

SMART-IQA's channel attention over stages (Sec. III-C, III-D), in two variants, on pooled stage vectors
(H_target = W_target = 1) or on the stages' S x S maps (`positions` = S*S, `iqa extract --spatial S`).
`smart` is the paper's (Eq. 4-10; on maps every line holds at each location, x_K in the gate its GAP):

    u_s   = ReLU(P_s x_s + p_s)                     each stage projected to a common width (Eq. 4, the 1x1 conv)
    z     = ReLU(W1 x_K + b1)                       read from the deepest stage K alone (Eq. 6-7)
    alpha = sigmoid(W2 z + b2)                      one weight in (0, 1) per stage, each on its own (Eq. 8)
    v     = [alpha_1 u_1, ..., alpha_K u_K]         concatenated: K x FUSE_WIDTH wide (Eq. 9-10)

`attention` (iqa's earlier reading) projects without the ReLU, takes a softmax over the stages and sums:

    u_s   = P_s x_s + p_s
    alpha = softmax(W2 z + b2)                      the weights are shares of one whole (as Fig. 4 reads them)
    v     = sum_s alpha_s u_s                       one stage's width whatever the number of stages

Either way the run's usual head reads v: on maps the MLP heads read its global average over the
locations; `--act hyper --hyper-target eq16` reads v at every location (heads/models/hyper.py, Eq. 14-17).
A hyper head's hyper-network reads the deepest stage x_K (F^K, its map or the GAP of it), given beside
v, as SMART-IQA's Fig. 1 draws it. The input is the stages' vectors (or maps, each S*S*C_s columns,
positions first) concatenated in the order named (the pairing study's input), split here by their
widths; the deepest stage is the one of highest number, and `smart` concatenates in the order named.
Every tensor is [M, ...], member m's rows drawn from its own generator ("fusion", apart from the head's
"init" stream), and no operation mixes rows: members train as if alone, as the MLP's do
(heads/models/mlp.py).
"""

import torch
from torch import nn

from iqa.heads.models.hyper import StackedHyper
from iqa.heads.models.mlp import StackedLinear, TopkMasked, member_seed
from iqa.errors import SettingError

FUSIONS = ("attention", "smart")
FUSE_WIDTH = 512  # SMART-IQA's C_unified (App. B)
GATE_HIDDEN = 128  # its d_hidden of the gating network


def fusion_recipe(fuse: str = "attention", spatial: int | None = None) -> dict:
    maps = {"maps": "per location; gate from the deepest map's GAP; MLP heads read v's GAP"} if spatial else {}
    if fuse == "smart":
        return {"width": FUSE_WIDTH, "gate_hidden": GATE_HIDDEN, "projection": "ReLU", "gate": "sigmoid per stage",
                "combine": "concatenation"} | maps
    return {"width": FUSE_WIDTH, "gate_hidden": GATE_HIDDEN, "gate": "softmax over stages", "combine": "weighted sum"} | maps


def fused_width(fuse: str, stages: int) -> int:
    """The width of v, the head's input: one stage's (attention) or all of them side by side (smart)."""
    return FUSE_WIDTH * stages if fuse == "smart" else FUSE_WIDTH


def check_fusion(fuse: str, layers: tuple[int, ...] | None) -> None:
    if fuse not in FUSIONS:
        raise ValueError(f"unknown fusion {fuse!r}; choose from {', '.join(FUSIONS)}")
    if layers is None or len(layers) < 2:
        raise SettingError("`fuse` weighs stages against each other: give two or more with `layers`, e.g. `layers` 4,3")


def per_location(linear: StackedLinear, x: torch.Tensor) -> torch.Tensor:
    """A stacked linear map of x [M, B, in] or, a 1 x 1 convolution, of each location of x [M, B, P, in]."""
    if x.dim() == 3:
        return linear(x)
    return linear(x.flatten(1, 2)).unflatten(1, x.shape[1:3])


class StackedFusion(TopkMasked):
    """M fusion heads over `stages` ((layer, width) in input order; on maps, `positions` > 1, the width is
    the channels, each stage's input S*S*width columns), each feeding its member of `head` (a stacked head
    of input width `fused_width`, built without masking: the fusion masks its own input)."""

    def __init__(self, stages: tuple[tuple[int, int], ...], seeds: list[int], mask_k: list[float] | None, head: nn.Module,
                 fuse: str = "attention", positions: int = 1):
        super().__init__()
        self.fuse, self.positions = fuse, positions
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

    def _parts(self, x: torch.Tensor, inputs_masked: bool) -> tuple[torch.Tensor, ...]:
        """Each stage's input: [M, B, width], or on maps [M, B, P, channels]."""
        parts = (x if inputs_masked else self.mask_inputs(x)).split([w * self.positions for w in self.widths], -1)
        return parts if self.positions == 1 else tuple(p.unflatten(-1, (self.positions, -1)) for p in parts)

    def _stage_weights(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        deepest = parts[self.deepest] if self.positions == 1 else parts[self.deepest].mean(-2)  # Eq. 6's GAP
        logits = self.gate2(nn.functional.relu(self.gate1(deepest)))
        return torch.sigmoid(logits) if self.fuse == "smart" else torch.softmax(logits, -1)

    def stage_weights(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """alpha, [M, B, stages] (rows sum to 1 under attention), in the order the stages were named."""
        return self._stage_weights(self._parts(x, inputs_masked))

    def _fused(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        projected = torch.stack([per_location(p, part) for p, part in zip(self.project, parts)], -1)  # [..., width, stages]
        if self.fuse == "smart":
            projected = nn.functional.relu(projected)
        alpha = self._stage_weights(parts)
        weighted = projected * (alpha[..., None, :] if self.positions == 1 else alpha[..., None, None, :])
        return weighted.transpose(-1, -2).flatten(-2) if self.fuse == "smart" else weighted.sum(-1)

    def fused(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """v: [M, B, fused_width] ([M, B, P, fused_width] on maps), the projected stages weighted and summed
        (attention) or concatenated (smart)."""
        return self._fused(self._parts(x, inputs_masked))

    def _head_inputs(self, x: torch.Tensor, inputs_masked: bool) -> tuple[torch.Tensor, dict]:
        """What the head reads: v (its GAP on maps unless the head reads locations) and, for a hyper head, F^K."""
        parts = self._parts(x, inputs_masked)
        v, content = self._fused(parts), parts[self.deepest]
        if self.positions > 1 and getattr(self.head, "positions", 1) == 1:
            v, content = v.mean(-2), content.mean(-2)
        return v, {"content": content} if isinstance(self.head, StackedHyper) else {}

    def features(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """The head's hidden features on v (for t-SNE)."""
        v, content = self._head_inputs(x, inputs_masked)
        return self.head.features(v, inputs_masked=True, **content)

    def forward(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """x [M, B, sum of the stages' input widths] -> predicted quality [M, B]."""
        v, content = self._head_inputs(x, inputs_masked)
        return self.head(v, inputs_masked=True, **content)
