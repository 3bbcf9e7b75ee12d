"""config.json is one typed record (`ModelConfig`), and where a backbone's weights come from is one field."""

import json
import shutil

import pytest
import torch

import iqa
from iqa.errors import SettingError
from iqa.extract.registry import WEIGHTS, tag_weights, weights_tag
from iqa.extract.run import ExtractRequest
from iqa.heads.saved.config import CHECKSUM_FIELD, ModelConfig, config_checksum, write_config
from iqa.heads.saved.model import ModelFolderError
from helpers import extract, head, iqa as run_iqa, one_error_line, toy_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A head on the tiny dinov2 store of "toy", exported; and the images it scores."""
    cache = tmp_path_factory.mktemp("cache")
    paths = toy_dataset(cache, n=16)
    assert extract(cache).ok
    trained = head(cache)
    assert trained.exit_code == 0, trained.output
    key = json.loads(trained.stdout.splitlines()[0])["key"]
    out = cache / "model"
    assert run_iqa("export", key, "--out", out, "--cache", cache).exit_code == 0
    return out, [cache / "images" / p for p in paths[:4]]


def resealed(folder, tmp_path, change):
    """A copy of the model folder whose config.json was changed by `change` and given a matching checksum."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    write_config(copy, {k: v for k, v in config.items() if k != CHECKSUM_FIELD})
    return copy


def test_config_json_is_the_model_config_record_whole(tiny_model):
    folder, _ = tiny_model
    raw = json.loads((folder / "config.json").read_text())
    config = iqa.load_model(folder).config
    assert isinstance(config, ModelConfig)
    assert config.to_dict() | {CHECKSUM_FIELD: config_checksum(config.to_dict())} == raw  # nothing left out or added
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.backbone.weights == "tiny" and config.backbone.tag == "tiny" and config.backbone.layers is None
    assert "layers" not in raw["backbone"] and "bundled" not in raw["backbone"]  # optional fields are left out unset
    assert config.targets.mos.apply(0.5) == pytest.approx(raw["targets"]["mos"]["scale"] * 0.5 + raw["targets"]["mos"]["offset"])


def test_a_folder_exported_before_the_weights_field_reads_them_from_its_tag(tiny_model, tmp_path):
    folder, images = tiny_model
    older = resealed(folder, tmp_path, lambda c: c["backbone"].pop("weights"))
    assert "weights" not in json.loads((older / "config.json").read_text())["backbone"]
    model = iqa.load_model(older)
    assert model.config.backbone.weights == "tiny"
    assert torch.equal(model.score(images), iqa.load_model(folder).score(images))


@pytest.mark.parametrize("change, words", [
    (lambda c: c["backbone"].update(weights="huge"), ("huge", "pretrained, random-init, tiny")),
    (lambda c: c["head"].update(width=512), ("width",)),  # a key no export writes
    (lambda c: c.pop("metrics"), ("metrics",)),
])
def test_a_config_iqa_never_wrote_is_one_error_even_with_a_matching_checksum(tiny_model, tmp_path, change, words):
    folder, images = tiny_model
    forged = resealed(folder, tmp_path, change)
    with pytest.raises(ModelFolderError, match="does not hold a model iqa can rebuild"):
        iqa.load_model(forged)
    one_error_line(run_iqa("score", forged, images[0], "--workers", "0"), "does not hold a model iqa can rebuild", *words)


def test_weights_are_one_field_and_a_store_tag_says_them_back():
    assert [weights_tag(w) for w in WEIGHTS] == [None, "random-init", "tiny"]
    assert [tag_weights(weights_tag(w)) for w in WEIGHTS] == list(WEIGHTS)
    assert tag_weights("my-checkpoint") == tag_weights("tiny-lora-r4-sig-s8") == "pretrained"
    with pytest.raises(SettingError, match="weights must be one of pretrained, random-init, tiny"):
        weights_tag("small")


def test_extraction_refuses_weights_that_its_store_name_would_misstate(tmp_path):
    with pytest.raises(SettingError, match="tag tiny is kept for tiny weights"):
        ExtractRequest(tmp_path, "toy", "dinov2", tag="tiny")  # pretrained features in dinov2@tiny.zarr
    assert ExtractRequest(tmp_path, "toy", "dinov2", weights="tiny", tag="tiny").spec.resolution == 32
    toy_dataset(tmp_path, n=4)
    cli = ("extract", "--backbone", "dinov2", "--dataset", "toy", "--cache", tmp_path)
    with pytest.raises(SettingError, match="weights must be one of pretrained, random-init, tiny, got 'small'"):
        ExtractRequest(tmp_path, "toy", "dinov2", weights="small")  # before any manifest or model is read
    refused = run_iqa(*cli, "--weights", "small")  # an argument error, as the command line's other choices
    assert refused.exit_code == 2 and "'small' is not one of" in " ".join(refused.output.replace("│", " ").split())
    one_error_line(run_iqa(*cli, "--tag", "random-init"), "--tag random-init is kept for random-init weights (--weights random-init)")
    one_error_line(run_iqa(*cli, "--model", tmp_path, "--weights", "tiny"), "--model gives pretrained weights")
    assert not list(tmp_path.glob("toy/*.zarr"))  # refused before any store was made
