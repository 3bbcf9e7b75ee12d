"""The stacked trainer: members train as if alone, reproducibly, and a diverging member stops alone."""

import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from iqa.heads.models.mlp import StackedMLP
from iqa.heads.training.config import LARGE_MILESTONES, lr_milestones, run_key
from iqa.heads.training.loss import iqa_loss
from iqa.heads.training.trainer import (MaskedPools, Member, PoolCache, StackData, masked_pool, train_stack, train_stack_model,
                             train_statistics)


def learnable_set(n=300, d=32, seed=0):
    """Targets a smooth function of the embedding, so a head can learn them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = 1 / (1 + np.exp(-x @ rng.normal(size=d) / 4))
    return x, y


def data_for(x, y, members, n_train=240):
    train = np.stack([np.arange(n_train)] * members)
    test = np.stack([np.arange(n_train, len(x))] * members)
    return StackData(x, y, train, x, y, test)


def test_member_trained_alone_matches_member_inside_a_stack_over_100_steps():
    x, y = learnable_set()  # 240 train rows / batch 12 = 20 steps per epoch, 5 epochs = 100 steps
    mates = [Member(19, mask_k=50), Member(8), Member(25, keep=0.5)]
    for act, dropout in (("lrelu", None), ("gated", "layers")):
        alone = train_stack(data_for(x, y, 1), [Member(8)], act, act, dropout, hidden=64, epochs=5)[0]
        stacked = train_stack(data_for(x, y, 3), mates, act, act, dropout, hidden=64, epochs=5)[1]
        assert stacked.curves["train_loss"] == pytest.approx(alone.curves["train_loss"], rel=1e-5)
        assert stacked.last_srcc == pytest.approx(alone.last_srcc, abs=1e-5)
        assert stacked.last_plcc == pytest.approx(alone.last_plcc, abs=1e-5)
        if act == "gated":
            np.testing.assert_allclose(stacked.gates["act1"]["g"], alone.gates["act1"]["g"], atol=1e-6)
            assert alone.gates["act1"]["g"] != [0.0] * 64  # the gate did learn


def test_same_seed_same_result_other_seed_differs():
    x, y = learnable_set()
    runs = [train_stack(data_for(x, y, 1), [Member(s)], "sigmoid", "lrelu", hidden=64, epochs=2)[0] for s in (8, 8, 19)]
    assert runs[0].curves == runs[1].curves
    assert runs[0].curves["train_loss"] != runs[2].curves["train_loss"]


def test_training_learns_and_reports_best_and_last_epoch():
    x, y = learnable_set()
    result = train_stack(data_for(x, y, 1), [Member(8, lr=3e-3)], hidden=64, epochs=4)[0]
    assert result.status == "done"
    assert len(result.curves["srcc"]) == 4
    assert result.best_srcc == max(result.curves["srcc"]) > 0.8
    assert result.best_epoch == 1 + result.curves["srcc"].index(result.best_srcc)
    assert result.best_plcc == result.curves["plcc"][result.best_epoch - 1]
    assert (result.last_srcc, result.last_plcc) == (result.curves["srcc"][-1], result.curves["plcc"][-1])
    assert result.curves["train_loss"][-1] < result.curves["train_loss"][0]


def test_diverging_member_stops_alone_and_the_others_go_on():
    x, y = learnable_set()
    healthy_alone = train_stack(data_for(x, y, 1), [Member(8)], hidden=64, epochs=2)[0]
    # The second member's training rows include an embedding of infinities: its loss is NaN at once.
    poisoned = np.concatenate([x, np.full((1, x.shape[1]), np.inf, dtype=x.dtype)])
    data = data_for(poisoned, np.append(y, 0.5), 2)
    data.train_rows[1, 0] = len(x)
    data.test_rows = data.test_rows[:, :-1]  # both test on the finite rows
    healthy, exploding = train_stack(data, [Member(8), Member(19)], hidden=64, epochs=2)
    assert exploding.status == "diverged" and exploding.diverged_epoch == 1
    assert exploding.best_srcc is None and exploding.last_srcc is None
    assert healthy.status == "done"
    assert healthy.curves["train_loss"] == pytest.approx(healthy_alone.curves["train_loss"], rel=1e-5)


def test_multistep_schedule_for_large_sets_and_constant_for_small():
    assert lr_milestones("koniq10k") == LARGE_MILESTONES and lr_milestones("clive") == ()
    member = Member(8, lr=1e-4, milestones=(2, 3))
    x, y = learnable_set()
    decayed, constant = (train_stack(data_for(x, y, 1), [m], hidden=64, epochs=4)[0] for m in (member, Member(8, lr=1e-4)))
    assert decayed.curves["lr"] == pytest.approx([1e-4, 1e-4, 2e-5, 4e-6])
    assert constant.curves["lr"] == pytest.approx([1e-4] * 4)
    assert decayed.curves["train_loss"][:2] == pytest.approx(constant.curves["train_loss"][:2], rel=1e-5)
    assert decayed.curves["train_loss"][2] != pytest.approx(constant.curves["train_loss"][2], rel=1e-5)
    with pytest.raises(ValueError, match="one learning-rate schedule"):
        train_stack(data_for(x, y, 2), [member, Member(8, lr=1e-4)], hidden=64, epochs=1)


def test_rows_must_match_members():
    x, y = learnable_set()
    with pytest.raises(ValueError, match="one row list per member"):
        train_stack(data_for(x, y, 1), [Member(8), Member(19)], hidden=64, epochs=1)


def test_pools_masked_once_give_the_inputs_per_step_masking_gives():
    x = torch.randn(50, 40)
    model = StackedMLP(40, [8, 19, 25], mask_k=[30, 100, 30], hidden=8)
    pools = MaskedPools(model, x, chunk=16)  # chunks smaller than the pool
    assert pools.pools.shape == (2, 50, 40)  # one pool per distinct k
    rows = torch.randint(0, 50, (3, 12))
    torch.testing.assert_close(pools.rows(rows), model.mask_inputs(x[rows]), rtol=0, atol=0)
    unmasked = MaskedPools(StackedMLP(40, [8, 19], hidden=8), x)
    assert torch.equal(unmasked.rows(rows[:2]), x[rows[:2]])


def test_stacks_sharing_a_pool_cache_mask_each_k_once_and_train_as_without_it(monkeypatch):
    x, y = learnable_set()
    made = []
    real = masked_pool
    monkeypatch.setattr("iqa.heads.training.trainer.masked_pool", lambda *a, **k: made.append(1) or real(*a, **k))
    stacks = [[Member(8, mask_k=50), Member(19)], [Member(25, mask_k=50), Member(8, mask_k=30)]]
    alone = [train_stack(data_for(x, y, 2), members, hidden=32, epochs=2) for members in stacks]
    assert len(made) == 3  # k 50 for each stack, k 30 once; k 100 is the pool itself
    made.clear()
    cache, data = PoolCache(), data_for(x, y, 2)
    shared = [train_stack(data, members, hidden=32, epochs=2, pools=cache) for members in stacks]
    assert len(made) == 2  # k 50 masked once for both stacks
    assert [[r.curves for r in rs] for rs in shared] == [[r.curves for r in rs] for rs in alone]
    small = PoolCache(max_bytes=x.nbytes)  # room for one pool: the oldest goes
    first = small.get(x, ("a",), lambda: torch.as_tensor(x))
    small.get(x, ("b",), lambda: torch.as_tensor(x).clone())
    assert small.get(x, ("a",), lambda: torch.zeros(1)).shape == (1,) and first.shape == x.shape
    copy = x.copy()  # a pool made for one stack: its entries go with it
    small.get(copy, ("a",), lambda: torch.ones(1))
    del copy
    assert len(small) == 1
    held = weakref.ref(small)
    del small  # x outlives the cache and does not keep it
    assert held() is None


def test_loss_choices_are_what_they_say():
    pred, target = torch.tensor([[0.1, 0.5, 0.2, 0.9]]), torch.tensor([[0.3, 0.4, 0.6, 0.8]])
    assert iqa_loss(pred, target, 2, "l1").item() == pytest.approx((pred - target).abs().mean().item())
    assert iqa_loss(pred, target, 2, "mse").item() == pytest.approx((pred - target).pow(2).mean().item())
    # the ranking term: pair (0.1, 0.5) is ordered like its targets (0.3 < 0.4): hinge max(0, -0.4 + m);
    # pair (0.2, 0.9) likewise; m = 0.25 * std of each pair's targets
    margins = [0.25 * abs(0.3 - 0.4) / np.sqrt(2), 0.25 * abs(0.6 - 0.8) / np.sqrt(2)]
    ranking = np.mean([max(0, -0.4 + margins[0]), max(0, -0.7 + margins[1])])
    assert iqa_loss(pred, target, 2).item() == pytest.approx((pred - target).pow(2).mean().item() + ranking)
    with pytest.raises(ValueError, match="unknown loss"):
        iqa_loss(pred, target, 2, "huber")


def test_a_stack_member_trains_alone_under_each_loss_and_adamw():
    """Loss and optimizer options keep members independent: alone and in a stack agree."""
    x, y = learnable_set()
    for options in ({"loss": "l1"}, {"loss": "mse"}, {"optimizer": "adamw", "weight_decay": 0.05}):
        alone = train_stack(data_for(x, y, 1), [Member(8)], hidden=64, epochs=2, **options)[0]
        _, inside = train_stack(data_for(x, y, 2), [Member(19), Member(8)], hidden=64, epochs=2, **options)
        assert inside.curves["train_loss"] == pytest.approx(alone.curves["train_loss"], rel=1e-4), options
    paper = train_stack(data_for(x, y, 1), [Member(8)], hidden=64, epochs=2)[0]
    decayed = train_stack(data_for(x, y, 1), [Member(8)], hidden=64, epochs=2, optimizer="adamw", weight_decay=0.05)[0]
    assert decayed.curves["train_loss"][1] != pytest.approx(paper.curves["train_loss"][1], rel=1e-6)


def test_standardize_uses_each_members_own_train_rows_only():
    x, y = learnable_set()
    x = x * np.linspace(0.01, 10, x.shape[1], dtype=np.float32) + 3  # features of mixed scale
    data = data_for(x, y, 2)
    data.train_rows[1] = np.arange(60, 300)  # member 1 trains on other rows (and tests on rows it trained on: no matter here)
    stats = train_statistics(torch.as_tensor(x), data.train_rows)
    np.testing.assert_allclose(stats[0][0].numpy(), x[:240].mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats[1][1].numpy(), x[60:300].std(0), rtol=1e-4)
    # changing rows no member trains on changes nothing: test rows never enter the statistics
    shifted = x.copy()
    shifted[240:] += 100.0
    again = train_statistics(torch.as_tensor(shifted), data.train_rows[:1])
    np.testing.assert_allclose(again[0][0].numpy(), stats[0][0].numpy())
    alone = train_stack(data_for(x, y, 1), [Member(8)], hidden=64, epochs=2, standardize=True)[0]
    _, inside = train_stack(data_for(x, y, 2), [Member(19, mask_k=50), Member(8)], hidden=64, epochs=2, standardize=True)
    assert inside.curves["train_loss"] == pytest.approx(alone.curves["train_loss"], rel=1e-4)
    raw = train_stack(data_for(x, y, 1), [Member(8)], hidden=64, epochs=2)[0]
    assert alone.curves["train_loss"][0] != pytest.approx(raw.curves["train_loss"][0], rel=1e-3)


def test_hyper_head_trained_alone_matches_it_inside_a_stack_and_reloads(tmp_path, one_thread):
    from iqa.heads.saved.weights import load_head, save_head

    x, y = learnable_set()
    alone = train_stack(data_for(x, y, 1), [Member(8, lr=1e-3)], "hyper", "hyper", epochs=3)[0]
    stacked = train_stack(data_for(x, y, 2), [Member(19, mask_k=50, lr=1e-3), Member(8, lr=1e-3)], "hyper", "hyper", epochs=3)[1]
    assert stacked.curves["train_loss"] == pytest.approx(alone.curves["train_loss"], rel=1e-4)
    assert stacked.last_srcc == pytest.approx(alone.last_srcc, abs=1e-5)
    assert alone.curves["srcc"][-1] > alone.curves["srcc"][0] + 0.1 and alone.best_srcc > 0.7  # it learns
    config = {"head": "hyper", "act1": "hyper", "act2": "hyper", "seed": 8, "mask_k": 100.0, "dropout": None, "keep": 1.0}
    head, _ = load_head(save_head(tmp_path / "head.safetensors", alone.weights, config))
    with torch.no_grad():
        pred = head(torch.as_tensor(x[240:])[None])
    from iqa.heads.training.metrics import srcc

    assert float(srcc(pred, torch.as_tensor(y[240:])[None])[0]) == pytest.approx(alone.best_srcc, abs=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        train_stack(data_for(x, y, 1), [Member(8)], "hyper", "hyper", "layers", epochs=1)


def test_fused_head_trained_alone_matches_it_inside_a_stack_and_reloads_with_its_stage_weights(tmp_path, one_thread):
    """--fuse attention: the fusion in front of the MLP trains as if alone inside a stack (with a gated MLP,
    a masked mate and a dropout mate), learns, reloads from disk to the recorded predictions, and records
    per test row the kept epoch's stage weights (a softmax: one weight per stage, summing to 1)."""
    from iqa.heads.models.fusion import StackedFusion
    from iqa.heads.training.metrics import srcc
    from iqa.heads.saved.weights import load_head, save_head

    x, y = learnable_set()
    stages = ((2, 20), (1, 12))  # input = layer 2's 20 columns then layer 1's 12: the deepest is named first
    fused = dict(epochs=3, hidden=64, fuse="attention")

    def data(members):
        d = data_for(x, y, members)
        d.stages = stages
        return d

    alone = train_stack(data(1), [Member(8, lr=1e-3)], "gated", "gated", "layers", **fused)[0]
    mates = [Member(19, mask_k=50, lr=1e-3), Member(8, lr=1e-3), Member(25, keep=0.5, lr=1e-3)]
    stacked = train_stack(data(3), mates, "gated", "gated", "layers", **fused)[1]
    assert stacked.curves["train_loss"] == pytest.approx(alone.curves["train_loss"], rel=1e-4)
    assert stacked.last_srcc == pytest.approx(alone.last_srcc, abs=1e-5)
    assert len(alone.curves["g_act1"]) == 3  # the MLP's gate is recorded behind the fusion too
    assert alone.best_srcc > 0.5 and alone.curves["srcc"][-1] > alone.curves["srcc"][0]  # it learns

    record = alone.curves["stage_weights"]
    weights = np.array(record["weights"])
    assert record["layers"] == [2, 1] and record["rows"] == list(range(240, 300))
    assert weights.shape == (60, 2) and np.allclose(weights.sum(1), 1, atol=1e-3) and weights.std(0).max() > 0
    np.testing.assert_allclose(record["target"], y[240:], atol=1e-4)
    np.testing.assert_allclose(stacked.curves["stage_weights"]["weights"], weights, atol=1e-3)

    config = {"head": "gated", "act1": "gated", "act2": "gated", "seed": 8, "mask_k": 100.0, "dropout": "layers",
              "keep": 1.0, "layers": [2, 1], "fuse": "attention"}
    head, _ = load_head(save_head(tmp_path / "head.safetensors", alone.weights, config))
    assert isinstance(head, StackedFusion) and head.deepest == 0
    with torch.no_grad():
        test_x = torch.as_tensor(x[240:])[None]
        pred, reloaded = head(test_x), head.stage_weights(test_x)[0].numpy()
    assert float(srcc(pred, torch.as_tensor(y[240:])[None])[0]) == pytest.approx(alone.best_srcc, abs=1e-6)
    np.testing.assert_allclose(reloaded, weights, atol=1e-4)  # recorded with the kept epoch's weights
    with pytest.raises(ValueError, match="widths"):
        d = data(1)
        d.stages = ((2, 20), (1, 11))
        train_stack(d, [Member(8)], **fused)


def product_set(n=800, content=2, quality=16, seed=0):
    """x = [a, b]: a 'content' group and a 'quality' group; the score is sigmoid(a^T M b), a product of the two."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, content)), rng.normal(size=(n, quality))
    z = np.einsum("ni,ij,nj->n", a, rng.normal(size=(content, quality)), b)
    return np.concatenate([a, b], 1).astype(np.float32), (1 / (1 + np.exp(-z / z.std()))).astype(np.float32)


def test_hyper_head_beats_the_mlp_when_the_score_multiplies_content_and_quality(one_thread):
    """Content-dependent weights: the hyper-network reads the content group and the target network maps
    the features with the weights it generates, so sigmoid(a^T M b) is a target network linear in b whose
    weights are linear in a; the MLP has to build the product from 300 rows (same seeds, epochs, lr)."""
    x, y = product_set()
    members = [Member(s, lr=1e-3) for s in (8, 19)]
    data = StackData(x, y, np.stack([np.arange(300)] * 2), x, y, np.stack([np.arange(300, len(x))] * 2),
                     content_columns=(0, 2))
    hyper = [r.best_srcc for r in train_stack(data, members, "hyper", "hyper", epochs=10)]
    mlp = [r.best_srcc for r in train_stack(data, members, "lrelu", "lrelu", epochs=10)]
    assert all(h > m + 0.1 for h, m in zip(hyper, mlp)), (hyper, mlp)  # about 0.9 against 0.7 per seed
    assert min(hyper) > 0.8, hyper


def test_mixed_precision_heads_learn_as_float32_ones_do_with_float32_weights_and_gates(one_thread):
    """`compute_dtype="bfloat16"`: the forward passes under bf16 autocast, the weights, Adam state and the
    gate's five parameters float32 (Suppl. B.1); the numbers move by rounding only, and the run is keyed apart."""
    from iqa.heads.training.grid import head_dtype
    from iqa.heads.training.config import RunConfig

    x, y = learnable_set()
    args = (data_for(x, y, 1), [Member(8, lr=1e-3)], "gated", "gated")
    full = train_stack(*args, hidden=64, epochs=4)[0]
    model, (mixed,) = train_stack_model(*args, hidden=64, epochs=4, compute_dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert mixed.curves["train_loss"] != full.curves["train_loss"]  # bf16 matmuls did run
    assert mixed.curves["train_loss"] == pytest.approx(full.curves["train_loss"], rel=0.1)
    assert mixed.best_srcc == pytest.approx(full.best_srcc, abs=0.02) and mixed.best_srcc > 0.8
    with pytest.raises(ValueError, match="float16"):
        train_stack(*args, epochs=1, compute_dtype="float16")
    assert head_dtype("auto", "cuda:0") == "bfloat16" and head_dtype("auto", "cpu") is None
    assert head_dtype("float32", "cuda") is None and head_dtype("bfloat16", "cpu") == "bfloat16"
    plain = RunConfig("d", "d", "b", "gated", "gated", "gated", 8)
    assert run_key(plain, "f", "r") != run_key(replace(plain, compute_dtype="bfloat16"), "f", "r")
