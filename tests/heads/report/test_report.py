"""iqa report: table numbers, best marks and empty-cell reasons; figures and index.html; per-epoch gates;
the compute profile's MAC count against a hand count; t-SNE retraining reproduces the stored run."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from iqa.cache.manifest import Manifest
from iqa.heads.report import figures
from iqa.heads.training.grid import expand_grid, head_choices, run_grid
from iqa.heads.report.profile import count_macs, head_profile, profile_backbone, profile_table
from iqa.heads.report.build import write_report
from iqa.cache.results import ResultsDB
from iqa.heads.report.tables import results_table
from iqa.heads.training.trainer import Member, StackData, train_stack
from iqa.heads.report.tsne import retrained_features
from helpers import db_row, record


@pytest.fixture
def known_db(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.record([
        record("clive", "baseline", 8, 0.80), record("clive", "baseline", 19, 0.84), record("clive", "baseline", 25, 0.82),
        record("koniq10k", "baseline", 8, 0.90), record("koniq10k", "baseline", 19, 0.92), record("koniq10k", "baseline", 25, 0.91),
        record("clive", "sig", 8, 0.88), record("clive", "sig", 19, 0.86), record("clive", "sig", 25, 0.87),
        record("koniq10k", "sig", 8, 0.95, status="diverged"), record("koniq10k", "sig", 19, 0.89),
        record("clive", "gated", 8, 0.70),  # a half-finished grid: one seed, one dataset
        record("koniq10k", "sig", 8, 0.75, test="clive"), record("koniq10k", "sig", 19, 0.77, test="clive"),
        record("clive", "sigmoid+gelu", 8, 0.91),
        record("clive", "baseline", 8, 0.85, regime="lora"),
    ])
    return db


def test_table_mean_std_best_and_empty_cell_reasons(known_db):
    runs = [r for r in known_db.runs() if r["train_dataset"] == r["test_dataset"] and r["regime"] == "frozen"]
    md = results_table(runs, "variants", "md").splitlines()
    assert md[1] == "| head | clive SRCC | clive PLCC | koniq10k SRCC | koniq10k PLCC |"
    row = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in md[3:]}
    assert row["baseline"][0] == f"0.820 ± {np.std([0.80, 0.84, 0.82], ddof=1):.3f}"
    assert row["baseline"][2] == f"0.910 ± {np.std([0.90, 0.92, 0.91], ddof=1):.3f}"  # alone in its column: no mark
    assert row["sigmoid+gelu"][0] == "**0.910** (n=1)"  # best clive SRCC; one seed of three
    assert row["sig"][2] == "— (diverged)"
    assert row["gated"][2] == "not run" and row["gated"][0] == "0.700 (n=1)"

    csv = results_table(runs, "variants", "csv").splitlines()
    assert csv[0].split(",")[:4] == ["head", "clive SRCC mean", "clive SRCC std", "clive SRCC best"]
    by_head = {line.split(",")[0]: line.split(",") for line in csv[1:]}
    assert float(by_head["baseline"][1]) == pytest.approx(0.82) and by_head["baseline"][3] == ""
    assert by_head["sigmoid+gelu"][2] == ""  # one seed: no std
    assert by_head["sigmoid+gelu"][3] == "*"
    assert by_head["sig"][7:10] == ["diverged", "", ""] and by_head["gated"][7] == "not run"
    assert by_head["baseline"][-2:] == ["3", "3"] and by_head["gated"][-2:] == ["1", "0"]  # seeds per dataset

    latex = results_table(runs, "variants", "latex")
    assert "$\\mathbf{0.910}$ (n=1)" in latex and "--- (diverged)" in latex and "sigmoid+gelu" in latex


def test_cross_activation_and_regime_layouts(known_db):
    runs = known_db.runs()
    cross = results_table(runs, "cross", "md").splitlines()
    assert cross[1] == "| backbone | head | koniq10k->clive SRCC | koniq10k->clive PLCC |"
    assert cross[3] == f"| siglip2 | sig | 0.760 ± {np.std([0.75, 0.77], ddof=1):.3f} | 0.710 ± {np.std([0.70, 0.72], ddof=1):.3f} |"
    within = [r for r in runs if r["train_dataset"] == r["test_dataset"]]
    acts = results_table(within, "activations", "md").splitlines()
    assert acts[1].startswith("| act1 | act2 | regime | clive SRCC")  # the head name is not repeated
    assert any(line.startswith("| sigmoid | gelu | frozen | **0.910") for line in acts)
    regimes = results_table(within, "regimes", "md").splitlines()
    assert regimes[1].startswith("| backbone | regime | head | clive SRCC")
    assert any(line.startswith("| siglip2 | lora | baseline | 0.850 (n=1) |") for line in regimes)
    assert any(line.startswith("| siglip2 | frozen | sig | 0.870 ± 0.010 |") for line in regimes)


def test_lora_rank_sweep_figure_plots_the_mean_srcc_per_rank(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    srcc = {(1, 8): 0.80, (1, 19): 0.82, (4, 8): 0.86, (4, 19): 0.90, (16, 8): 0.85}  # rank 16: one seed
    for (rank, seed), value in srcc.items():
        _, config, fp, result = record("clive", "sig", seed, value, regime="lora")
        db.record([db_row(dict(config, lora_rank=rank), fp, result)])
    _, config, fp, result = record("clive", "sig", 8, 0.99)  # a frozen run: not on the rank axis
    db.record([db_row(dict(config, lora_rank=None), fp, result)])
    summary = write_report(db.runs(), tmp_path / "report", None, [], progress=False)
    assert {"srcc_vs_lora_rank.png", "srcc_vs_lora_rank.pdf"} <= {p.name for p in summary.figures}
    lora = [r for r in db.runs() if r["regime"] == "lora"]
    (line,) = [line for line in figures.ablation_figure(lora, "lora_rank").axes[0].lines if line.get_marker() == "o"]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [1, 4, 16])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [0.81, 0.88, 0.85])

    one_rank = ResultsDB(tmp_path / "one.sqlite")
    one_rank.record([db_row(dict(config, regime="lora", lora_rank=4), fp, result)])
    summary = write_report(one_rank.runs(), tmp_path / "report", None, [], progress=False)
    assert any("fewer than two ranks" in note for note in summary.notes)


def test_trainer_stores_the_gate_vector_every_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = 1 / (1 + np.exp(-x @ rng.normal(size=8)))
    data = StackData(x, y, np.arange(48)[None], x, y, np.arange(48, 60)[None])
    gated, plain = (train_stack(data, [Member(8, lr=1e-2)], act, act, hidden=16, epochs=3)[0] for act in ("gated", "lrelu"))
    for layer in ("act1", "act2"):
        per_epoch = gated.curves[f"g_{layer}"]
        assert len(per_epoch) == 3 and all(len(g) == 16 for g in per_epoch)
        assert per_epoch[-1] == pytest.approx(gated.gates[layer]["g"], abs=1e-4)  # the last epoch is the final gate
        assert per_epoch[0] != per_epoch[-1]
    assert not any(k.startswith("g_") for k in plain.curves)


def test_mac_count_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    total, attention = count_macs(model, torch.zeros(1, 3, 8, 8))
    assert total == 4 * 6 * 6 * (3 * 3 * 3) + 4 * 6 * 6 * 5 and attention == 0
    params, macs = head_profile(8, "baseline")
    assert params == (8 * 512 + 512) + (512 * 512 + 512) + (512 + 1)
    assert macs == 8 * 512 + 512 * 512 + 512
    assert head_profile(8, "gated")[0] == params + 5 * 512 * 2  # alpha, beta, gamma, a, g per channel, two layers
    (row,) = profile_backbone("resnet152", ["baseline"])  # full-size config on the meta device: shapes only
    assert row.backbone_params == pytest.approx(58.1e6, rel=0.01) and row.backbone_macs > 1e10
    assert row.peak_memory == "n/a (no GPU)"  # asked for the CPU: not measured, on any host


def test_perception_profiles_the_blocks_its_default_embedding_reads():
    """The timm tower is kept whole for --layers, but Table S5 counts what the default embedding runs:
    blocks 1-20 of 24, then the head (its attention pool passes a parameter as an input, which the MAC
    counter has to be able to hook)."""
    import torchvision_stub

    torchvision_stub.install()  # before timm, which imports torchvision
    import timm

    (row,) = profile_backbone("perception", ["baseline"])
    with torch.device("meta"):
        whole = timm.create_model("vit_pe_core_large_patch14_336", pretrained=False)
    block = sum(p.numel() for p in whole.blocks[0].parameters())
    assert len(whole.blocks) == 24 and row.backbone_params == sum(p.numel() for p in whole.parameters()) - 4 * block
    assert row.backbone_macs > 1e11 and row.resolution == 336


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory needs a GPU")
def test_peak_memory_is_measured_on_a_gpu():
    (row,) = profile_backbone("dinov2", ["baseline"], device="cuda")
    assert row.peak_memory.endswith("(bf16 autocast, fp32 weights)") and float(row.peak_memory.split()[0]) > 0
    assert "resnet152 | baseline | 512x512" in profile_table([row])


def fake_cache(name, n=70, d=8):
    rng = np.random.default_rng(len(name))
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = 1 / (1 + np.exp(-x @ rng.normal(size=d) / 2))
    return SimpleNamespace(embeddings=x, valid=np.ones(n, bool), fingerprint_id="fp",
                           manifest=Manifest(name, "/img", [f"{i}.png" for i in range(n)], y, y, "synthetic"))


def test_report_on_a_half_finished_grid_writes_every_table_figure_and_index(tmp_path):
    caches = {d: fake_cache(d) for d in ("clive", "koniq10k", "agiqa1k")}
    db = ResultsDB(tmp_path / "results.sqlite")
    heads = head_choices(["baseline", "gated"], [])
    configs = expand_grid([("clive", "clive")], "siglip2", heads, [8, 19], [100, 30], epochs=2)
    # a half-finished grid: koniq10k and agiqa1k have only the baseline head, agiqa1k only one seed
    configs += expand_grid([("koniq10k", "koniq10k")], "siglip2", heads[:1], [8, 19], [100, 30], epochs=2)
    configs += expand_grid([("agiqa1k", "agiqa1k")], "siglip2", heads[:1], [8], [100, 30], epochs=2)
    configs += expand_grid([("clive", "clive")], "siglip2", heads[:1], [8], dropout="layers", keeps=[1.0, 0.5], epochs=2)
    configs += expand_grid([("clive", "koniq10k")], "siglip2", heads[:1], [8], epochs=2)
    records = run_grid(configs, caches.__getitem__, db, progress=False, stack_size=8)

    gated = next(r for r in records if r["head"] == "gated" and r["mask_k"] == 100)
    again = retrained_features(gated, caches["clive"], caches["clive"])
    assert again["retrained_srcc"] == pytest.approx(gated["best_srcc"], abs=1e-4)  # the t-SNE shows the stored run

    out = tmp_path / "report"
    summary = write_report(db.runs(), out, lambda d, b, t: caches[d], ["nss"], progress=False)
    names = {p.name for p in summary.tables}
    for table in ("table1-2_backbones", "table3_cross", "table4_masking", "table6_activations", "tableS3_dropout"):
        assert {f"{table}.md", f"{table}.csv", f"{table}.tex"} <= names
    assert "tableS1_regimes.md" not in names  # one regime: it would repeat Tables 1, 2 row for row
    assert "Table S1: regimes (frozen, lora, full): not written (same rows as Tables 1, 2 (one regime: frozen))" in summary.notes
    masking = (out / "tables" / "table4_masking.md").read_text()
    agiqa_30 = next(line for line in masking.splitlines() if line.startswith("| baseline | 30 |"))
    assert "incomplete" in agiqa_30  # Group 1's Δ needs kadid10k, which never ran
    assert "not run" in next(line for line in masking.splitlines() if line.startswith("| gated | 100 |"))

    figure_names = {p.name for p in summary.figures}
    expected = {"srcc_vs_k_masking", "srcc_vs_k_dropout", "gates_final", "gates_epochs_siglip2_clive_frozen_gated",
                "curves_siglip2_clive_frozen", "curves_siglip2_clive_to_koniq10k_frozen", "tsne_siglip2__clive",
                "tsne_siglip2__agiqa1k"}
    assert {f"{n}.{s}" for n in expected for s in ("png", "pdf")} <= figure_names
    assert all(p.stat().st_size > 1000 for p in summary.figures)
    index = (out / "index.html").read_text()
    for path in summary.figures + summary.tables + [out / "profile.md"]:
        assert f'"{path.relative_to(out).as_posix()}"' in index
    assert "n/a (CPU features)" in index and "<b>" in index

    old = set((out / "figures").iterdir())
    write_report(db.runs(), out, None, [], progress=False)  # a second report replaces the first whole
    assert not (out / "profile.md").exists() and set((out / "figures").iterdir()) < old
    with pytest.raises(ValueError, match="unknown backbone"):
        write_report(db.runs(), out, None, ["nope"])


def test_table_notes_name_the_selection_rule_of_their_cells():
    runs = [{**record("clive", "baseline", 8, 0.8)[1], "select": rule, "best_srcc": 0.8, "best_plcc": 0.7,
             "last_srcc": 0.8, "last_plcc": 0.7, "status": "done"} for rule in ("test",)]
    assert "select=test: the epoch of best test SRCC (the paper's protocol; optimistic" in results_table(runs)
    both = runs + [{**runs[0], "select": "val", "seed": 19}]
    table = results_table(both)
    assert "select=test" in table and "select=val: the epoch of best SRCC on a validation part" in table
    assert "last epoch per run" in results_table(runs, which="last")


def test_prediction_against_mos_comes_from_the_kept_weights_and_reproduces_the_recorded_srcc(tmp_path, one_thread):
    from iqa.heads.report.scatter import kept_predictions

    caches = {d: fake_cache(d) for d in ("clive", "koniq10k")}
    db = ResultsDB(tmp_path / "results.sqlite")
    heads = head_choices(["baseline", "hyper", "ridge", "knn"], [])
    configs = expand_grid([("clive", "clive")], "siglip2", heads, [8], epochs=2, lr=1e-3)
    configs += expand_grid([("clive", "koniq10k")], "siglip2", heads[2:], [8])
    records = run_grid(configs, caches.__getitem__, db, progress=False)
    for run in records:
        test = caches[run["test_dataset"]]
        p = kept_predictions(run, db.path, caches["clive"], caches["clive"] if test is caches["clive"] else test)
        assert len(p["pred"]) == (14 if run["test_dataset"] == "clive" else 70)
        assert p["srcc"] == pytest.approx(run["best_srcc"], abs=1e-5), run["head"]
    summary = write_report(db.runs(), tmp_path / "report", lambda d, b, t: caches[d], [], tsne=False, progress=False,
                           results_db=db.path)
    names = {p.name for p in summary.figures}
    assert {"scatter_siglip2__clive.png", "scatter_siglip2__clive_to_koniq10k.png"} <= names, names
    assert "Prediction against MOS on the test split: siglip2, clive, seed 8" in (tmp_path / "report" / "index.html").read_text()
