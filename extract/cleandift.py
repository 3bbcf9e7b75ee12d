"""CleanDIFT (Stable Diffusion 2.1) as a frozen feature extractor: normalised pixels [B, 3, H, W] ->
pooled decoder features [B, D].

The recipe (what the sources say: docs/backbones.md, "CleanDIFT"; they are silent on a cacheable
embedding, so these are iqa's choices, all in `RECIPE` and so in the store's fingerprint through `revision`):
pixels in [-1, 1] (the registry's mean/std 0.5), the VAE latent *mean* (not a sample: deterministic)
x 0.18215, the empty-prompt text embedding computed once at load, a fixed timestep (CleanDIFT's
initial value 261, or the trained value when the folder holds CleanDIFT's full checkpoint
`FULL_CHECKPOINT`), and forward hooks on the
decoder taps us3 (up_blocks[0]), us6 (up_blocks[1]), us9 (up_blocks[2]) and us10
(up_blocks[3].attentions[0]), each global-average-pooled and concatenated: 1280 + 1280 + 640 + 320
= 3,520 values at full size.

diffusers is an optional dependency (`pip install 'iqa[diffusion]'`), imported only here.
"""

import torch
from torch import nn

from iqa.extract.errors import BackboneLoadError

LATENT_SCALE = 0.18215
TIMESTEP = 261
TAPS = ("us3", "us6", "us9", "us10")
RECIPE = f"latent-mean*{LATENT_SCALE}|t={TIMESTEP}|empty-prompt|taps={','.join(TAPS)}|gap-concat"
# The state dict of CleanDIFT's training module (`StableFeatureAligner` in CompVis/cleandift's
# src/sd_feature_extraction.py), whose top-level parameter `timestep` is the learned scalar.
FULL_CHECKPOINT = "cleandift_sd21_full.safetensors"
TIMESTEP_KEY = "timestep"


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise BackboneLoadError("the cleandift backbone needs diffusers: `pip install 'iqa[diffusion]'`") from None
    return diffusers


def tap_modules(unet: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the taps us3, us6, us9, us10, in `TAPS` order."""
    return [unet.up_blocks[0], unet.up_blocks[1], unet.up_blocks[2], unet.up_blocks[3].attentions[0]]


class CleanDiftBackbone(nn.Module):
    """VAE encoder + UNet with hooks; the empty-prompt embedding is a buffer (computed once)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embedding: torch.Tensor, source: str,
                 timestep: float = TIMESTEP):
        super().__init__()
        self.unet = unet
        # Only the encoder half of the VAE is ever run: the decoder (~50 M parameters) is dropped, not carried.
        del vae.decoder, vae.post_quant_conv
        self.vae = vae.requires_grad_(False)
        self.register_buffer("prompt_embedding", prompt_embedding.detach().clone())
        self.timestep = timestep
        self.source = source
        self.revision = RECIPE if timestep == TIMESTEP else RECIPE.replace(f"t={TIMESTEP}", f"t={timestep!r}")
        self._taps: list[torch.Tensor] = []
        for module in tap_modules(unet):
            module.register_forward_hook(self._keep)

    def requires_grad_(self, requires_grad: bool = True) -> "CleanDiftBackbone":
        # Full fine-tuning trains the UNet only: the VAE stays frozen whatever the caller asks.
        self.unet.requires_grad_(requires_grad)
        return self

    def _keep(self, _module, _inputs, output):
        self._taps.append((output[0] if isinstance(output, tuple) else output).mean(dim=(2, 3)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mean * LATENT_SCALE
        text = self.prompt_embedding.expand(latent.shape[0], -1, -1).to(latent.dtype)
        self._taps = []
        self.unet(latent, self.timestep, encoder_hidden_states=text)
        taps, self._taps = self._taps, []
        return torch.cat(taps, dim=1).float()


def empty_prompt_embedding(text_encoder: nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([token_ids])).last_hidden_state


def _empty_prompt_ids(config) -> list[int]:
    """Token ids of "" for a tokenizer-free build: BOS, EOS, then padding (SD-2.1 pads with id 0)."""
    n = config.max_position_embeddings
    return [config.bos_token_id, config.eos_token_id] + [0] * (n - 2)


def build_cleandift(configs: dict, source: str) -> CleanDiftBackbone:
    """Random weights from configs {"unet", "vae", "text"} (the caller seeds the RNG)."""
    import transformers

    diffusers = _diffusers()
    unet = diffusers.UNet2DConditionModel(**configs["unet"])
    vae = diffusers.AutoencoderKL(**configs["vae"])
    text_config = transformers.CLIPTextConfig(**configs["text"])
    text = transformers.CLIPTextModel(text_config).eval()
    return CleanDiftBackbone(unet.eval(), vae.eval(), empty_prompt_embedding(text, _empty_prompt_ids(text_config)), source)


def learned_timestep(folder: str) -> float:
    """The trained timestep from `FULL_CHECKPOINT` in `folder` (read alone, not the whole file), else 261."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    path = Path(folder) / FULL_CHECKPOINT
    if not path.is_file():
        return TIMESTEP
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            if TIMESTEP_KEY not in checkpoint.keys():
                raise BackboneLoadError(f"{path} has no {TIMESTEP_KEY!r} tensor; it is not CleanDIFT's full checkpoint: "
                                        f"remove it to run at the initial timestep {TIMESTEP}")
            value = checkpoint.get_tensor(TIMESTEP_KEY)
    except SafetensorError as err:
        raise BackboneLoadError(f"{path} is not a readable safetensors file ({err}); replace or remove it") from None
    if value.numel() != 1 or not torch.isfinite(value).all():
        raise BackboneLoadError(f"{path}: {TIMESTEP_KEY!r} is not one finite number (shape {tuple(value.shape)})")
    return float(value.float().item())


def load_cleandift(source: str) -> CleanDiftBackbone:
    """A local SD-2.1 folder (unet/ holding the CleanDIFT UNet, vae/, text_encoder/, tokenizer/, and
    optionally `FULL_CHECKPOINT` for the learned timestep)."""
    import transformers

    diffusers = _diffusers()
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32)
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
        text = transformers.CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval()
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    except (OSError, ValueError) as err:
        raise BackboneLoadError(
            f"could not load cleandift weights from {source!r} ({str(err).splitlines()[0][:120]}); pass an SD-2.1 "
            f"folder (unet/ with the CleanDIFT weights, vae/, text_encoder/, tokenizer/) with --model, or use --weights random-init"
        ) from None
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    return CleanDiftBackbone(unet.eval(), vae.eval(), empty_prompt_embedding(text, ids), source,
                             timestep=learned_timestep(source))
