"""SMART-IQA's loss study (Table VII) beside mse and l1, each by hand; and the batch of 32."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, pearsonr, rankdata

from iqa.cache.results import ResultsDB
from iqa.heads.training.config import RunConfig, run_key
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from iqa.heads.training.loss import MARGIN_SCALE, SOFT_RANK_TEMPERATURE, iqa_loss, soft_ranks
from helpers import fake_cache


def batch(seed=0, members=2, size=8):
    rng = np.random.default_rng(seed)
    s = np.round(rng.uniform(size=(members, size)), 1)  # ties among the targets
    return rng.uniform(size=(members, size)), s


def pairs(n):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def test_fidelity_is_tsai_et_al_by_hand():
    p, s = batch()
    got = iqa_loss(torch.as_tensor(p), torch.as_tensor(s), micro_batch=None, loss="fidelity").numpy()
    for m in range(len(p)):
        terms = []
        for i, j in pairs(p.shape[1]):
            predicted = norm.cdf((p[m, i] - p[m, j]) / math.sqrt(2))
            wanted = 1.0 if s[m, i] > s[m, j] else 0.5 if s[m, i] == s[m, j] else 0.0
            terms.append(1 - math.sqrt(wanted * predicted) - math.sqrt((1 - wanted) * (1 - predicted)))
        assert got[m] == pytest.approx(np.mean(terms), abs=1e-5)


def test_rank_is_the_margin_term_alone_by_hand_per_micro_batch():
    p, s = batch(1)
    got = iqa_loss(torch.as_tensor(p), torch.as_tensor(s), micro_batch=4, loss="rank").numpy()
    for m in range(len(p)):
        groups = []
        for g in range(2):
            pg, sg = p[m, 4 * g:4 * g + 4], s[m, 4 * g:4 * g + 4]
            margin = MARGIN_SCALE * np.std(sg, ddof=1)
            groups.append(np.mean([max(0.0, -np.sign(sg[i] - sg[j]) * (pg[i] - pg[j]) + margin) for i, j in pairs(4)]))
        assert got[m] == pytest.approx(np.mean(groups), abs=1e-6)
    mse = iqa_loss(torch.as_tensor(p), torch.as_tensor(s), micro_batch=4, loss="mse").numpy()
    both = iqa_loss(torch.as_tensor(p), torch.as_tensor(s), micro_batch=4).numpy()
    np.testing.assert_allclose(both, mse + got, rtol=1e-6)  # the paper's loss is mse + this


def test_srcc_loss_is_one_minus_pearson_of_soft_ranks_and_nears_the_true_srcc():
    p, s = batch(2)
    got = iqa_loss(torch.as_tensor(p), torch.as_tensor(s), micro_batch=None, loss="srcc").numpy()
    for m in range(len(p)):
        soft = [0.5 + sum(1 / (1 + math.exp(-(p[m, i] - p[m, j]) / SOFT_RANK_TEMPERATURE)) for j in range(p.shape[1]))
                for i in range(p.shape[1])]
        assert got[m] == pytest.approx(1 - pearsonr(soft, rankdata(s[m]))[0], abs=1e-5)
    far_apart = torch.tensor([[0.0, 1.0, 2.0, 3.0, 5.0]])  # gaps >> temperature: soft ranks are the ranks
    np.testing.assert_allclose(soft_ranks(far_apart)[0].numpy(), [1, 2, 3, 4, 5], atol=1e-6)
    pred = torch.tensor(p, requires_grad=True)
    iqa_loss(pred, torch.as_tensor(s), micro_batch=None, loss="srcc").sum().backward()
    assert pred.grad.abs().sum() > 0  # differentiable


def test_batch_32_and_the_new_losses_train_and_are_keyed_apart(tmp_path):
    base = RunConfig("clive", "clive", "siglip2", "baseline", "lrelu", "lrelu", 8)
    assert base.batch_size == 12 and "soft_rank_temperature" not in base.recipe()
    keys = {run_key(RunConfig("clive", "clive", "siglip2", "baseline", "lrelu", "lrelu", 8, batch_size=b, micro_batch=m,
                              loss=loss), "f", "r")
            for b, m, loss in ((12, 2, "mse+margin"), (32, 2, "mse+margin"), (32, 32, "srcc"), (32, 32, "fidelity"))}
    assert len(keys) == 4
    configs = expand_grid([("clive", "clive")], "siglip2", head_choices(["baseline"], []), [8], epochs=2, batch_size=32,
                          micro_batch=32, loss="srcc")
    (record,) = run_grid(configs, lambda name: fake_cache("clive", n=150), ResultsDB(tmp_path / "r.sqlite"),
                         progress=False)
    assert record["status"] == "done" and record["batch_size"] == 32 and record["loss"] == "srcc"

