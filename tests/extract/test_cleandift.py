"""CleanDIFT on tiny configs of the real classes (diffusers UNet, AutoencoderKL, CLIPTextModel)."""

import numpy as np
import pytest
import torch

from iqa.cache.load import load_cached
from iqa.extract.backbones import load_backbone
from iqa.extract.cleandift import LATENT_SCALE, RECIPE, TIMESTEP, tap_modules
from iqa.extract.registry import get_spec
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.cache.results import ResultsDB
from helpers import bright_dataset, by_hand, make_dataset, straight_and_resumed

pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedding_is_the_pooled_decoder_taps_computed_by_hand():
    backbone = load_backbone(get_spec("cleandift", weights="tiny"), weights="tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        got = backbone(x)
        latent = backbone.vae.encode(x).latent_dist.mean * LATENT_SCALE
        seen = []
        handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
                   for m in tap_modules(backbone.unet)]
        backbone._taps = []  # the backbone's own hooks also fire; only `seen` is checked
        backbone.unet(latent, TIMESTEP, encoder_hidden_states=backbone.prompt_embedding.expand(2, -1, -1))
        for h in handles:
            h.remove()
    assert [t.shape[1] for t in seen] == [64, 64, 32, 32]
    assert not hasattr(backbone.vae, "decoder")  # never run, so not carried (nor counted in Table S5)
    torch.testing.assert_close(got, torch.cat([t.mean(dim=(2, 3)) for t in seen], dim=1))
    again = load_backbone(get_spec("cleandift", weights="tiny"), weights="tiny")
    with torch.no_grad():
        assert torch.equal(again(x), got)  # same seeded weights, latent mean not a sample: deterministic


def test_extraction_stores_the_recipe_and_matches_per_image(tmp_path):
    paths = make_dataset(tmp_path, n=3)
    request = ExtractRequest(tmp_path, "toy", "cleandift", weights="tiny", dtype="float32", store_dtype="float32",
                             batch_size=2, progress=False)
    assert extract_dataset(request, num_workers=0).ok
    spec = get_spec("cleandift", weights="tiny")
    cached = load_cached(tmp_path, "toy", "cleandift", tag="tiny")
    assert cached.fingerprint["revision"] == RECIPE and cached.fingerprint["pooling"] == "cleandift"
    expected = by_hand(spec, load_backbone(spec, weights="tiny"), tmp_path / "images", paths)
    np.testing.assert_allclose(cached.embeddings, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cleandift has no layer taps"):  # its taps are pooled inside the module
        extract_dataset(ExtractRequest(tmp_path, "toy", "cleandift", weights="tiny", layers="all", tag="layers",
                                       progress=False), num_workers=0)


def test_lora_trains_only_unet_query_key_adapters_and_the_head_and_resumes_exactly(tmp_path):
    bright_dataset(tmp_path, n=8)
    options = dict(mode="lora", epochs=2, batch_size=2, accumulate=2, db=ResultsDB(tmp_path / "a.sqlite"))
    straight, resumed = straight_and_resumed(tmp_path, "cleandift", **options)
    assert resumed.result == straight.result
    from iqa.extract.checkpoint import load_checkpoint

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["backbone"].keys() == b["backbone"].keys()
    assert a["backbone"] and all("lora_" in k and ".unet." in f".{k}" and (".to_q." in k or ".to_k." in k)
                                 for k in a["backbone"])
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("backbone", "head") for k in a[p])


def test_full_mode_leaves_the_vae_frozen():
    backbone = load_backbone(get_spec("cleandift", weights="tiny"), weights="tiny").requires_grad_(True)
    assert all(p.requires_grad for p in backbone.unet.parameters())
    assert not any(p.requires_grad for p in backbone.vae.parameters())


def test_pretrained_needs_a_local_folder_and_missing_diffusers_says_how_to_install(monkeypatch, tmp_path):
    from iqa.extract.backbones import BackboneLoadError

    with pytest.raises(BackboneLoadError, match="pass model DIR"):
        load_backbone(get_spec("cleandift"))
    with pytest.raises(BackboneLoadError, match="could not load cleandift weights"):
        load_backbone(get_spec("cleandift"), source=str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    with pytest.raises(BackboneLoadError, match=r"pip install 'iqa\[diffusion\]'"):
        load_backbone(get_spec("cleandift", weights="tiny"), weights="tiny")


def _saved_sd21_folder(folder):
    """A tiny SD-2.1 folder laid out as the real one (unet/, vae/, text_encoder/, tokenizer/), saved and read back."""
    import json

    import diffusers
    import transformers

    configs = get_spec("cleandift").tiny_config
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**configs["unet"]).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(**configs["vae"]).save_pretrained(folder / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text"])).save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"!": 0, "<|startoftext|>": 98, "<|endoftext|>": 99}))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                               pad_token="!", model_max_length=77).save_pretrained(folder / "tokenizer")


def test_the_learned_timestep_is_read_from_the_full_checkpoint_and_recorded(tmp_path):
    from safetensors.torch import save_file

    from iqa.extract.backbones import BackboneLoadError
    from iqa.extract.cleandift import FULL_CHECKPOINT

    _saved_sd21_folder(tmp_path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    initial = load_backbone(get_spec("cleandift"), source=str(tmp_path))
    assert initial.timestep == TIMESTEP and initial.revision == RECIPE
    # The full file is the training module's state dict: the scalar beside the UNet's and adapters' weights.
    save_file({"timestep": torch.tensor(300.5), "unet_feature_extractor_cleandift.conv_in.bias": torch.zeros(32)},
              str(tmp_path / FULL_CHECKPOINT))
    learned = load_backbone(get_spec("cleandift"), source=str(tmp_path))
    assert learned.timestep == 300.5 and "t=300.5" in learned.revision and learned.revision != RECIPE
    with torch.no_grad():
        got, before = learned(x), initial(x)
        latent = learned.vae.encode(x).latent_dist.mean * LATENT_SCALE
        learned.unet(latent, 300.5, encoder_hidden_states=learned.prompt_embedding)
        by_hand_taps, learned._taps = learned._taps, []
    torch.testing.assert_close(got, torch.cat(by_hand_taps, dim=1))
    assert not torch.allclose(got, before)  # the timestep reaches the features, so it must reach the key
    save_file({"unet.conv_in.bias": torch.zeros(32)}, str(tmp_path / FULL_CHECKPOINT))
    with pytest.raises(BackboneLoadError, match="no 'timestep' tensor"):
        load_backbone(get_spec("cleandift"), source=str(tmp_path))
    (tmp_path / FULL_CHECKPOINT).write_bytes(b"not safetensors")
    with pytest.raises(BackboneLoadError, match="not a readable safetensors file"):
        load_backbone(get_spec("cleandift"), source=str(tmp_path))
