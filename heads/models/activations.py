"""Head activations by name, for a stack of M heads whose hidden states are [M, batch, channels].

`lrelu` uses PyTorch's default negative slope 0.01: the paper names LeakyReLU without a slope.
`gated` is the paper's GatedActivation (Eq. 3), learnable per member and per channel.
"""

import torch
from torch import nn

ACTIVATIONS = ("lrelu", "sigmoid", "gelu", "tanh", "relu", "gated")

# Eq. 3 initial values (Sec. 4): equal mixing, sigmoid branch in its natural state, scale 2, slope 0.25.
GATE_INIT = {"alpha": 1.0, "beta": 0.0, "gamma": 2.0, "a": 0.25, "g": 0.0}


class GatedActivation(nn.Module):
    """y = s(g) * gamma * sigmoid(alpha * x + beta) + (1 - s(g)) * LeakyReLU_a(x), per channel.

    Each of the five parameters is one [M, C] tensor, row m belonging to member m. The parameters
    and the arithmetic stay float32 under autocast and after `.half()`/`.to(bfloat16)` (Suppl. B.1).
    """

    def __init__(self, members: int, channels: int):
        super().__init__()
        for name, value in GATE_INIT.items():
            setattr(self, name, nn.Parameter(torch.full((members, channels), value)))

    def member_tensors(self, m: int) -> list[torch.Tensor]:
        """Member m's alpha, beta, gamma, a, g (views into the stacked parameters)."""
        return [getattr(self, name)[m] for name in GATE_INIT]

    def _apply(self, fn, recurse=True):
        # Device moves apply; dtype casts do not: the gate stays float32 whatever the weights become.
        super()._apply(fn, recurse)
        for p in self.parameters():
            p.data = p.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            alpha, beta, gamma, a, g = (getattr(self, name)[:, None, :] for name in GATE_INIT)
            x32 = x.float()
            mix = torch.sigmoid(g)
            leaky = torch.where(x32 >= 0, x32, a * x32)
            y = mix * (gamma * torch.sigmoid(alpha * x32 + beta)) + (1 - mix) * leaky
        return y.to(x.dtype)


def make_activation(name: str, members: int, channels: int) -> nn.Module:
    if name == "gated":
        return GatedActivation(members, channels)
    plain = {"lrelu": nn.LeakyReLU(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "tanh": nn.Tanh(), "relu": nn.ReLU()}
    if name not in plain:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return plain[name]


def activation_member_tensors(act: nn.Module, m: int) -> list[torch.Tensor]:
    """The learnable parameters of member m (none for the plain activations)."""
    return act.member_tensors(m) if isinstance(act, GatedActivation) else []
