"""Learned prompts (CLIP-IQA+): context vectors in front of each prompt of the antonym pairs,
trained on the cached image embeddings with the text tower frozen.

As in CoOp and CLIP-IQA+ (Wang et al., AAAI 2023, Sec. 3.3), each prompt gets its own `context`
word vectors (16, drawn from N(0, 0.02^2)) placed right after the start token, where a written
prompt's first words would be; the prompt's own words follow, so training starts from the written
pair with a random preamble. Only the context vectors train: the prompts run through the model's own
text tower (a hook puts the vectors in place of the placeholder tokens' embeddings) and are scored
against the stored image embeddings with the model's own logit scale and bias (scoring.py).

Training follows the heads' core: the loss of heads/training/loss.py, each epoch's row order from
(seed, epoch) (`epoch_order`) in full batches, the learning-rate milestones of the training set,
and the epoch kept by the heads' selection rules (heads/training/selection.py); the kept epoch's
text embeddings are the run's weights, so scoring an image afterwards needs its image embedding only.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from iqa.heads.models.mlp import member_seed
from iqa.heads.training.config import OPTIMIZERS
from iqa.heads.training.loss import LOSSES, iqa_loss
from iqa.heads.training.selection import check_rule, improved
from iqa.heads.training.trainer import (RunResult, epoch_metrics, epoch_order, make_optimizer, make_scheduler,
                                        new_curves, record_epoch, result_from_curves)
from iqa.heads.zeroshot.scoring import zero_shot_scores
from iqa.heads.zeroshot.text import pad_inputs, text_features

CONTEXT_TOKENS = 16  # CoOp's and CLIP-IQA+'s context length
CONTEXT_STD = 0.02  # CoOp's initialisation


class PromptLearner(nn.Module):
    """Text embeddings [2P, D] of `prompts`, each behind `context` learned word vectors; the model stays frozen."""

    def __init__(self, model, kind: str, tokenizer, prompts: list[str], context: int, seed: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        ids = []
        for prompt in prompts:
            row = tokenizer(prompt, truncation=True)["input_ids"]
            words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            first = int(row[:1] != words[:1])  # 1 behind a start token
            # placeholders (a word of the prompt: never an end token the tower pools at), replaced by the hook
            ids.append(row[:first] + [words[0]] * context + row[first:])
        self.inputs = pad_inputs(tokenizer, model, kind, ids)
        self.span = slice(first, first + context)
        self.embedding = model.text_model.get_input_embeddings()
        generator = torch.Generator().manual_seed(member_seed(seed, "prompts"))
        self.context = nn.Parameter(torch.randn(len(prompts), context, self.embedding.embedding_dim,
                                                generator=generator) * CONTEXT_STD)
        self.logit_scale = float(model.logit_scale)
        self.logit_bias = float(model.logit_bias) if hasattr(model, "logit_bias") else 0.0

    def _place_context(self, module, args, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, : self.span.start], self.context.to(out.dtype), out[:, self.span.stop :]], dim=1)

    def forward(self) -> torch.Tensor:
        hook = self.embedding.register_forward_hook(self._place_context)  # only for this pass through the tower
        try:
            return text_features(self.model, {k: v.to(self.context.device) for k, v in self.inputs.items()})
        finally:
            hook.remove()


@dataclass(frozen=True)
class LearnSettings:
    """What a learned-prompts run trains with; the heads' names and defaults where they share one."""

    context: int = CONTEXT_TOKENS
    epochs: int = 30
    lr: float = 2e-3  # CoOp's learning rate for context vectors
    batch_size: int = 12
    micro_batch: int | None = 2
    loss: str = "mse+margin"
    optimizer: str = "adam"
    select: str = "test"
    val_fraction: float = 0.1

    def __post_init__(self):
        check_rule(self.select)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")

    def check_rows(self, n_train: int) -> None:
        if n_train < self.batch_size:
            raise ValueError(f"{n_train} training rows cannot fill one batch of {self.batch_size}; give a smaller --batch-size")


def train_prompts(learner: PromptLearner, images: torch.Tensor, targets: np.ndarray, train_rows: np.ndarray,
                  test_rows: np.ndarray, val_rows: np.ndarray | None, seed: int, settings: LearnSettings,
                  milestones: tuple[int, ...]) -> RunResult:
    """One run: the context vectors trained on `train_rows`; the kept epoch's text embeddings, context,
    scale and bias in RunResult.weights."""
    s = settings
    s.check_rows(len(train_rows))
    y = torch.as_tensor(targets, dtype=torch.float32, device=images.device)
    optimizer = make_optimizer([{"params": [learner.context], "lr": s.lr}], s.optimizer)
    scheduler = make_scheduler(optimizer, milestones)
    curve = new_curves(validation=val_rows is not None)
    kept, kept_score, diverged = None, [-np.inf], None
    scale, bias = learner.logit_scale, learner.logit_bias
    for epoch in range(s.epochs):
        lr = optimizer.param_groups[0]["lr"]
        order = epoch_order(train_rows, seed, epoch)
        steps = len(order) // s.batch_size
        total = 0.0
        for rows in order[: steps * s.batch_size].reshape(steps, s.batch_size):
            pred = zero_shot_scores(images[rows], learner(), scale, bias)
            loss = iqa_loss(pred[None], y[rows][None], s.micro_batch, s.loss)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        with torch.no_grad():
            text = learner()
            scores = zero_shot_scores(images, text, scale, bias)
        if not (np.isfinite(total) and torch.isfinite(scores[test_rows]).all()):  # rows of failed images are NaN
            diverged = epoch + 1
            break
        (test_srcc,), (test_plcc,) = epoch_metrics(scores[test_rows][None], y[test_rows][None])
        validation = {}
        if val_rows is not None:
            (val_srcc,), (val_plcc,) = epoch_metrics(scores[val_rows][None], y[val_rows][None])
            validation = {"val_srcc": val_srcc, "val_plcc": val_plcc}
        chosen = validation["val_srcc"] if s.select == "val" else test_srcc
        if improved([chosen], kept_score, s.select)[0]:
            kept_score = [chosen]
            kept = {"text_embeddings": text.detach().cpu(), "context": learner.context.detach().cpu(),
                    "logit_scale": torch.tensor([scale]), "logit_bias": torch.tensor([bias])}  # scoring.TextHead's
        record_epoch(curve, train_loss=total / steps, srcc=test_srcc, plcc=test_plcc, lr=lr, **validation)
        scheduler.step()
    curve["test_images"] = len(test_rows)  # as heads record theirs: tables name the test-split size
    result = result_from_curves(curve, diverged, None, s.select)
    result.weights = kept if result.status == "done" else None
    return result
