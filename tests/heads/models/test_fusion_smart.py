"""`--fuse smart`: SMART-IQA's Eq. 4-10 on pooled stage vectors, by hand on tiny tensors."""

import numpy as np
import pytest
import torch

from iqa.heads.models.fusion import FUSE_WIDTH, fusion_recipe
from iqa.heads.training.config import RunConfig, run_key
from iqa.heads.training.trainer import make_stack


def relu(x):
    return np.maximum(x, 0)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def fusion(fuse: str, stages=((3, 6), (4, 10)), seeds=(8, 19)):
    return make_stack(sum(w for _, w in stages), list(seeds), "lrelu", "lrelu", [100.0] * len(seeds), None,
                      [1.0] * len(seeds), fuse=fuse, stages=stages)


def test_smart_fusion_is_the_papers_equations_4_to_10():
    model = fusion("smart")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, alpha = model.fused(x).numpy(), model.stage_weights(x).numpy()
    p = {name: t.detach().numpy() for name, t in model.named_parameters()}
    for m in range(2):
        x3, x4 = x[m, :, :6].numpy(), x[m, :, 6:].numpy()  # stage 3 (6 wide), then stage 4 (10 wide), as named
        u3 = relu(x3 @ p["project.0.weight"][m] + p["project.0.bias"][m])  # Eq. 4, with its ReLU
        u4 = relu(x4 @ p["project.1.weight"][m] + p["project.1.bias"][m])
        z = relu(x4 @ p["gate1.weight"][m] + p["gate1.bias"][m])  # Eq. 6-7: from the deepest stage, 4
        a = sigmoid(z @ p["gate2.weight"][m] + p["gate2.bias"][m])  # Eq. 8: each stage's own sigmoid
        np.testing.assert_allclose(alpha[m], a, rtol=1e-5)
        np.testing.assert_allclose(fused[m], np.concatenate([a[:, :1] * u3, a[:, 1:] * u4], -1), rtol=1e-5, atol=1e-6)
    assert fused.shape == (2, 5, 2 * FUSE_WIDTH) and (fused >= 0).all()  # K x 512, no negative projected value
    assert not np.allclose(alpha.sum(-1), 1)  # independent gates, not shares of one whole
    with torch.no_grad():
        assert model(x).shape == (2, 5)


def test_attention_fusion_is_unchanged_and_apart_in_the_key():
    model = fusion("attention")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused, alpha = model.fused(x).numpy(), model.stage_weights(x).numpy()
    p = {name: t.detach().numpy() for name, t in model.named_parameters()}
    u3 = x[0, :, :6].numpy() @ p["project.0.weight"][0] + p["project.0.bias"][0]  # no ReLU
    u4 = x[0, :, 6:].numpy() @ p["project.1.weight"][0] + p["project.1.bias"][0]
    logits = relu(x[0, :, 6:].numpy() @ p["gate1.weight"][0] + p["gate1.bias"][0]) @ p["gate2.weight"][0] + p["gate2.bias"][0]
    a = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(fused[0], a[:, :1] * u3 + a[:, 1:] * u4, rtol=1e-5, atol=1e-6)
    assert alpha.sum(-1) == pytest.approx(1.0) and fused.shape[-1] == FUSE_WIDTH
    # the recipe of existing fused runs is the one they were keyed with
    assert fusion_recipe() == fusion_recipe("attention") == {"width": 512, "gate_hidden": 128,
                                                             "gate": "softmax over stages", "combine": "weighted sum"}
    base = dict(train_dataset="toy", test_dataset="toy", backbone="swin-t", head="baseline", act1="lrelu",
                act2="lrelu", seed=8, layers=(4, 3))
    assert run_key(RunConfig(**base, fuse="smart"), "f", "r") != run_key(RunConfig(**base, fuse="attention"), "f", "r")


def test_a_saved_smart_fusion_loads_back_to_the_same_predictions(tmp_path):
    from iqa.heads.saved.weights import load_head, save_head

    model = fusion("smart", seeds=(8,))
    config = RunConfig("toy", "toy", "swin-t", "baseline", "lrelu", "lrelu", 8, layers=(3, 4), fuse="smart")
    path = save_head(tmp_path / "head.safetensors", {k: t.detach() for k, t in model.state_dict().items()}, config.to_dict())
    loaded, saved = load_head(path)
    x = torch.randn(1, 7, 16)
    with torch.no_grad():
        assert saved["fuse"] == "smart" and torch.equal(loaded(x), model.eval()(x))
