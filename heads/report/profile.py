"""Compute profile per backbone + head (Table S5): parameters, MACs at the backbone's resolution, peak memory.

MACs are counted, not estimated: torch's FlopCounterMode records every matmul and convolution of
one forward pass at batch 1 (FLOPs = 2 x MACs for both) and we halve its total. Elementwise work
(activations, norms, the gate's mixing) is not counted, as in fvcore, the paper's counter. The
paper's 423.99 G for SigLIP2 at 512 matches our count without the attention matmuls (`attention`
column: the batched matmuls of Q K^T and A V); we report both.

No weights are needed: the backbone is built from the registry's full-size config with random
initialisation on the meta device (shapes only, no memory, no arithmetic). Peak memory needs a
real forward pass: on CUDA the same random-init model runs once in bf16 autocast; without a GPU
the column says so.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from iqa.cache.location import backbone_label
from iqa.extract.backbones import BackboneLoadError, family_of, load_backbone
from iqa.extract.registry import get_spec, tag_weights
from iqa.heads.models.hyper import HYPER
from iqa.heads.models.mlp import HEADS
from iqa.heads.report.page import text_table
from iqa.heads.training.trainer import make_stack

ATTENTION_OPS = ("bmm", "scaled_dot_product")  # the score and value matmuls of attention


@dataclass
class ProfileRow:
    backbone: str
    head: str
    resolution: int | None
    backbone_params: int | None
    head_params: int
    backbone_macs: float | None  # counted MACs of one image's forward pass
    attention_macs: float | None  # the part of backbone_macs spent in attention matmuls
    head_macs: float
    peak_memory: str  # "1234 MiB", or why not measured
    weights: str  # what the backbone was built from
    note: str = ""


def count_macs(module: torch.nn.Module, *inputs) -> tuple[float, float]:
    """(total MACs, attention MACs) of one forward pass: FlopCounterMode's FLOPs / 2.

    Parameters are set not to need gradients while counting: the counter's module tracker hooks every
    module input that needs one, which fails under no_grad for a parameter passed in as an input (the
    Perception Encoder's attention pool passes its latent query)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    module.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*inputs)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in by_op.items() if any(name in str(op) for name in ATTENTION_OPS))
    return counter.get_total_flops() / 2, attention / 2


def head_profile(dim: int, head: str) -> tuple[int, float]:
    """(parameters, MACs) of one head (d -> 512 -> 512 -> 1, or the hyper head) for one embedding."""
    act1, act2 = HEADS[head] if head in HEADS else (HYPER, HYPER) if head == HYPER else head.split("+")
    model = make_stack(dim, [0], act1, act2, [100.0], None, [1.0]).eval()
    return sum(p.numel() for p in model.parameters()), count_macs(model, torch.zeros(1, 1, dim))[0]


def _peak_memory(spec, device: str) -> str:
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return "n/a (no GPU)"
    model = load_backbone(spec, weights="random-init").to(device)
    x = torch.randn(1, 3, spec.resolution, spec.resolution, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del model
    torch.cuda.empty_cache()
    return f"{peak:.0f} MiB (bf16 autocast, fp32 weights)"


def profile_backbone(key: str, heads: list[str], device: str = "cpu", tag: str | None = None,
                     source: str | None = None) -> list[ProfileRow]:
    """One row per head on this backbone: the registry's full-size model, or the model the runs used where
    that was another (`tag` tiny: the tiny config; `source` a local checkpoint: that checkpoint, loaded, at
    the side it ran at), so the profile counts the model that ran."""
    weights = tag_weights(tag)
    spec = get_spec(key, weights)
    checkpoint = source if source and Path(source).exists() else None
    if family_of(spec).in_worker:  # computed on the CPU in the decode workers, not a network
        counted = dict(resolution=None, backbone_params=0, backbone_macs=None, attention_macs=None,
                       peak_memory="n/a (CPU features)", weights="none (worker features)",
                       note="features computed in the decode workers: no network MACs")
    elif checkpoint is not None or weights == "tiny":
        model = load_backbone(spec, source=checkpoint, weights="pretrained" if checkpoint else "tiny")
        side = model.spec.resolution
        macs, attention = count_macs(model, torch.zeros(1, 3, side, side))
        counted = dict(resolution=side, backbone_params=family_of(spec).parameters_used(model), backbone_macs=macs,
                       attention_macs=attention, peak_memory="n/a (not the registry model)",
                       weights=f"local checkpoint {Path(checkpoint).name}" if checkpoint else "tiny config, random init")
    else:
        try:
            with torch.device("meta"):
                model = load_backbone(spec, weights="random-init")
                image = torch.empty(1, 3, spec.resolution, spec.resolution)
            macs, attention = count_macs(model, image)
            counted = dict(resolution=spec.resolution, backbone_params=family_of(spec).parameters_used(model),
                           backbone_macs=macs, attention_macs=attention, peak_memory=_peak_memory(spec, device),
                           weights="registry full-size config, random init (meta device for counting)")
        except BackboneLoadError as error:
            counted = dict(resolution=spec.resolution, backbone_params=None, backbone_macs=None, attention_macs=None,
                           peak_memory="n/a", weights="not built", note=str(error).split(":")[0])
    width = model.spec.dim if checkpoint is not None or weights == "tiny" else spec.dim
    rows = []
    for head in heads:
        params, macs = head_profile(width, head)
        rows.append(ProfileRow(backbone_label(key, tag), head, head_params=params, head_macs=macs, **counted))
    return rows


def profile_table(rows: list[ProfileRow], fmt: str = "md") -> str:
    """Table S5: one line per backbone + head; md, csv or html."""
    header = ["backbone", "head", "input", "params (M)", "MACs (G)", "of which attention (G)", "head params",
              "head MACs (M)", "peak memory", "backbone weights", "note"]

    def g(v, scale):
        return "n/a" if v is None else f"{v / scale:.2f}"

    body = [
        [r.backbone, r.head, "-" if r.resolution is None else f"{r.resolution}x{r.resolution}",
         g(None if r.backbone_params is None else r.backbone_params + r.head_params, 1e6),
         g(None if r.backbone_macs is None else r.backbone_macs + r.head_macs, 1e9), g(r.attention_macs, 1e9),
         f"{r.head_params:,}", g(r.head_macs, 1e6), r.peak_memory, r.weights, r.note]
        for r in rows
    ]
    return text_table(header, body, fmt)
