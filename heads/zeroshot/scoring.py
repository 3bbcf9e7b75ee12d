"""CLIP-IQA scoring: for each antonym pair, the softmax of the model's own logits over (positive,
negative), the positive's probability; the image's score is the mean over the set's pairs.

The logits are what the model itself computes: cosine similarity of the unit-length image and text
embeddings times exp(logit_scale), plus logit_bias for SigLIP. Within a two-way softmax a bias
shared by both prompts cancels, so SigLIP's bias changes no score; the scale does (it sharpens the
probabilities, and so their mean over pairs), which is why the model's own is used.
"""

import torch
from torch.nn import functional as F


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
