"""Gated activation, masking, loss and metrics against straightforward reference computations."""

import itertools

import numpy as np
import pytest
import scipy.stats
import torch

from iqa.heads.models.activations import GatedActivation, make_activation
from iqa.heads.training.loss import iqa_loss
from iqa.heads.training.metrics import plcc, srcc
from iqa.heads.models.mlp import HEADS, StackedMLP, topk_mask


def test_gated_activation_is_eq3_per_member_and_channel():
    torch.manual_seed(0)
    gate = GatedActivation(members=2, channels=3)
    assert gate.alpha.shape == (2, 3)
    assert [getattr(gate, n)[0, 0].item() for n in ("alpha", "beta", "gamma", "a", "g")] == [1, 0, 2, 0.25, 0]
    with torch.no_grad():
        for name in ("alpha", "beta", "gamma", "a", "g"):
            for p in getattr(gate, name):
                p.copy_(torch.randn(3))
    x = torch.randn(2, 4, 3)
    y = gate(x).detach()
    for m, b, c in itertools.product(range(2), range(4), range(3)):
        alpha, beta, gamma, a, g = (float(getattr(gate, n)[m][c].detach()) for n in ("alpha", "beta", "gamma", "a", "g"))
        v = float(x[m, b, c])
        w = 1 / (1 + np.exp(-g))
        expected = w * gamma / (1 + np.exp(-(alpha * v + beta))) + (1 - w) * (v if v >= 0 else a * v)
        assert float(y[m, b, c]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_gate_parameters_stay_float32_under_bf16_autocast_and_casts():
    model = StackedMLP(8, [8, 19], "gated", "gated", hidden=16)
    model.to(torch.bfloat16)
    assert model.layer1.weight[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for act in (model.act1, model.act2) for p in act.parameters())
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 5, 8))
        out.float().sum().backward()
    gate_params = list(model.act1.parameters())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in gate_params)
    assert any(p.grad.abs().sum() > 0 for p in gate_params)


def test_plain_activations_and_named_variants():
    x = torch.tensor([-2.0, 3.0])
    assert make_activation("lrelu", 1, 2)(x).tolist() == pytest.approx([-0.02, 3.0])  # PyTorch's slope 0.01
    assert HEADS == {"baseline": ("lrelu", "lrelu"), "sig": ("sigmoid", "lrelu"), "gated": ("gated", "gated")}
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("swish", 1, 2)


def test_topk_mask_keeps_each_samples_largest_magnitudes():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40)
    ks = [100.0, 30.0, 10.0]
    masked = topk_mask(x, torch.tensor(ks))
    for m, k in enumerate(ks):
        count = int(np.ceil(k / 100 * 40))
        for b in range(5):
            row = x[m, b].numpy()
            expected = np.zeros_like(row)
            top = np.argsort(-np.abs(row))[:count]
            expected[top] = row[top]
            np.testing.assert_array_equal(masked[m, b].numpy(), expected)


def test_stacked_mlp_member_equals_reference_mlp_and_is_seed_determined():
    torch.manual_seed(0)
    stack = StackedMLP(6, [8, 19], "sigmoid", "lrelu", mask_k=[100, 50], hidden=16)
    alone = StackedMLP(6, [19], "sigmoid", "lrelu", mask_k=[50], hidden=16)
    for a, b in zip(stack.member_tensors(1), alone.member_tensors(0)):
        assert torch.equal(a, b)  # initialisation comes from the member's own seed
    x = torch.randn(2, 4, 6)
    out = stack(x)
    for m in range(2):
        w1, b1, w2, b2, w3, b3 = stack.member_tensors(m)
        xm = topk_mask(x[m : m + 1], stack.mask_k[m : m + 1])[0]
        h = torch.sigmoid(xm @ w1 + b1)
        h = torch.nn.functional.leaky_relu(h @ w2 + b2)
        torch.testing.assert_close(out[m], (h @ w3 + b3).squeeze(-1))
    assert stack.features(x).shape == (2, 4, 16)


def reference_loss(p, s):
    """Eq. 1-2 with loops, std with ddof=1."""
    n = len(p)
    m = 0.25 * np.std(s, ddof=1)
    pairs = [max(0.0, -np.sign(s[i] - s[j]) * (p[i] - p[j]) + m) for i in range(n) for j in range(i + 1, n)]
    return np.mean((p - s) ** 2) + 2 / (n * (n - 1)) * sum(pairs)


def test_loss_matches_loops_for_micro_batches_and_whole_batch():
    rng = np.random.default_rng(0)
    pred = rng.random((3, 12))
    target = rng.random((3, 12))
    target[0, 3] = target[0, 2]  # a tie inside a micro-batch: sgn = 0, the pair costs m
    target[1, :] = np.repeat(rng.random(6), 2)  # every micro-batch tied: m = 0
    micro = iqa_loss(torch.tensor(pred), torch.tensor(target), micro_batch=2).numpy()
    whole = iqa_loss(torch.tensor(pred), torch.tensor(target), micro_batch=None).numpy()
    for k in range(3):
        expected_micro = np.mean([reference_loss(pred[k, i : i + 2], target[k, i : i + 2]) for i in range(0, 12, 2)])
        assert micro[k] == pytest.approx(expected_micro, rel=1e-5)
        assert whole[k] == pytest.approx(reference_loss(pred[k], target[k]), rel=1e-5)
    with pytest.raises(ValueError):
        iqa_loss(torch.zeros(1, 12), torch.zeros(1, 12), micro_batch=5)


def test_srcc_and_plcc_equal_scipy_with_ties():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 20, 200).astype(float)  # many ties
    pred = np.stack([rng.integers(0, 30, 200), target + rng.normal(size=200), -target]).astype(float)
    got_s = srcc(torch.tensor(pred), torch.tensor(target)).numpy()
    got_p = plcc(torch.tensor(pred), torch.tensor(target)).numpy()
    for m in range(3):
        assert got_s[m] == pytest.approx(scipy.stats.spearmanr(pred[m], target)[0], abs=1e-12)
        assert got_p[m] == pytest.approx(scipy.stats.pearsonr(pred[m], target)[0], abs=1e-12)
    bad = torch.tensor([[np.nan, 1.0, 2.0], [1.0, 1.0, 1.0]])
    assert torch.isnan(srcc(bad, torch.tensor([1.0, 2.0, 3.0]))).all()
