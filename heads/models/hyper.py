"""StackedHyper: M HyperIQA-style content-adaptive heads on pooled features (SMART-IQA Sec. III-D, App. A).

A hyper-network reads the image's content features and generates the weights of a small target
network, which maps the feature vector to the score. Three variants (`target`), every generated tensor
linear in the content code c' = [c, 1] (a constant for the fixed part):

    c    = the content code, from x_c (the part of x the hyper-network reads)
    v    = the target input, from x
    h_l  = sigmoid(W_l v_l + b_l),  W_l = sum_k c'_k G_lk,  b_l = c' B_l      each hidden layer, generated
    q    = (c' G_out) . h_L + c' B_out                                       the generated output layer

- None (iqa's, `--act hyper`): c = LeakyReLU(H x_c + h), 16 wide; v = P x + p, 224 wide (HyperIQA's
  target input); one hidden layer of 128. Rank 17 in the code: cheap on any width.
- "eq16" (App. A, Eq. 14-16 on a pooled F^K): c = x_c itself, the content features (Eq. 14's 1 x 1
  convolution of a 1 x 1 map is a linear map of the pooled vector, Eq. 15's FC of its GAP too); v = x,
  the whole input (d wide); one hidden layer of d_target = 128. It generates d x 128 + 128 + 128 + 1
  parameters per image (Eq. 17) from C x (d x 128 + ...) generator weights.
- "table4" (Table IV's "target FC sizes [112, 224, 112, 56]", HyperIQA's constructor sizes: hyper-network
  input 112, target input 224, hidden layers 112 and 56): c = ReLU(H x_c + h), 112 wide; v = P x + p,
  224 wide; hidden layers 112 and 56. (HyperIQA itself continues with 28 and 14; Table IV stops at 56.)
The paper variants take dropout on the code and the target input (Table IV: rate 0.3, `--dropout input
--keep 0.7`); iqa's takes none.

x_c is what the hyper-network reads (`content`): on stored layers the deepest one, as the paper's
hyper-network reads Swin's deepest stage F^K while the target network maps all stages; behind a fusion
(heads/models/fusion.py) F^K too, given beside the fused vector (an int `content`); on one pooled
embedding, that whole vector. Kept apart, the content sets the weights and the target network maps the
features with them: a score that multiplies two feature groups is a simple function for this head and
a hard one for an MLP (tests/heads/training/test_train.py). W_l v = sum_k c'_k (G_lk v) is computed as
one matmul of v with all G_lk, never one weight matrix per image.

On maps (`positions` P > 1, "eq16" only: App. A, Eq. 14-17 as published), x is [M, B, P, d_p] (the
fused v at each of the P locations, d = P x d_p) and the content F^K's map [M, B, P, C]. Eq. 14's 1 x 1
convolution makes each location's slab of W1 from that location's code, W1[p] = sum_k c'_pk G_1k
(d_p x 128), so W1 v = sum_p W1[p]^T v_p = G_1 . (sum_p v_p c'_p^T): the locations' outer products are
summed first (d_p x (C + 1) per image) and met with G_1 in one matmul, no W1 (d x 128) per image. The
biases and the later layers are generated from the code's global average (Eq. 15's GAP + FC).

Every tensor is [M, ...], row m drawn from member m's generator in a fixed order, and no operation mixes
rows: members train as if alone, as the MLP's do (heads/models/mlp.py).
"""

import math

import torch
from torch import nn

from iqa.heads.models.mlp import MemberDropout, StackedLinear, TopkMasked, member_seed

HYPER = "hyper"
CODE = 16  # width of iqa's content code c
TARGET_IN = 224  # HyperIQA's target-network input size
TARGET_HIDDEN = 128  # SMART-IQA's d_target (App. A)
# target -> (code width or None: the content itself, its activation, target input width or None: x itself, hidden widths)
TARGETS = {
    None: (CODE, "leaky_relu", TARGET_IN, (TARGET_HIDDEN,)),
    "eq16": (None, None, None, (TARGET_HIDDEN,)),
    "table4": (112, "relu", TARGET_IN, (112, 56)),
}
HYPER_TARGETS = ("eq16", "table4")
# generator weights per member: a larger eq16 head cannot be stacked. SMART-IQA's own fits (Swin-B, K = 4, on 7 x 7
# maps: 268.8 M; a training step at batch 32 peaked at 6.7 GB for one member on the CPU, Adam's moments included:
# benchmarks/smart_hyper_memory.py).
MAX_GENERATOR = 300_000_000


def hyper_recipe(layers: tuple[int, ...] | None = None, target: str | None = None, fused: bool = False,
                 positions: int = 1) -> dict:
    """The sizes, and on stored layers which one the hyper-network reads (part of a run's key): behind a
    fusion (`fused`) the deepest stage beside the fused vector; on maps (`positions`), location by location."""
    reads = ({"hyper_reads": "the deepest stage (F^K), beside the fused vector"} if fused
             else {"hyper_reads": "the deepest of the layers"} if layers else {})
    if positions > 1:
        reads["generation"] = (f"W1 slab per location of F^K's map ({positions}), biases and later layers from its GAP"
                               if target == "eq16" else "from the GAP of F^K's map, the target reading the GAP of v")
    if target is None:
        return {"code": CODE, "target_in": TARGET_IN, "target_hidden": TARGET_HIDDEN, "target_act": "sigmoid"} | reads
    code, act, target_in, hidden = TARGETS[target]
    return {"code": code or "the content features", "code_act": act, "target_in": target_in or "the input",
            "target_hidden": list(hidden), "target_act": "sigmoid", "generated": "linear in [code, 1]"} | reads


def check_hyper_target(head: str, target: str | None, dropout: str | None = None) -> None:
    if target is None:
        if head == HYPER and dropout is not None:
            raise ValueError("--act hyper takes no --dropout; the paper's variants (--hyper-target eq16|table4) take "
                             "--dropout input")
        return
    if head != HYPER:
        raise ValueError(f"--hyper-target sets the sizes of --act hyper, not of {head!r}")
    if target not in HYPER_TARGETS:
        raise ValueError(f"unknown --hyper-target {target!r}; choose from {', '.join(HYPER_TARGETS)}")
    if dropout not in (None, "input"):
        raise ValueError("the hyper head's dropout is --dropout input (on its code and target input)")


def generator_weights(in_dim: int, read: int, target: str | None) -> int:
    """The generated layers' weights per member (biases left out): every generated tensor linear in the
    `read`-wide content's code, on `in_dim` target inputs (per location on maps: the generator is shared)."""
    code, _, target_in, hidden = TARGETS[target]
    sizes = [target_in or in_dim, *hidden]
    return sum(n * ((code or read) + 1) * m for n, m in zip(sizes, sizes[1:] + [1]))


def generated_parameters(in_dim: int, target: str | None, positions: int = 1) -> int:
    """The target network's parameters generated per image (SMART-IQA's Eq. 17): each layer's weights and
    biases, the first layer reading every location's `in_dim` inputs (d = positions x in_dim)."""
    _, _, target_in, hidden = TARGETS[target]
    sizes = [(target_in or in_dim) * positions, *hidden, 1]
    return sum(n * m + m for n, m in zip(sizes, sizes[1:]))


def _uniform(generators: list[torch.Generator], shape: tuple[int, ...], bound: float) -> nn.Parameter:
    """[M, *shape], member m's block drawn from its own generator."""
    return nn.Parameter(torch.stack([torch.empty(shape).uniform_(-bound, bound, generator=g) for g in generators]))


class StackedHyper(TopkMasked, MemberDropout):
    """M hyper heads; they differ in seed, mask k and (paper variants) dropout keep.

    `content` (start, stop): the input columns the hyper-network reads; None reads all of them.
    Given, it is kept as the buffer `content_columns` ([M, 2]), so a saved head reads the same columns.
    An int `content`: the content is given to `forward` beside x instead (behind a fusion: F^K), this wide.
    `positions` P > 1 ("eq16"): x and the content are maps, [M, B, P, in_dim] and [M, B, P, content].
    Generated layer l's tensors are `w{l+1}` ([M, n_l, coded * n_{l+1}]; the output layer's [M, coded, n_L])
    and `b{l+1}` ([M, coded, n_{l+1}]), coded = code width + 1.
    """

    def __init__(self, in_dim: int, seeds: list[int], mask_k: list[float] | None = None, dropout: str | None = None,
                 content: tuple[int, int] | int | None = None, target: str | None = None,
                 keep: list[float] | None = None, positions: int = 1):
        super().__init__()
        check_hyper_target(HYPER, target, dropout)
        content_width = content if isinstance(content, int) else None
        content = None if content_width else content
        if positions > 1 and (target != "eq16" or content_width is None):
            raise ValueError("only --hyper-target eq16 reads maps (App. A, Eq. 14-17), and from a content map given beside them")
        members = len(seeds)
        self.seeds, self.dropout, self.target = list(seeds), dropout, target
        self.keep = [1.0] * members if keep is None or dropout is None else [float(p) for p in keep]
        if len(self.keep) != members or any(not 0 < p <= 1 for p in self.keep):
            raise ValueError("keep needs one value per member, each in (0, 1]")
        self.register_masks(mask_k, members)
        if content is not None:
            if not 0 <= content[0] < content[1] <= in_dim:
                raise ValueError(f"content columns {content} are not a part of the {in_dim} inputs")
            self.register_buffer("content_columns", torch.tensor([content] * members))  # [M, 2], as every entry
        self.content = None if content is None else slice(*map(int, content))
        self.content_width, self.positions = content_width, positions
        read = content_width or (in_dim if content is None else content[1] - content[0])
        code, self.code_act, target_in, hidden = TARGETS[target]
        self.sizes = [target_in or in_dim, *hidden]
        coded = (code or read) + 1
        generator = generator_weights(in_dim, read, target)
        if generator > MAX_GENERATOR:
            raise ValueError(f"--hyper-target {target} on {in_dim} features read from {read} needs {generator:,} generator "
                             f"weights per member (more than {MAX_GENERATOR:,}); use --hyper-target table4")

        init = [torch.Generator().manual_seed(member_seed(s, "init")) for s in seeds]
        self.code = None if code is None else StackedLinear(init, read, code)
        self.project = None if target_in is None else StackedLinear(init, in_dim, target_in)
        # generated layers start at nn.Linear's scale for their fan-in, shared across the code's entries
        fan_in = [self.sizes[0] * positions, *self.sizes[1:]]  # the first layer reads every location
        for l, (n, m) in enumerate(zip(self.sizes, self.sizes[1:])):
            setattr(self, f"w{l + 1}", _uniform(init, (n, coded * m), 1 / math.sqrt(fan_in[l] * coded)))
            setattr(self, f"b{l + 1}", _uniform(init, (coded, m), 1 / math.sqrt(fan_in[l] * coded)))
        out = len(self.sizes)
        setattr(self, f"w{out}", _uniform(init, (coded, self.sizes[-1]), 1 / math.sqrt(self.sizes[-1] * coded)))
        setattr(self, f"b{out}", _uniform(init, (coded, 1), 1 / math.sqrt(self.sizes[-1] * coded)))

    def _code(self, x: torch.Tensor, content: torch.Tensor | None) -> torch.Tensor:
        """c' = [c, 1]: [M, B, code width + 1] ([M, B, P, ...] on maps)."""
        c = content if self.content_width else x if self.content is None else x[..., self.content]
        if self.code is not None:
            c = getattr(nn.functional, self.code_act)(self.code(c))
        c = self._drop(c)
        return torch.cat([c, torch.ones_like(c[..., :1])], -1)

    def features(self, x: torch.Tensor, inputs_masked: bool = False, content: torch.Tensor | None = None) -> torch.Tensor:
        """The target network's last hidden layer, [M, B, its width] (for t-SNE)."""
        return self._hidden(x if inputs_masked else self.mask_inputs(x), content)[0]

    def _hidden(self, x: torch.Tensor, content: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._code(x, content)
        v = self._drop(x if self.project is None else self.project(x))
        m, b = c.shape[:2]
        for l, width in enumerate(self.sizes[1:]):
            w = getattr(self, f"w{l + 1}").to(v.dtype)
            if c.dim() == 4:  # on maps: sum_p W1[p]^T v_p as G_1 . (sum_p v_p c'_p^T); then the code's GAP
                pre = torch.bmm(torch.einsum("mbpn,mbpk->mbnk", v, c).reshape(m, b, -1), w.view(m, -1, width))
                c = c.mean(-2)
            else:
                pre = (c[..., None] * torch.bmm(v, w).view(m, b, -1, width)).sum(-2)  # G_lk v for every k
            v = torch.sigmoid(pre + torch.bmm(c, getattr(self, f"b{l + 1}").to(v.dtype)))
        return v, c

    def forward(self, x: torch.Tensor, inputs_masked: bool = False, content: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, B, in_dim] ([M, B, P, in_dim] on maps), and the content where given apart -> predicted quality [M, B]."""
        h, c = self._hidden(x if inputs_masked else self.mask_inputs(x), content)
        out = len(self.sizes)
        w = torch.bmm(c, getattr(self, f"w{out}").to(h.dtype))  # [M, B, last hidden width], generated per image
        b = torch.bmm(c, getattr(self, f"b{out}").to(h.dtype))[..., 0]
        return (w * h).sum(-1) + b
