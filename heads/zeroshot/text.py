"""Text embeddings of prompts from the checkpoint an embedding store was made from, cached on disk.

The store's fingerprint names its checkpoint (`model_id`, `revision`) and the checksum of the
vision tower that made its rows (`weights_sha256`). The whole vision-language model is loaded
from there (CLIPModel or SiglipModel), its vision tower checked against that checksum (a
checkpoint that changed since extraction is refused: its text would not match the stored images),
and each prompt goes through the text tower as it was trained:
- CLIP: its own tokenizer (start and end tokens; the tower pools at the end token), padded to the
  longest prompt; the projected `text_embeds`.
- SigLIP / SigLIP2: padded to the text tower's `max_position_embeddings` (64 in every released
  checkpoint: "padding='max_length', max_length=64" as the transformers docs require, since the
  tower pools the last position and was trained on padded text), with no attention mask, as the
  model's own forward pass is called there.
Each embedding is kept under `<cache>/zeroshot/text/<checkpoint>.json` by (prompt, template), with
the model's `logit_scale` and `logit_bias`, so a prompt sweep loads the model only for prompts it
has not seen and a sweep of seen prompts costs no model at all.
"""

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iqa.cache.atomic import atomic_path
from iqa.extract.registry import BACKBONES, get_spec, random_source

# model_type of the checkpoint's config -> (transformers class with both towers, the pooling its image embedding is)
VISION_LANGUAGE = {"clip": ("CLIPModel", "image_embeds"), "siglip": ("SiglipModel", "pooler_output")}
VISION_TOWERS = ("CLIPVisionModelWithProjection", "SiglipVisionModel")  # registry classes of vision-language towers
TEXT_DIR = "zeroshot/text"
TEMPLATE = "{}"  # the prompt as written


class NoTextTower(ValueError):
    """The store's checkpoint has no text tower to score with; the message is one line for the user."""


@dataclass
class TextEmbeddings:
    """Unnormalised text embeddings [P, D] of `prompts` (in order) and the model's logit scale and bias."""

    prompts: list[str]
    embeddings: np.ndarray
    logit_scale: float  # log of the temperature, as the model holds it
    logit_bias: float  # SigLIP's; 0 for CLIP


def checkpoint_of(fingerprint: dict, store: str) -> str:
    """The checkpoint a store was made from, refused in one line when it cannot have a matching text tower."""
    backbone = fingerprint.get("backbone")
    if getattr(BACKBONES.get(backbone), "model_class", None) not in VISION_TOWERS:
        raise NoTextTower(f"{store} holds {backbone} features, a backbone with no text tower; zero-shot scoring takes "
                          f"the vision-language backbones ({', '.join(k for k, v in BACKBONES.items() if v.model_class in VISION_TOWERS)})")
    source = fingerprint.get("model_id") or ""
    if random_source(source) or not source:
        raise NoTextTower(f"{store} was made from {source or 'no checkpoint'}, a random model with no text tower; "
                          f"zero-shot needs a store extracted from a CLIP or SigLIP checkpoint (its HF id or --model DIR)")
    if "tuned" in fingerprint:
        raise NoTextTower(f"{store} holds a fine-tuned vision tower, no longer aligned with its checkpoint's text tower; "
                          "use the base model's store")
    return source


def check_template(template: str) -> None:
    try:
        placed = template.format("\0")
    except (IndexError, KeyError, ValueError):
        placed = ""
    if "\0" not in placed:
        raise ValueError(f"--template must hold one {{}} where the prompt goes (literal braces doubled), got {template!r}")


def checkpoint_id(fingerprint: dict) -> str:
    """The cache file name of a checkpoint's text embeddings: its source, revision and vision weights."""
    named = {k: fingerprint.get(k) for k in ("model_id", "revision", "weights_sha256")}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]


def entry_key(prompt: str, template: str) -> str:
    return hashlib.sha256(f"{template}\0{prompt}".encode()).hexdigest()[:16]


def text_cache_path(cache: Path, fingerprint: dict) -> Path:
    return Path(cache) / TEXT_DIR / f"{checkpoint_id(fingerprint)}.json"


def text_embeddings(cache: Path, fingerprint: dict, store: str, prompts: list[str],
                    template: str = TEMPLATE) -> TextEmbeddings:
    """The prompts' embeddings from the store's checkpoint: from the disk cache, computing only the missing ones."""
    checkpoint = checkpoint_of(fingerprint, store)
    check_template(template)
    path = text_cache_path(cache, fingerprint)
    held = read_text_cache(path, fingerprint)
    missing = list(dict.fromkeys(p for p in prompts if entry_key(p, template) not in held["entries"]))
    if missing:
        model, kind = load_vision_language(checkpoint, fingerprint, store)
        computed = encode(model, kind, checkpoint, [template.format(p) for p in missing])
        held.update({k: fingerprint.get(k) for k in ("model_id", "revision", "weights_sha256")})
        held["logit_scale"] = float(model.logit_scale.detach())
        held["logit_bias"] = float(model.logit_bias.detach()) if hasattr(model, "logit_bias") else 0.0
        for prompt, vector in zip(missing, computed):
            held["entries"][entry_key(prompt, template)] = {"prompt": prompt, "template": template,
                                                           "embedding": vector.tolist()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(held))
    vectors = np.array([held["entries"][entry_key(p, template)]["embedding"] for p in prompts], dtype=np.float32)
    return TextEmbeddings(list(prompts), vectors, held["logit_scale"], held["logit_bias"])


def read_text_cache(path: Path, fingerprint: dict) -> dict:
    """The cached entries of the store's checkpoint; an unreadable file, or one of another checkpoint, is
    started afresh (it is iqa's own cache: its entries are recomputed and the file rewritten whole)."""
    try:
        held = json.loads(path.read_text())
        if all(held.get(k) == fingerprint.get(k) for k in ("model_id", "revision", "weights_sha256")):
            return held
    except (OSError, ValueError, AttributeError):
        pass
    return {"entries": {}}


def load_vision_language(source: str, fingerprint: dict, store: str):
    """(the whole model with both towers, its model_type), its vision tower checked against the store's checksum."""
    import transformers

    from iqa.extract.backbones import BackboneLoadError, load_backbone, weights_sha256

    offline = Path(source).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"cannot read the checkpoint {source!r} {store} was made from "
                                f"({str(err).splitlines()[0][:120]}); make it reachable (download it) and run again") from None
    kind = config.get("model_type", "")
    if kind not in VISION_LANGUAGE:
        raise NoTextTower(f"{store} was made from {source!r}, a {kind or 'vision'} checkpoint with no text tower; zero-shot "
                          f"needs a store extracted from a whole CLIP or SigLIP checkpoint (model_type {' or '.join(VISION_LANGUAGE)})")
    class_name, pooling = VISION_LANGUAGE[kind]
    if not str(fingerprint.get("pooling")).startswith(pooling):
        raise NoTextTower(f"{store} holds {fingerprint.get('pooling')} features; {kind} text embeddings match its {pooling}")
    with quiet_loading():  # the vision class reports the text tower's weights as unexpected: they are
        vision = load_backbone(get_spec(fingerprint["backbone"]), source=source)  # as extraction loaded it
    if weights_sha256(vision) != fingerprint.get("weights_sha256"):
        raise ValueError(f"{source!r} no longer holds the vision weights {store} was extracted with (checksum differs); "
                         "re-extract the store, or restore the checkpoint it was made from")
    model = getattr(transformers, class_name).from_pretrained(source, local_files_only=offline, dtype=torch.float32)
    return model.eval(), kind


@contextmanager
def quiet_loading():
    """transformers' load report at error level only, for the duration."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def tokenizer_of(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=Path(source).is_dir())


def pad_inputs(tokenizer, model, kind: str, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token ids (special tokens included) padded as the tower was trained: SigLIP to its full length
    with no mask, CLIP to the longest with the mask."""
    if kind == "siglip":
        length = model.config.text_config.max_position_embeddings
        padded = tokenizer.pad({"input_ids": [row[:length] for row in ids]}, padding="max_length", max_length=length,
                               return_tensors="pt")
        return {"input_ids": padded["input_ids"]}
    padded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}


def text_features(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text tower's embeddings [P, D] (unnormalised, as get_text_features returns them)."""
    features = model.get_text_features(**inputs)
    return getattr(features, "pooler_output", features)  # transformers 5 returns an output object


@torch.inference_mode()
def encode(model, kind: str, source: str, texts: list[str]) -> np.ndarray:
    tokenizer = tokenizer_of(source)
    ids = [tokenizer(text, truncation=True)["input_ids"] for text in texts]
    return text_features(model, pad_inputs(tokenizer, model, kind, ids)).float().numpy()
