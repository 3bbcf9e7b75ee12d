"""Zero-shot quality from the backbones' own text towers: tiny CLIP and SigLIP models (both towers,
random weights) saved to disk, a small dataset extracted through them, scores checked against the
models' own logits computed by hand from the images."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from typer.testing import CliRunner

from iqa.cache.results import ResultsDB, default_db
from iqa.cache.load import load_cached
from iqa.cli import app
from iqa.data.prepare import prepare_dataset
from iqa.data.splits import split_indices
from iqa.extract.preprocess import decode_image, normalise, resize_uint8
from iqa.extract.registry import get_spec
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.zeroshot.prompts import NAMED, parse_set, prompt_sets, read_prompts_file
from iqa.heads.zeroshot.runs import run_zeroshot
from iqa.heads.zeroshot.text import text_cache_path

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
PAD, BOS, EOS = 0, 2, 3
SETS = [NAMED["clipiqa"], NAMED["pyiqa"], parse_set("Sharp photo.|Blurry photo.;Clean photo.|Noisy photo.")]

TAG = "local"  # the folder the tiny checkpoints are saved in: their stores are <backbone>@local.zarr


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer built offline: <s> prompt </s>, end token last as CLIP's tower expects."""
    vocab = {"<pad>": PAD, "<unk>": 1, "<s>": BOS, "</s>": EOS, **{chr(c): c - 28 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def save_model(folder, kind: str):
    text = dict(TOWER, vocab_size=99, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    vision = dict(TOWER, image_size=32, patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=dict(text, max_position_embeddings=77, projection_dim=16),
                                         vision_config=dict(vision, projection_dim=16), projection_dim=16)
        model = transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=dict(text, max_position_embeddings=64), vision_config=vision)
        model = transformers.SiglipModel(config)
        with torch.no_grad():
            model.logit_bias.fill_(-3.0)  # a bias that must cancel
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache with a 12-image dataset and float32 stores from a saved tiny CLIP and SigLIP."""
    root = tmp_path_factory.mktemp("zs")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,score"]
    for i in range(12):
        noise = rng.normal(0, 8 * i, (40, 48, 3))
        base = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(images / f"im{i}.png")
        lines.append(f"im{i}.png,{95 - 7 * i + rng.normal()}")
    (images / "labels.csv").write_text("\n".join(lines) + "\n")
    cache = root / "cache"
    prepare_dataset("csv", images, cache, labels="labels.csv", image_col="image", score_col="score",
                    score_range="0,100", name="toy")
    models_ = {}
    for backbone, kind in (("clip", "clip"), ("siglip2", "siglip")):
        folder = root / kind / TAG  # a local checkpoint's store is tagged with its folder's name
        models_[backbone] = save_model(folder, kind), folder
        request = ExtractRequest(cache, "toy", backbone, source=str(folder), dtype="float32", store_dtype="float32",
                                 progress=False)
        assert extract_dataset(request, num_workers=0).ok
    return cache, models_


def by_hand(model, folder, backbone: str, cache, prompts: list[str]) -> torch.Tensor:
    """The model's own logits_per_image from the images (preprocessed as the store's recipe says),
    softmaxed over each pair, the positives' probabilities averaged."""
    cached = load_cached(cache, "toy", backbone, TAG)
    spec = get_spec(backbone)
    side = cached.fingerprint["resolution"]
    pixels = torch.stack([resize_uint8(decode_image(cache.parent / "images" / p)[0], side, spec.resample, None)
                          for p in cached.manifest.paths])
    pixels = normalise(pixels, spec.mean, spec.std)
    siglip = backbone == "siglip2"
    tokens = tokenizer()(prompts, return_tensors="pt", **(dict(padding="max_length", max_length=64) if siglip else dict(padding=True)))
    inputs = {"input_ids": tokens["input_ids"]} if siglip else dict(tokens)
    with torch.no_grad():
        logits = model(pixel_values=pixels, **inputs).logits_per_image
    return logits.reshape(len(pixels), -1, 2).softmax(-1)[..., 0].mean(-1)


@pytest.mark.parametrize("backbone", ["clip", "siglip2"])
def test_scores_equal_the_models_own_logits(setup, backbone, one_thread):
    cache, models_ = setup
    model, folder = models_[backbone]
    db = ResultsDB(default_db(cache))
    rows = run_zeroshot(cache, [backbone], ["toy"], SETS, [8, 19], db, tag=TAG)
    cached = load_cached(cache, "toy", backbone, TAG)
    for row in rows:
        expected = by_hand(model, folder, backbone, cache, row.prompts.prompts)
        targets = torch.as_tensor(cached.manifest.targets, dtype=torch.float64)
        from iqa.heads.training.metrics import plcc, srcc

        whole = [r for r in row.records if r["evaluated_on"] == "all"][0]
        assert whole["best_srcc"] == pytest.approx(float(srcc(expected[None].double(), targets[None])[0]), abs=1e-5)
        assert whole["best_plcc"] == pytest.approx(float(plcc(expected[None].double(), targets[None])[0]), abs=1e-5)
        for record in row.records[:2]:  # the seeds' runs: the heads' test rows of that seed
            _, test = split_indices(cached.manifest.paths, record["seed"])
            assert record["best_srcc"] == pytest.approx(float(srcc(expected[test][None].double(), targets[test][None])[0]), abs=1e-5)
            assert record["head"] == "zeroshot" and record["prompts"] == row.prompts.name
    # the scores themselves, to 1e-5
    from iqa.heads.zeroshot.scoring import zero_shot_scores
    from iqa.heads.zeroshot.text import text_embeddings

    text = text_embeddings(cache, cached.fingerprint, "store", NAMED["pyiqa"].prompts)
    scores = zero_shot_scores(torch.as_tensor(cached.embeddings), torch.as_tensor(text.embeddings), text.logit_scale, text.logit_bias)
    assert torch.allclose(scores, by_hand(model, folder, backbone, cache, NAMED["pyiqa"].prompts), atol=1e-5)
    assert scores.std() > 1e-4  # the images are told apart: the comparison is not between constants


def test_sweep_reads_no_image_and_reuses_cached_text(setup, monkeypatch, one_thread):
    """A sweep over cached text loads no model; over new prompts it loads one and runs only its text tower."""
    cache, models_ = setup
    calls = {"vision": 0, "text": 0}
    for cls, kind in ((transformers.CLIPVisionModel, "vision"), (transformers.CLIPVisionModelWithProjection, "vision"),
                      (transformers.SiglipVisionModel, "vision"), (transformers.CLIPTextModel, "text"),
                      (transformers.SiglipTextModel, "text")):
        forward = cls.forward

        def counted(self, *args, _forward=forward, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    db = ResultsDB(cache / "sweep.sqlite")
    new = parse_set("Crisp picture.|Smeared picture.")
    rows = run_zeroshot(cache, ["clip", "siglip2"], ["toy"], [*SETS, new], [8, 19, 25], db, tag=TAG)
    assert calls == {"vision": 0, "text": 2}  # the new prompts once per checkpoint, no image
    assert len(rows) == 8 and len(db.runs()) == 8 * 4
    loaded = []
    monkeypatch.setattr("iqa.heads.zeroshot.text.load_vision_language", lambda *a: loaded.append(a))
    run_zeroshot(cache, ["clip", "siglip2"], ["toy"], [*SETS, new], [8, 19, 25], db, tag=TAG)
    assert loaded == [] and calls["text"] == 2  # all cached: no model at all
    entries = json.loads(text_cache_path(cache, load_cached(cache, "toy", "clip", TAG).fingerprint).read_text())["entries"]
    assert {e["prompt"] for e in entries.values()} >= set(new.prompts)
    by_hand(*models_["clip"], "clip", cache, new.prompts)
    assert calls["vision"] > 0  # the counters see an image pass where there is one
    clip_text = text_cache_path(cache, load_cached(cache, "toy", "clip", TAG).fingerprint)
    clip_text.write_text("{half a file")  # a damaged cache file is recomputed, not trusted
    monkeypatch.undo()
    again = run_zeroshot(cache, ["clip"], ["toy"], [new], [8], db, tag=TAG)
    assert again[0].records[-1]["best_srcc"] == rows[3].records[-1]["best_srcc"]
    assert json.loads(clip_text.read_text())["entries"]


def test_cli_sweep_records_runs_and_names_the_best(setup, tmp_path):
    cache, _ = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two sets\nsharpness = Sharp photo.|Blurry photo.\nclipiqa\n")
    result = CliRunner().invoke(app, ["zeroshot", "--backbone", "clip,siglip2", "--dataset", "toy", "--tag", TAG, "--prompts-file",
                                      str(prompts), "--seeds", "8,19", "--cache", str(cache), "--db", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 0, result.output
    assert result.output.count("**best**") == 2  # one per store
    table = CliRunner().invoke(app, ["results", "--layout", "variants", "--db", str(tmp_path / "r.sqlite"), "--cache", str(cache)])
    assert table.exit_code == 0 and "zeroshot" in table.output and "sharpness" in table.output, table.output



def test_cli_learns_prompts_and_refuses_bad_settings_in_one_line(setup, tmp_path):
    cache, _ = setup
    base = ["zeroshot", "--backbone", "clip", "--dataset", "toy", "--tag", TAG, "--prompts", "clipiqa", "--seeds", "8", "--learn-prompts",
            "--cache", str(cache), "--db", str(tmp_path / "r.sqlite")]
    result = CliRunner().invoke(app, [*base, "--epochs", "2", "--batch-size", "4", "--context", "2"])
    assert result.exit_code == 0, result.output
    (run,) = ResultsDB(tmp_path / "r.sqlite").runs()
    assert run["head"] == "learned-prompts" and run["epochs"] == 2 and len(run["curves"]["srcc"]) == 2
    for extra, said in ((["--select", "best"], "selection rule"), (["--loss", "hinge"], "unknown loss"),
                        (["--batch-size", "12"], "cannot fill one batch")):  # the toy split trains on 10 rows
        result = CliRunner().invoke(app, [*base, *extra])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # beside progress bars
        assert result.exit_code == 1 and len(errors) == 1 and said in errors[0], result.output
        assert "Traceback" not in result.output and result.output.rstrip().endswith(errors[0])
    result = CliRunner().invoke(app, [*base[:-7], "--epochs", "3", "--cache", str(cache)])  # no --learn-prompts
    assert result.exit_code == 1 and result.output.startswith("error: --epochs set how prompts are learned"), result.output


def test_store_without_text_tower_is_refused_in_one_line(setup, tmp_path):
    cache, _ = setup
    vision_only = tmp_path / "vision-only"
    config = transformers.CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(vision_only)
    assert extract_dataset(ExtractRequest(cache, "toy", "clip", source=str(vision_only), tag="vision", dtype="float32",
                                          progress=False), num_workers=0).ok
    assert extract_dataset(ExtractRequest(cache, "toy", "clip", weights="tiny", dtype="float32", progress=False), num_workers=0).ok
    assert extract_dataset(ExtractRequest(cache, "toy", "nss", progress=False), num_workers=0).ok
    for backbone, tag in (("clip", "vision"), ("clip", "tiny"), ("nss", None)):
        chosen = ["--tag", tag] if tag else []
        result = CliRunner().invoke(app, ["zeroshot", "--backbone", backbone, "--dataset", "toy", *chosen, "--cache", str(cache)])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "text tower" in lines[0], result.output


def test_prompt_sets_parse_and_refuse(tmp_path):
    assert prompt_sets([], None) == [NAMED["pyiqa"]]
    assert len(NAMED["pyiqa"].pairs) == 5 and NAMED["clipiqa"].pairs == (("Good photo.", "Bad photo."),)
    two = parse_set("Good photo.|Bad photo.; Sharp.|Blurry.")
    assert two.pairs == (("Good photo.", "Bad photo."), ("Sharp.", "Blurry.")) and two.prompts[1] == "Bad photo."
    for bad in ("Good photo.", "a|b|c", "|bad", ""):
        with pytest.raises(ValueError):
            parse_set(bad)
    with pytest.raises(ValueError, match="twice"):
        prompt_sets(["clipiqa", "clipiqa"], None)
    from iqa.heads.zeroshot.text import check_template

    check_template("a photo that looks {}")
    for bad in ("no slot", "{x} photo", "{} and {}", "{0} {1}"):
        with pytest.raises(ValueError, match="--template"):
            check_template(bad)
    lines = tmp_path / "p.txt"
    lines.write_text("x = a|b\nbroken\n")
    with pytest.raises(ValueError, match="line 2"):
        read_prompts_file(lines)


@pytest.mark.parametrize("backbone", ["clip", "siglip2"])
def test_learned_prompts_reduce_the_loss_and_keep_their_text(setup, backbone, one_thread):
    from iqa.heads.saved.weights import run_weights_path
    from iqa.heads.training.metrics import srcc
    from iqa.heads.zeroshot.learn import LearnSettings
    from iqa.heads.zeroshot.runs import run_learned
    from iqa.heads.zeroshot.scoring import zero_shot_scores
    from safetensors.torch import load_file

    cache, models_ = setup
    db = ResultsDB(cache / f"learn-{backbone}.sqlite")
    settings = LearnSettings(context=4, epochs=6, lr=0.05, batch_size=4, select="test")
    (row,) = run_learned(cache, [backbone], ["toy"], [NAMED["clipiqa"]], [8], db, settings, tag=TAG, progress=False)
    (run,) = row.records
    assert run["head"] == "learned-prompts" and run["context"] == 4 and run["status"] == "done"
    losses = run["curves"]["train_loss"]
    assert losses[-1] < losses[0], losses
    weights = load_file(run_weights_path(db.path, run["key"]))
    cached = load_cached(cache, "toy", backbone, TAG)
    scores = zero_shot_scores(torch.as_tensor(cached.embeddings), weights["text_embeddings"], float(weights["logit_scale"]),
                              float(weights["logit_bias"]))
    _, test = split_indices(cached.manifest.paths, 8)
    targets = torch.as_tensor(cached.manifest.targets[test], dtype=torch.float64)
    assert float(srcc(scores[test][None].double(), targets[None])[0]) == pytest.approx(run["best_srcc"], abs=1e-6)
    assert weights["context"].shape[:2] == (2, 4)
    again = run_learned(cache, [backbone], ["toy"], [NAMED["clipiqa"]], [8], db, settings, tag=TAG, progress=False)
    assert again[0].records[0]["finished_at"] == run["finished_at"]  # finished: not trained again



def test_prompt_learner_trains_only_its_context(setup, one_thread):
    """Through the text tower and back: the context gets gradients, the model's own weights none; with the
    context equal to the placeholders' own embeddings the learner gives the written prompts' embeddings."""
    from iqa.extract.backbones import state_sha256
    from iqa.heads.zeroshot.learn import PromptLearner
    from iqa.heads.zeroshot.text import text_features

    _, models_ = setup
    model = transformers.CLIPModel.from_pretrained(models_["clip"][1]).eval()
    before = state_sha256(model.state_dict())
    learner = PromptLearner(model, "clip", tokenizer(), ["Good photo.", "Bad photo."], 3, seed=8)
    learner().sum().backward()
    assert learner.context.grad is not None and learner.context.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert state_sha256(model.state_dict()) == before
    with torch.no_grad():  # the placeholders' own word vectors in place: the tower sees the token ids as written
        learner.context.copy_(model.text_model.get_input_embeddings()(learner.inputs["input_ids"][:, learner.span]))
        plain = text_features(model, learner.inputs)
        assert torch.allclose(learner(), plain, atol=1e-6)
        learner.context.add_(torch.randn(learner.context.shape, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(learner(), plain, atol=1e-3)  # the hook's vectors are what the tower reads


@pytest.mark.parametrize("learned", [False, True])
def test_exported_text_runs_score_images_from_disk_as_the_cache_did(setup, tmp_path, learned, one_thread):
    """`iqa export` of a zero-shot or learned-prompts run, then `iqa score` on the image files: the scores the
    stored embeddings give with the run's kept text, to 1e-5."""
    from safetensors.torch import load_file

    from iqa.heads.saved.weights import run_weights_path
    from iqa.heads.zeroshot.learn import LearnSettings
    from iqa.heads.zeroshot.runs import run_learned
    from iqa.heads.zeroshot.scoring import zero_shot_scores

    cache, _ = setup
    db = ResultsDB(tmp_path / "r.sqlite")
    if learned:
        settings = LearnSettings(context=2, epochs=2, lr=0.05, batch_size=4)
        (row,) = run_learned(cache, ["siglip2"], ["toy"], [NAMED["clipiqa"]], [8], db, settings, tag=TAG, progress=False)
    else:
        (row,) = run_zeroshot(cache, ["siglip2"], ["toy"], [NAMED["pyiqa"]], [8], db, tag=TAG)
    run = row.records[0]
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", run["key"][:12], "--out", str(out), "--cache", str(cache), "--db", str(db.path),
                                      "--bundle"])  # a local checkpoint travels in the folder
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["head"]["prompts"] == row.prompts.name and "text tower" in (out / "README.md").read_text()

    cached = load_cached(cache, "toy", "siglip2", TAG)
    paths = [f"{cached.manifest.image_root}/{p}" for p in cached.manifest.paths]
    scored = CliRunner().invoke(app, ["score", str(out), *paths, "--json", "--workers", "0", "--device", "cpu"])
    assert scored.exit_code == 0, scored.output
    scores = torch.tensor([json.loads(line)["score"] for line in scored.stdout.splitlines() if line.startswith("{")])
    kept = load_file(run_weights_path(db.path, run["key"]))
    expected = zero_shot_scores(torch.as_tensor(cached.embeddings), kept["text_embeddings"], kept["logit_scale"],
                                kept["logit_bias"])
    assert len(scores) == 12 and torch.allclose(scores, expected, atol=1e-5)
    assert scores.std() > 1e-4
    from_store = CliRunner().invoke(app, ["score", str(out), "--dataset", "toy", "--json", "--cache", str(cache), "--device", "cpu"])
    assert from_store.exit_code == 0 and "scored from its embedding store" in from_store.stderr, from_store.output
    stored = torch.tensor([json.loads(line)["score"] for line in from_store.stdout.splitlines() if line.startswith("{")])
    assert torch.allclose(stored, expected, atol=1e-6)


def test_unreadable_images_are_left_out(setup, tmp_path, one_thread):
    """A store with an invalid row (a corrupt file): zero-shot and learned runs score the readable rows only."""
    import shutil

    from iqa.heads.zeroshot.learn import LearnSettings
    from iqa.heads.zeroshot.runs import run_learned

    cache, models_ = setup
    images = tmp_path / "images"
    shutil.copytree(cache.parent / "images", images)
    (images / "im3.png").write_bytes(b"not a png")
    prepare_dataset("csv", images, cache, labels="labels.csv", image_col="image", score_col="score",
                    score_range="0,100", name="toybad")
    request = ExtractRequest(cache, "toybad", "clip", source=str(models_["clip"][1]), dtype="float32",
                             store_dtype="float32", skip_bad=True, progress=False)
    assert len(extract_dataset(request, num_workers=0).invalid) == 1
    db = ResultsDB(tmp_path / "r.sqlite")
    (row,) = run_zeroshot(cache, ["clip"], ["toybad"], [NAMED["pyiqa"]], [8, 19], db, tag=TAG)
    (good,) = run_zeroshot(cache, ["clip"], ["toy"], [NAMED["pyiqa"]], [8, 19], db, tag=TAG)
    assert all(np.isfinite(r["best_srcc"]) for r in row.records)
    assert row.records[-1]["best_srcc"] != good.records[-1]["best_srcc"]  # 11 rows, not the 12 of the clean set
    settings = LearnSettings(context=2, epochs=2, lr=0.05, batch_size=4)
    (learned,) = run_learned(cache, ["clip"], ["toybad"], [NAMED["clipiqa"]], [8], db, settings, tag=TAG, progress=False)
    assert learned.records[0]["status"] == "done" and np.isfinite(learned.records[0]["best_srcc"])
