"""CLIP-IQA scoring: for each antonym pair, the softmax of the model's own logits over (positive,
negative), the positive's probability; the image's score is the mean over the set's pairs.

The logits are what the model itself computes: cosine similarity of the unit-length image and text
embeddings times exp(logit_scale), plus logit_bias for SigLIP. Within a two-way softmax a bias
shared by both prompts cancels, so SigLIP's bias changes no score; the scale does (it sharpens the
probabilities, and so their mean over pairs), which is why the model's own is used.
"""

import torch
from torch import nn
from torch.nn import functional as F

TEXT_HEADS = ("zeroshot", "learned-prompts")  # runs whose kept weights are text embeddings (TextHead)


def pair_logits(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """[N, D] image and [2P, D] text embeddings (positive, negative of each pair in turn) -> logits [N, P, 2]."""
    cosine = F.normalize(images.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).T
    logits = cosine * torch.as_tensor(logit_scale, dtype=cosine.dtype).exp() + logit_bias
    return logits.reshape(len(images), -1, 2)


def zero_shot_scores(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor | float,
                     logit_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Each image's quality in [0, 1]: the positive prompt's two-way softmax probability, averaged over pairs."""
    return pair_logits(images, texts, logit_scale, logit_bias).softmax(-1)[..., 0].mean(-1)


class TextHead(nn.Module):
    """A zero-shot or learned-prompts run as a head (the interface of heads/saved: [1, B, D] -> [1, B]):
    its text embeddings [2P, D], the model's logit scale and bias, scoring image embeddings as above."""

    def __init__(self, text_embeddings: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor):
        super().__init__()
        self.register_buffer("text_embeddings", text_embeddings.float())
        self.register_buffer("logit_scale", logit_scale.float().reshape(1))
        self.register_buffer("logit_bias", logit_bias.float().reshape(1))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "TextHead":
        """From a run's kept weights (a learned run's `context` is kept for reference, not needed to score)."""
        return cls(state["text_embeddings"], state["logit_scale"], state["logit_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_shot_scores(x[0], self.text_embeddings, self.logit_scale, self.logit_bias)[None]
