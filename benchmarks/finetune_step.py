"""Fine-tuning step throughput: `iqa finetune`'s training step against a plain fp32 eager loop.

Both train the same random-init model (backbone + the sig head) with physical batch 2 and an
optimiser step every `accumulate` batches, on the same random images already on the device:
- plain:  fp32, no autocast, torch.optim.Adam with its defaults, a device sync per batch (.item()).
- iqa:    `train_epoch` of heads/finetune/loop.py: autocast (`--dtype auto`: bf16 on GPUs and bf16 CPUs), fused Adam,
          one device sync per optimiser step.
for LoRA (rank 4 on q/k) and full fine-tuning. On a GPU it also reports peak memory, and for
SigLIP2-SO400M at 512 (random init) the peak of one forward pass at batch 1 and of a LoRA step,
beside Table S5's 2270 MiB (SigLIP2, batch 1, bf16). The last line of output is one JSON object.

    python benchmarks/finetune_step.py --quick                 # CPU: 128 px, 2 steps
    python benchmarks/finetune_step.py --device cuda           # 512 px, the paper's input
"""

import argparse
import json
import time
from dataclasses import replace

import torch

from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.extract.run import compute_dtype_for
from iqa.heads.finetune.loop import MICRO_BATCH, build_model, embedding_dim, finetune_config, finetune_optimizer, train_epoch
from iqa.heads.training.loss import iqa_loss
from iqa.heads.models.mlp import member_seed

TABLE_S5_MIB = 2270


def random_batches(n: int, batch: int, resolution: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, generator=g).to(device), torch.randn(batch, 3, resolution, resolution, generator=g).to(device))
            for _ in range(n)]


def fresh_model(spec, mode: str, device: str):
    torch.manual_seed(member_seed(8, "torch"))
    base = load_backbone(spec, weights="random-init")
    return build_model(base, spec, mode, "sig", seed=8, lora_rank=4, dim=embedding_dim(base, spec)).to(device)


def plain_loop(model, batches, accumulate: int) -> None:
    """What a first training script does: fp32 eager, default Adam, the loss read every batch."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i, (target, pixels) in enumerate(batches):
        loss = iqa_loss(model(pixels)[None], target[None], MICRO_BATCH)[0] / accumulate
        loss.backward()
        loss.item()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def iqa_loop(model, batches, accumulate: int, mode: str, device: str, dtype: str) -> None:
    compute_dtype = compute_dtype_for(device, dtype)
    cast = dict(device_type=torch.device(device).type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    scaler = torch.amp.GradScaler(cast["device_type"], enabled=compute_dtype == torch.float16)
    optimizer = finetune_optimizer(model, finetune_config("benchmark", "benchmark", mode=mode))
    if train_epoch(model, optimizer, scaler, batches, accumulate, cast) is None:
        raise RuntimeError("the benchmark's loss went NaN/inf")


def timed(loop, device: str) -> tuple[float, float | None]:
    """(seconds, peak MiB on a GPU)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loop()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def siglip2_memory(device: str, dtype: str) -> dict:
    """Peak MiB of SigLIP2-SO400M at 512 (fp32 weights): one forward at batch 1 under autocast, one LoRA step of 2."""
    spec = get_spec("siglip2")
    model = fresh_model(spec, "lora", device)
    cast = dict(device_type="cuda", dtype=compute_dtype_for(device, dtype))
    x = torch.randn(1, 3, spec.resolution, spec.resolution, device=device)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(**cast):
            model.eval()(x)

    forward()  # warm-up
    _, forward_mib = timed(forward, device)
    step = random_batches(1, MICRO_BATCH, spec.resolution, device)
    _, lora_mib = timed(lambda: iqa_loop(model, step, 1, "lora", device, dtype), device)
    return {"siglip2_forward_batch1_mib": round(forward_mib), "siglip2_lora_step_batch2_mib": round(lora_mib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov3-b", help="registry key (random-init weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 autocast where the hardware has it), float32, bfloat16, float16")
    parser.add_argument("--resolution", type=int, default=None, help="input side [default: the registry's, 128 with --quick]")
    parser.add_argument("--steps", type=int, default=5, help="optimiser steps timed per variant")
    parser.add_argument("--accumulate", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="128 px, 2 steps of 2 x 2 images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.resolution, args.steps, args.accumulate = args.resolution or 128, 2, 2
    spec = get_spec(args.backbone)
    spec = replace(spec, resolution=args.resolution or spec.resolution)
    images_per_run = args.steps * args.accumulate * MICRO_BATCH
    print(f"{spec.key} (random init) at {spec.resolution}px on {args.device}, batch {MICRO_BATCH} x accumulate "
          f"{args.accumulate}, {args.steps} steps ({images_per_run} images) per variant, {torch.get_num_threads()} torch threads")
    batches = random_batches(args.steps * args.accumulate, MICRO_BATCH, spec.resolution, args.device)
    warm = batches[: args.accumulate]
    figures = {"backbone": spec.key, "device": args.device, "resolution": spec.resolution, "images": images_per_run}
    for mode in ("lora", "full"):
        for name, loop in (("plain", lambda m, data: plain_loop(m, data, args.accumulate)),
                           ("iqa", lambda m, data: iqa_loop(m, data, args.accumulate, mode, args.device, args.dtype))):
            model = fresh_model(spec, mode, args.device)
            loop(model, warm)
            seconds, peak = timed(lambda: loop(model, batches), args.device)
            figures[f"{mode}_{name}_images_per_s"] = round(images_per_run / seconds, 3)
            if peak is not None:
                figures[f"{mode}_{name}_peak_mib"] = round(peak)
            print(f"{mode:4s} {name:5s}: {images_per_run / seconds:8.2f} images/s" + (f", peak {peak:.0f} MiB" if peak else ""))
        figures[f"{mode}_speedup"] = round(figures[f"{mode}_iqa_images_per_s"] / figures[f"{mode}_plain_images_per_s"], 2)
    if args.device.startswith("cuda"):
        figures.update(siglip2_memory(args.device, args.dtype), table_s5_mib=TABLE_S5_MIB)
        print(f"SigLIP2-SO400M at 512: forward batch 1 {figures['siglip2_forward_batch1_mib']} MiB, LoRA step batch 2 "
              f"{figures['siglip2_lora_step_batch2_mib']} MiB (Table S5: {TABLE_S5_MIB} MiB at batch 1, bf16)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
