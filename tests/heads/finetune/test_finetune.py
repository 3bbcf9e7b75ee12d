import math
import re

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
import torchvision_stub
from PIL import Image

from iqa.cache.load import load_cached
from iqa.extract.backbones import BackboneLoadError, load_backbone
from iqa.extract.preprocess import normalise, resize_uint8
from iqa.extract.registry import get_spec, lora_target_modules
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.extract.tuning import add_lora, apply_run, lora_layout, read_run
from iqa.heads.finetune import loop as finetune_module
from iqa.extract.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from iqa.heads.training.grid import run_grid
from iqa.heads.training.config import RunConfig
from iqa.heads.finetune.loop import build_model, embedding_dim, finetune, finetune_config, finetune_optimizer
from iqa.heads.models.mlp import HEADS, StackedMLP
from iqa.cache.results import ResultsDB
from iqa.heads.report.tables import results_table
from helpers import bright_dataset, run, straight_and_resumed

CLASSES = ["siglip2", "clip", "dinov2", "dinov3", "resnet152", "perception"]

torchvision_stub.install()  # perception loads through timm, which imports torchvision


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("key", CLASSES)
def test_lora_trains_only_the_adapter_and_the_head(key):
    spec = get_spec(key).as_tiny()
    base = load_backbone(spec, weights="tiny")
    targets = lora_target_modules(spec, [name for name, _ in lora_layout(base).named_modules()])
    expected = 0
    for name in targets:  # LoRA adds A [r x in] and B [out x r]; a conv's A is r filters of in x kh x kw
        module = base.get_submodule(name)
        if isinstance(module, torch.nn.Conv2d):
            expected += 3 * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)
        else:
            expected += 3 * (module.in_features + module.out_features)
    with torch.no_grad():
        dim = base(torch.zeros(1, 3, 32, 32)).shape[1]
    head_count = sum(p.numel() for p in StackedMLP(dim, [8], *HEADS["sig"]).parameters())

    model = build_model(base, spec, "lora", "sig", seed=8, lora_rank=3, dim=dim)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.startswith("head.") for name in trainable)
    assert sum(p.numel() for name, p in trainable.items() if "lora_" in name) == expected
    assert sum(p.numel() for p in trainable.values()) == expected + head_count
    optimizer = finetune_optimizer(model, finetune_config("bright", key, mode="lora"))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainable.values()}


# Not perception: timm's tiny PE gives features of about 1e-3 (std 0.02 init, no norm after its attention
# pooling), which a head at lr 1e-4 cannot fit in three epochs; its tuning is tested by the tests above and below.
@pytest.mark.parametrize("key", [key for key in CLASSES if key != "perception"])
def test_loss_falls_when_brightness_is_the_score(tmp_path, key):
    bright_dataset(tmp_path, n=30)
    result = run(tmp_path, key, mode="lora", epochs=3).result
    loss = result.curves["train_loss"]
    assert result.status == "done" and loss[0] > loss[1] > loss[2] and loss[2] < 0.5 * loss[0]
    assert result.best_plcc > 0.9  # 6 test images: SRCC moves in steps of 0.03


def test_perception_lora_adapts_query_and_key_of_every_block_and_never_the_value():
    """timm fuses q, k, v into one Linear; iqa splits it (same outputs) so that LoRA reaches q and k alone."""
    spec = get_spec("perception", weights="tiny")
    base = load_backbone(spec, weights="tiny")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = base(x)
        blocks = len(base.model.model.blocks)
        tuned = add_lora(base, spec, 4)
        adapted = sorted(name[name.index("blocks."):] for name, m in tuned.named_modules() if hasattr(m, "lora_A"))
        torch.testing.assert_close(tuned(x), fused, atol=0, rtol=0)  # B starts at zero: the split alone, exactly
    assert adapted == [f"blocks.{i}.attn.qkv.{part}" for i in range(blocks) for part in "kq"]
    trained = {name for name, p in tuned.named_parameters() if p.requires_grad}
    assert trained and all(".attn.qkv.q.lora_" in name or ".attn.qkv.k.lora_" in name for name in trained)


@pytest.mark.parametrize("key", CLASSES)
def test_merged_adapter_equals_unmerged_and_extraction_uses_it(tmp_path, key):
    bright_dataset(tmp_path)
    trained = run(tmp_path, key, mode="lora")
    spec = get_spec(key).as_tiny()
    unmerged = add_lora(load_backbone(spec, weights="tiny"), spec, 4).eval()
    state = dict(load_checkpoint(trained.run_dir))
    set_peft_model_state_dict(unmerged, state["backbone"])
    # One epoch moves B (zero at init) by ~1e-4; give the run an adapter far from zero so merging is tested hard.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=g)
    save_checkpoint(trained.run_dir, dict(state, backbone=get_peft_model_state_dict(unmerged)))
    merged, info = apply_run(load_backbone(spec, weights="tiny"), spec, trained.run_dir, read_run(trained.run_dir))
    assert not any("lora" in name for name, _ in merged.named_modules())
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        base_out, unmerged_out, merged_out = load_backbone(spec, weights="tiny")(x), unmerged(x), merged(x)
    scale = base_out.abs().max()  # about 1 for the transformers models, 1e-3 for timm's (std 0.02 init, no final norm)
    assert (unmerged_out - base_out).abs().max() > 1e-3 * scale  # the adapter changes the features (100x the tolerance)
    torch.testing.assert_close(merged_out, unmerged_out, atol=1e-5 * scale, rtol=1e-4)
    assert info["regime"] == "lora" and info["epoch"] == 1
    if key != "siglip2":
        return
    other = load_backbone(spec, weights="tiny")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(BackboneLoadError, match="started from other siglip2 weights"):
        apply_run(other, spec, trained.run_dir, read_run(trained.run_dir))
    # tuned embeddings back into the cache, tagged with the run
    request = ExtractRequest(tmp_path, "bright", key, weights="tiny", adapter=trained.run_dir, dtype="float32",
                             store_dtype="float32", progress=False)
    summary = extract_dataset(request, num_workers=0)
    assert summary.store.name == "siglip2@tiny-lora-r4-sig-s8.zarr"
    cached = load_cached(tmp_path, "bright", key, tag="tiny-lora-r4-sig-s8")
    assert cached.fingerprint["tuned"]["trained_sha256"] == info["trained_sha256"]
    image = Image.open(tmp_path / "images" / "im03.png").convert("RGB")
    with torch.no_grad():
        by_hand = merged(normalise(resize_uint8(image, 32)[None], spec.mean, spec.std))[0]
    np.testing.assert_allclose(cached.embeddings[3], by_hand.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key, mode", [("dinov2", "full"), ("resnet152", "full"), ("clip", "lora"), ("perception", "full")])
def test_one_adam_step_moves_each_group_by_its_learning_rate(tmp_path, key, mode):
    bright_dataset(tmp_path)  # 12 train images: one step of 6 x 2
    trained = run(tmp_path, key, mode=mode, lr=1e-4, backbone_lr=5e-6)
    state = load_checkpoint(trained.run_dir)
    spec = get_spec(key).as_tiny()
    before = load_backbone(spec, weights="tiny")
    head = StackedMLP(state["head"]["layer1.weight"].shape[1], [8], *HEADS["sig"]).state_dict()
    head_moves = max((state["head"][k] - head[k]).abs().max().item() for k in head)
    assert 0.9e-4 < head_moves <= 1.0001e-4  # Adam's first step moves a weight by lr * |g| / (|g| + eps)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == ([5e-6, 1e-4] if mode == "full" else [1e-4, 1e-4])
    if mode == "full":
        moves = [(state["backbone"][k] - v).abs().max().item() for k, v in before.state_dict().items()
                 if v.is_floating_point() and "running" not in k]
        assert 4.5e-6 < max(moves) < 5.3e-6  # float32 rounds a 5e-6 step on a weight near 1 by up to 2.4e-7
        running = {k: v for k, v in before.state_dict().items() if "running" in k}  # BatchNorm statistics
        assert all(torch.equal(state["backbone"][k], v) for k, v in running.items())
        tuned, info = apply_run(load_backbone(spec, weights="tiny"), spec, trained.run_dir, read_run(trained.run_dir))  # as extract --adapter
        assert info["regime"] == "full" and all(torch.equal(v, state["backbone"][k]) for k, v in tuned.state_dict().items())
    else:
        assert 0.9e-4 < max(t.abs().max().item() for k, t in state["backbone"].items() if "lora_B" in k) <= 1.0001e-4


@pytest.mark.parametrize("key", ["dinov3", "perception"])
def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, key):
    bright_dataset(tmp_path, n=20)
    options = dict(mode="lora", epochs=2, batch_size=2, accumulate=2, db=ResultsDB(tmp_path / "a.sqlite"))
    straight, resumed = straight_and_resumed(tmp_path, key, **options)
    assert resumed.epochs_trained == 1 and straight.epochs_trained == 2
    assert resumed.result == straight.result and resumed.key == straight.key
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for part in ("backbone", "head"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # a finished run trains no further; a folder holding another run is refused
    assert run(tmp_path, key, run_dir=tmp_path / "resumed", **options).epochs_trained == 0
    with pytest.raises(ValueError, match="holds another run.*lora_rank"):
        run(tmp_path, key, run_dir=tmp_path / "resumed", **dict(options, lora_rank=2))


def test_gated_parameters_stay_float32_under_bf16_autocast(tmp_path):
    spec = get_spec("siglip2").as_tiny()
    base = load_backbone(spec, weights="tiny")
    model = build_model(base, spec, "lora", "gated", seed=8, lora_rank=4, dim=embedding_dim(base, spec))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(torch.randn(2, 3, 32, 32))
    pred.float().sum().backward()
    assert pred.dtype == torch.bfloat16  # autocast was on
    gates = [p for act in (model.head.act1, model.head.act2) for p in act.parameters()]
    assert len(gates) == 10 and all(p.dtype == p.grad.dtype == torch.float32 for p in gates)

    bright_dataset(tmp_path)
    trained = run(tmp_path, "siglip2", head="gated", dtype="bfloat16")
    assert trained.config["compute_dtype"] == "bfloat16" and trained.result.status == "done"
    assert all(v.dtype == torch.float32 for k, v in load_checkpoint(trained.run_dir)["head"].items() if "act" in k)


def test_float16_trains_through_a_grad_scaler_whose_state_resumes(tmp_path):
    bright_dataset(tmp_path, n=20)
    options = dict(mode="lora", epochs=2, batch_size=2, accumulate=2, dtype="float16", db=ResultsDB(tmp_path / "a.sqlite"))
    straight, resumed = straight_and_resumed(tmp_path, "dinov3", **options)
    scaler = load_checkpoint(tmp_path / "straight")["scaler"]
    assert straight.config["compute_dtype"] == "float16" and straight.result.status == "done"
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # the scaler was on and stepped
    assert resumed.epochs_trained == 1 and resumed.result == straight.result
    assert load_checkpoint(tmp_path / "resumed")["scaler"] == scaler


def test_divergence_stops_keeps_the_last_good_checkpoint_and_is_recorded(tmp_path, monkeypatch):
    bright_dataset(tmp_path)
    real_loss, calls = finetune_module.iqa_loss, []

    def loss_that_blows_up_in_epoch_two(pred, target, micro_batch, loss_name):
        calls.append(1)
        loss = real_loss(pred, target, micro_batch, loss_name)
        return loss * math.inf if len(calls) > 6 else loss  # epoch 1 is 6 physical batches

    monkeypatch.setattr(finetune_module, "iqa_loss", loss_that_blows_up_in_epoch_two)
    saved = {}

    def keep_copy(epoch):
        saved[epoch] = checkpoint_path(tmp_path / "run").read_bytes()

    db = ResultsDB(tmp_path / "r.sqlite")
    outcome = run(tmp_path, "clip", epochs=3, run_dir=tmp_path / "run", db=db, on_epoch=keep_copy)
    assert outcome.result.status == "diverged" and outcome.result.diverged_epoch == 2 and list(saved) == [1]
    assert checkpoint_path(tmp_path / "run").read_bytes() == saved[1]
    (record,) = db.runs()
    assert record["status"] == "diverged" and record["regime"] == "lora" and record["diverged_epoch"] == 2
    assert "—" in results_table(db.runs(), layout="regimes")


def test_runs_land_in_the_results_table_by_regime(tmp_path):
    bright_dataset(tmp_path)
    db = ResultsDB(tmp_path / "r.sqlite")
    for mode in ("frozen", "lora", "full"):
        run(tmp_path, "resnet152", mode=mode, db=db)
    runs = db.runs()
    assert sorted(r["regime"] for r in runs) == ["frozen", "full", "lora"]
    assert {r["batch_size"]: r["micro_batch"] for r in runs} == {12: 2}  # the cached trainer's fields
    table = results_table(runs, layout="regimes")
    lines = [line for line in table.splitlines() if line.startswith("| resnet152")]
    assert len(lines) == 3 and all(re.search(r"\| \**-?\d\.\d{3}\** \|", line) for line in lines)  # a value each


@pytest.mark.parametrize("l2norm", [False, True])
def test_frozen_finetuning_and_the_cached_head_train_the_same_run(tmp_path, l2norm):
    """One training core: a frozen fine-tuning run on live features and a cached-head run on the
    stored features of the same seed see the same batches, schedule and loss (and, with `l2norm`,
    the same unit-length inputs), so their curves agree."""
    bright_dataset(tmp_path, n=40)
    request = ExtractRequest(tmp_path, "bright", "dinov2", weights="tiny", dtype="float32", store_dtype="float32", progress=False)
    extract_dataset(request, num_workers=0)
    cached = load_cached(tmp_path, "bright", "dinov2", tag="tiny")
    config = RunConfig("bright", "bright", "dinov2", "baseline", *HEADS["baseline"], 19, epochs=3, lr=1e-3, l2norm=l2norm)
    (cached_run,) = run_grid([config], lambda _: cached, ResultsDB(tmp_path / "cached.sqlite"), progress=False)
    live = run(tmp_path, head="baseline", mode="frozen", seed=19, epochs=3, lr=1e-3, batch_size=2, accumulate=6,
               l2norm=l2norm, db=ResultsDB(tmp_path / "live.sqlite"))
    assert live.config["l2norm"] is l2norm
    for curve in ("train_loss", "srcc", "plcc", "lr"):
        assert live.result.curves[curve] == pytest.approx(cached_run["curves"][curve], rel=1e-4, abs=1e-5), curve
    assert live.result.curves["train_loss"][0] != pytest.approx(live.result.curves["train_loss"][-1], rel=1e-3)


def test_an_activation_pair_fine_tunes_as_the_cached_heads_pair_and_the_micro_batch_reaches_the_loss():
    from iqa.heads.models.mlp import head_activations

    config = finetune_config("bright", "dinov2", head="sigmoid+gelu", batch_size=4, accumulate=3, micro_batch=4)
    assert (config.act1, config.act2, config.micro_batch, config.batch_size) == ("sigmoid", "gelu", 4, 12)
    assert head_activations("sig") == ("sigmoid", "lrelu")
    spec = get_spec("dinov2", weights="tiny")
    base = load_backbone(spec, weights="tiny")
    model = build_model(base, spec, "frozen", "sigmoid+gelu", seed=8, lora_rank=4, dim=32)
    reference = StackedMLP(32, [8], "sigmoid", "gelu")
    x = torch.randn(1, 5, 32)
    torch.testing.assert_close(model.head(x), reference(x))
