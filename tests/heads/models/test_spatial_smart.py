"""`--fuse smart --spatial S`: SMART-IQA's Eq. 4-10 and App. A Eq. 14-17 on stage maps, by hand on tiny tensors."""

import numpy as np
import pytest
import torch

from iqa.errors import SettingError
from iqa.heads.models.fusion import FUSE_WIDTH
from iqa.heads.models.hyper import MAX_GENERATOR, generated_parameters, generator_weights
from iqa.heads.training.config import RunConfig, run_key
from iqa.heads.training.trainer import make_stack

STAGES, SIDE = ((1, 3), (2, 5)), 2  # stage 1: 3 channels, stage 2 (the deepest, F^K): 5, on 2 x 2 maps
P = SIDE * SIDE


def relu(x):
    return np.maximum(x, 0)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def stack(head: str, spatial: int | None = SIDE, target: str | None = None):
    acts = ("hyper", "hyper") if head == "hyper" else ("lrelu", "lrelu")
    width = sum(w for _, w in STAGES) * (spatial or 1) ** 2
    return make_stack(width, [8, 19], *acts, [100.0, 100.0], None, [1.0, 1.0], fuse="smart", stages=STAGES,
                      hyper_target=target, spatial=spatial)


def maps_of(x: np.ndarray, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """The two stages' maps [B, positions, C] from rows laid out as the store's map arrays (positions first)."""
    return x[:, : positions * 3].reshape(len(x), positions, 3), x[:, positions * 3 :].reshape(len(x), positions, 5)


def fused_by_hand(p: dict, m: int, x: np.ndarray, positions: int) -> np.ndarray:
    """v [B, positions, 2 x 512]: Eq. 4 at each location (the 1 x 1 conv), Eq. 6-8 from the deepest map's GAP,
    Eq. 9-10 the weighted stages concatenated at each location."""
    f1, f2 = maps_of(x, positions)
    u1 = relu(np.einsum("bpc,cd->bpd", f1, p["project.0.weight"][m]) + p["project.0.bias"][m])
    u2 = relu(np.einsum("bpc,cd->bpd", f2, p["project.1.weight"][m]) + p["project.1.bias"][m])
    z = relu(f2.mean(1) @ p["gate1.weight"][m] + p["gate1.bias"][m])
    alpha = sigmoid(z @ p["gate2.weight"][m] + p["gate2.bias"][m])  # [B, 2]
    return np.concatenate([alpha[:, None, :1] * u1, alpha[:, None, 1:] * u2], -1)


def hyper_by_hand(p: dict, m: int, x: np.ndarray, positions: int) -> tuple[np.ndarray, int]:
    """Eq. 14-17 with W1 materialised per image: location l's slab W1[l] = sum_k c'_lk G_k from F^K's code there
    (c'_l = [F^K_l, 1], the 1 x 1 convolution), the biases and the output layer from the code's GAP; the
    target network reads the whole v (d = positions x 1024). Returns the scores and the generated count."""
    v = fused_by_hand(p, m, x, positions)
    _, fk = maps_of(x, positions)
    scores, generated = [], 0
    for b in range(len(x)):
        code = np.concatenate([fk[b], np.ones((positions, 1))], 1)  # [positions, 6]
        g = p["head.w1"][m].reshape(2 * FUSE_WIDTH, 6, 128)
        w1 = np.einsum("lk,ikj->lij", code, g).reshape(positions * 2 * FUSE_WIDTH, 128)  # [d, 128]
        mean = code.mean(0)
        h = sigmoid(v[b].reshape(-1) @ w1 + mean @ p["head.b1"][m])
        w2, b2 = mean @ p["head.w2"][m], mean @ p["head.b2"][m]
        scores.append(w2 @ h + b2[0])
        generated = w1.size + 128 + w2.size + b2.size
    return np.array(scores), generated


def params(model) -> dict:
    return {name: t.detach().double().numpy() for name, t in model.named_parameters()}


def test_the_fusion_on_maps_is_equations_4_to_10_at_each_location_and_mlp_heads_read_its_average():
    model = stack("baseline")
    x = torch.randn(2, 4, P * 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, scores = model.fused(x), model(x)
        on_average = model.head(model.fused(x).mean(-2), inputs_masked=True)
    p = params(model)
    for m in range(2):
        np.testing.assert_allclose(fused[m].numpy(), fused_by_hand(p, m, x[m].double().numpy(), P), rtol=1e-4, atol=1e-5)
    assert fused.shape == (2, 4, P, 2 * FUSE_WIDTH)
    np.testing.assert_allclose(scores.numpy(), on_average.numpy(), rtol=1e-6)
    moved = x.clone()
    moved[..., : P * 3] = moved[..., : P * 3].reshape(2, 4, P, 3).flip(2).reshape(2, 4, -1)  # stage 1's locations swapped
    with torch.no_grad():  # a per-location projection then an average: the same v's average, the same score
        assert torch.allclose(model(moved), scores, atol=1e-5)


@pytest.mark.parametrize("spatial", [SIDE, None])
def test_the_eq16_hyper_head_generates_w1_slab_by_slab_from_the_deepest_map(spatial):
    model = stack("hyper", spatial, "eq16")
    positions = (spatial or 1) ** 2
    x = torch.randn(2, 3, positions * 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = model(x).double().numpy()
    p = params(model)
    for m in range(2):
        expected, generated = hyper_by_hand(p, m, x[m].double().numpy(), positions)
        np.testing.assert_allclose(scores[m], expected, rtol=1e-4, atol=1e-5)
        assert generated == generated_parameters(2 * FUSE_WIDTH, "eq16", positions)
    assert model.head.positions == positions


def test_eq17_counts_the_papers_12_8_m_generated_parameters_and_swin_b_fits_the_generator_limit():
    d = 7 * 7 * 4 * 512  # Swin-B, K = 4 stages at 7 x 7, C_unified 512: d = 100,352
    assert generated_parameters(4 * 512, "eq16", 49) == d * 128 + 128 + 128 + 1 == 12_845_313  # "12.8 M"
    assert generator_weights(4 * 512, 1024, "eq16") == 4 * 512 * 1025 * 128 + 128 * 1025 <= MAX_GENERATOR


def test_fused_hyper_runs_read_f_k_and_change_key_while_other_keys_stay():
    # keys computed by the code before the hyper-network read F^K behind a fusion (and before `spatial`)
    before = {"fused_hyper": "ea299e22a173a102f7d0f2e09fa7a70201dc42854ba8b3b95a89be838c9eedc0",
              "fused_mlp": "b062844904a07edb1addaba6d5f8877e95c968bf0f971a45ad6da89a6d96b1ee",
              "layers_hyper": "49fcb9d2dc93911e14bd8a2c8656168008d390e3f6e92ef9ecab644c550e9054"}
    base = dict(train_dataset="koniq10k", test_dataset="koniq10k", backbone="swin-b", seed=8, layers=(4, 3, 2, 1))
    hyper = dict(head="hyper", act1="hyper", act2="hyper", hyper_target="eq16")
    configs = {"fused_hyper": RunConfig(**base, **hyper, fuse="smart"),
               "fused_mlp": RunConfig(**base, head="baseline", act1="lrelu", act2="lrelu", fuse="smart"),
               "layers_hyper": RunConfig(**base, **hyper)}
    keys = {name: run_key(c, "fp", "rows") for name, c in configs.items()}
    assert keys["fused_hyper"] != before["fused_hyper"]
    assert keys["fused_mlp"] == before["fused_mlp"] and keys["layers_hyper"] == before["layers_hyper"]
    on_maps = RunConfig(**base, **hyper, fuse="smart", spatial=7)
    assert run_key(on_maps, "fp", "rows") not in keys.values() and on_maps.to_dict()["spatial"] == 7
    assert "spatial" not in configs["fused_hyper"].to_dict()
    with pytest.raises(SettingError, match="give layers and fuse with it"):
        RunConfig(**base, head="baseline", act1="lrelu", act2="lrelu", spatial=7)
