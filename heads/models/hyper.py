"""StackedHyper: M HyperIQA-style content-adaptive heads on pooled features (SMART-IQA Sec. III-D, App. A).

A hyper-network reads the image's features and generates the weights of a small target network,
which maps the feature vector to the score (Eq. 14-16):

    c    = LeakyReLU(H x_c + h)                     content code: the hyper-network's reading of x_c
    v    = P x + p                                  target input (HyperIQA's 224-wide pooled vector)
    W1   = sum_k c'_k G1_k,  b1 = c' B1             generated from c' = [c, 1] (a constant for the biases)
    h    = sigmoid(W1 v + b1)                       target hidden layer, 128 wide, sigmoid (Eq. 16)
    q    = (c' G2) . h + c' B2                      generated output layer

x_c is the part of x the hyper-network reads (`content`): on stored layers the deepest one, as the
paper's hyper-network reads Swin's deepest stage F^K while the target network maps all stages; on
one pooled embedding, that whole vector. Kept apart, the content sets the weights and the target
network maps the features with them: given the code, the score is a target network whose weights
are linear in the code, so a score that multiplies two feature groups is a simple function for
this head and a hard one for an MLP (tests/heads/training/test_train.py). The paper's 1x1 convolution over
a 7x7 map has no counterpart on a pooled vector, so the generator is linear in a small content
code (width 16):
W1 v = sum_k c'_k (G1_k v) is computed as one matmul of v with all G1_k, never one weight matrix
per image. Every tensor is [M, ...], row m drawn from member m's generator in a fixed order, and no
operation mixes rows: members train as if alone, as the MLP's do (heads/models/mlp.py).
"""

import math

import torch
from torch import nn

from iqa.heads.models.mlp import StackedLinear, TopkMasked, member_seed

HYPER = "hyper"
CODE = 16  # width of the content code c
TARGET_IN = 224  # HyperIQA's target-network input size
TARGET_HIDDEN = 128  # SMART-IQA's d_target (App. A)


def hyper_recipe(layers: tuple[int, ...] | None = None) -> dict:
    """The sizes, and on stored layers which one the hyper-network reads (part of a run's key)."""
    reads = {"hyper_reads": "the deepest of the layers"} if layers else {}
    return {"code": CODE, "target_in": TARGET_IN, "target_hidden": TARGET_HIDDEN, "target_act": "sigmoid"} | reads


def _uniform(generators: list[torch.Generator], shape: tuple[int, ...], bound: float) -> nn.Parameter:
    """[M, *shape], member m's block drawn from its own generator."""
    return nn.Parameter(torch.stack([torch.empty(shape).uniform_(-bound, bound, generator=g) for g in generators]))


class StackedHyper(TopkMasked):
    """M hyper heads; they differ in seed and mask k (no dropout: the target network is generated).

    `content` (start, stop): the input columns the hyper-network reads; None reads all of them.
    Given, it is kept as the buffer `content_columns` ([M, 2]), so a saved head reads the same columns.
    """

    def __init__(self, in_dim: int, seeds: list[int], mask_k: list[float] | None = None, dropout: str | None = None,
                 content: tuple[int, int] | None = None):
        super().__init__()
        if dropout is not None:
            raise ValueError("the hyper head takes no --dropout")
        members = len(seeds)
        self.seeds, self.dropout, self.keep = list(seeds), None, [1.0] * members
        self.register_masks(mask_k, members)
        if content is not None:
            if not 0 <= content[0] < content[1] <= in_dim:
                raise ValueError(f"content columns {content} are not a part of the {in_dim} inputs")
            self.register_buffer("content_columns", torch.tensor([content] * members))  # [M, 2], as every entry
        self.content = None if content is None else slice(*map(int, content))

        init = [torch.Generator().manual_seed(member_seed(s, "init")) for s in seeds]
        coded = CODE + 1
        self.code = StackedLinear(init, in_dim if content is None else content[1] - content[0], CODE)
        self.project = StackedLinear(init, in_dim, TARGET_IN)
        # generated layers start at nn.Linear's scale for their fan-in, shared across the code's entries
        self.w1 = _uniform(init, (TARGET_IN, coded * TARGET_HIDDEN), 1 / math.sqrt(TARGET_IN * coded))
        self.b1 = _uniform(init, (coded, TARGET_HIDDEN), 1 / math.sqrt(TARGET_IN * coded))
        self.w2 = _uniform(init, (coded, TARGET_HIDDEN), 1 / math.sqrt(TARGET_HIDDEN * coded))
        self.b2 = _uniform(init, (coded, 1), 1 / math.sqrt(TARGET_HIDDEN * coded))

    def _code(self, x: torch.Tensor) -> torch.Tensor:
        """c' = [LeakyReLU(H x_content + h), 1]: [M, B, CODE + 1]."""
        c = nn.functional.leaky_relu(self.code(x if self.content is None else x[..., self.content]))
        return torch.cat([c, torch.ones_like(c[..., :1])], -1)

    def features(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """The target network's hidden layer h, [M, B, TARGET_HIDDEN] (for t-SNE)."""
        return self._hidden(x if inputs_masked else self.mask_inputs(x))[0]

    def _hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._code(x)
        v = self.project(x)
        m, b, _ = v.shape
        per_code = torch.bmm(v, self.w1.to(v.dtype)).view(m, b, CODE + 1, TARGET_HIDDEN)  # G1_k v for every k
        pre = (c[..., None] * per_code).sum(-2) + torch.bmm(c, self.b1.to(v.dtype))
        return torch.sigmoid(pre), c

    def forward(self, x: torch.Tensor, inputs_masked: bool = False) -> torch.Tensor:
        """x [M, B, in_dim] -> predicted quality [M, B]."""
        h, c = self._hidden(x if inputs_masked else self.mask_inputs(x))
        w2 = torch.bmm(c, self.w2.to(h.dtype))  # [M, B, TARGET_HIDDEN], generated per image
        b2 = torch.bmm(c, self.b2.to(h.dtype))[..., 0]
        return (w2 * h).sum(-1) + b2
