"""The hyper head as SMART-IQA's App. A sizes it (`--hyper-target eq16|table4`), by hand on tiny tensors."""

import numpy as np
import pytest
import torch

from iqa.heads.models.hyper import StackedHyper, hyper_recipe
from iqa.heads.saved.weights import load_head, save_head
from iqa.heads.training.config import RunConfig, run_key
from iqa.heads.training.grid import expand_grid, head_choices


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def generated_layer(v, c, w, b, width):
    """sigmoid(W(c) v + b(c)): W(c)[i, j] = sum_k c_k w[i, k * width + j], b(c) = c b (Eq. 14-16)."""
    coded = len(c)
    weight = np.einsum("k,ikj->ij", c, w.reshape(w.shape[0], coded, width))  # [in, out], this image's own
    return sigmoid(v @ weight + c @ b), weight


def hand_score(model, m, x, content=None):
    p = {name: t.detach().numpy()[m] for name, t in model.named_parameters()}
    read = x if content is None else x[content[0]:content[1]]
    if model.code is None:
        c = read
    else:
        pre = read @ p["code.weight"] + p["code.bias"]
        c = np.maximum(pre, 0) if model.code_act == "relu" else np.where(pre > 0, pre, 0.01 * pre)
    c = np.append(c, 1.0)
    v = x if model.project is None else x @ p["project.weight"] + p["project.bias"]
    generated = 0
    for l, width in enumerate(model.sizes[1:]):
        v, weight = generated_layer(v, c, p[f"w{l + 1}"], p[f"b{l + 1}"], width)
        generated += weight.size + width
    out = len(model.sizes)
    return (c @ p[f"w{out}"]) @ v + c @ p[f"b{out}"][:, 0], generated + model.sizes[-1] + 1


def test_eq16_generates_the_target_weights_from_the_content_features():
    model = StackedHyper(6, [8, 19], target="eq16", content=(2, 6)).eval()
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x).numpy()
    for m in range(2):
        for i in range(3):
            want, generated = hand_score(model, m, x[m, i].numpy(), (2, 6))
            assert got[m, i] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert generated == 6 * 128 + 128 + 128 + 1  # Eq. 17 at d = 6: d x d_target + d_target + d_target + 1
    assert model.code is None and model.project is None and model.w1.shape == (2, 6, (4 + 1) * 128)


def test_table4_has_a_112_code_a_224_input_and_hidden_layers_112_and_56():
    model = StackedHyper(10, [8], target="table4").eval()
    assert model.sizes == [224, 112, 56] and model.code.weight.shape == (1, 10, 112)
    x = torch.randn(1, 4, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x).numpy()
    for i in range(4):
        assert got[0, i] == pytest.approx(hand_score(model, 0, x[0, i].numpy())[0], rel=1e-5, abs=1e-6)


def test_iqas_hyper_head_is_unchanged():
    model = StackedHyper(10, [8]).eval()
    assert model.sizes == [224, 128] and model.code.weight.shape == (1, 10, 16)
    assert [n for n, _ in model.named_parameters()] == ["w1", "b1", "w2", "b2", "code.weight", "code.bias",
                                                        "project.weight", "project.bias"]
    x = torch.randn(1, 4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x).numpy()
    for i in range(4):
        assert got[0, i] == pytest.approx(hand_score(model, 0, x[0, i].numpy())[0], rel=1e-5, abs=1e-6)
    assert hyper_recipe() == {"code": 16, "target_in": 224, "target_hidden": 128, "target_act": "sigmoid"}


def test_paper_variants_take_dropout_and_save_and_load_back(tmp_path):
    model = StackedHyper(6, [8], target="eq16", dropout="input", keep=[0.7])
    x = torch.randn(1, 5, 6)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model.eval()(x))  # dropout acts in training only
    config = RunConfig("toy", "toy", "nss", "hyper", "hyper", "hyper", 8, dropout="input", keep=0.7, hyper_target="eq16")
    path = save_head(tmp_path / "head.safetensors", {k: t.detach() for k, t in model.state_dict().items()}, config.to_dict())
    loaded, saved = load_head(path)
    with torch.no_grad():
        assert saved["hyper_target"] == "eq16" and torch.equal(loaded(x), model.eval()(x))


def test_the_target_is_in_the_key_only_when_set_and_bad_choices_are_refused():
    plain = RunConfig("toy", "toy", "nss", "hyper", "hyper", "hyper", 8)
    assert "hyper_target" not in plain.to_dict()
    keys = {run_key(RunConfig("toy", "toy", "nss", "hyper", "hyper", "hyper", 8, hyper_target=t), "f", "r")
            for t in (None, "eq16", "table4")}
    assert len(keys) == 3
    grid = expand_grid([("toy", "toy")], "nss", head_choices(["hyper", "baseline"], []), [8], hyper_target="table4")
    assert [c.hyper_target for c in grid] == ["table4", None]
    for kwargs, says in (({"hyper_target": "eq17"}, "unknown --hyper-target"), ({"dropout": "input", "keep": 0.7}, "takes no --dropout"),
                         ({"hyper_target": "eq16", "dropout": "layers"}, "--dropout input")):
        with pytest.raises(ValueError, match=says):
            RunConfig("toy", "toy", "nss", "hyper", "hyper", "hyper", 8, **kwargs)
    with pytest.raises(ValueError, match="not of 'baseline'"):
        RunConfig("toy", "toy", "nss", "baseline", "lrelu", "lrelu", 8, hyper_target="eq16")
    with pytest.raises(ValueError, match="generator weights"):
        StackedHyper(2048, [8], target="eq16")  # 2048 x 2049 x 128: 537 M, before any is drawn


def test_paper_variants_train_in_a_grid_and_their_kept_weights_reproduce_the_recorded_srcc(tmp_path):
    from iqa.cache.results import ResultsDB
    from iqa.heads.saved.weights import run_weights_path
    from iqa.heads.training.grid import run_grid, run_rows
    from iqa.heads.training.metrics import srcc
    from helpers import fake_cache

    cache = fake_cache("clive", n=150)
    db = ResultsDB(tmp_path / "results.sqlite")
    configs = [c for target in ("eq16", "table4") for c in
               expand_grid([("clive", "clive")], "siglip2", head_choices(["hyper"], []), [8], dropout="input", keeps=[0.7],
                           epochs=2, hyper_target=target)]
    for config, record in zip(configs, run_grid(configs, lambda name: cache, db, progress=False)):
        assert record["status"] == "done" and record["hyper_target"] == config.hyper_target
        head, _ = load_head(run_weights_path(db.path, record["key"]))
        _, test_rows = run_rows(config, cache, cache)
        with torch.no_grad():
            pred = head(torch.as_tensor(cache.embeddings[test_rows], dtype=torch.float32)[None])
        stored = float(srcc(pred, torch.as_tensor(cache.manifest.targets[test_rows])[None])[0])
        assert stored == pytest.approx(record["best_srcc"], abs=1e-6)
