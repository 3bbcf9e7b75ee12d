"""Every GPU figure docs/benchmarks.md promises, from one command on one GPU, in under 8 minutes.

1. Extraction, SigLIP2-SO400M at 512 px (random init, bf16): `iqa extract` images/s against the bare
   forward pass on a ready batch, and the decode workers' capacity alone (which of the two bounds a
   run); `iqa score` images/s on the same images and model.
2. The Table-4 head grid (2 heads x 6 mask k x 3 seeds x 30 epochs, KonIQ-sized synthetic cache):
   `run_grid` wall time (goal: under 60 s) at `iqa head`'s default dtype (bf16 autocast on a GPU)
   against the tuned single-run loop of head_sweep.py, timed for one run and scaled to the grid.
3. Fine-tuning SigLIP2 at 512 px (random init): LoRA and full optimiser steps/s (batch 2 x 6) and
   peak memory, beside Table S5's 2,270 MiB.
4. Extraction with the diffusion backbone, CleanDIFT SD-2.1 at 512 px (random init, bf16): `iqa extract`
   against its bare forward pass and the decode workers, as in 1.

`--device cpu --smoke` runs the same code on tiny models and sizes (CI runs it, so the GPU run
cannot die of a typo). The last line of output is one JSON object.

    python benchmarks/gpu_check.py                        # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke   # anywhere, in seconds
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from extract_throughput import decode_capacity, forward_limit, make_images, sync, untrained_scorer
from finetune_step import TABLE_S5_MIB, fresh_model, iqa_loop, random_batches, timed
from head_sweep import MASK_KS, SEEDS, synthetic_cache, tuned_run
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.extract.run import ExtractRequest, extract_dataset
from iqa.heads.finetune.loop import MICRO_BATCH
from iqa.heads.training.grid import STACK_SIZE, expand_grid, head_choices, head_dtype, run_grid
from iqa.heads.saved.model import score_files
from iqa.cache.results import ResultsDB

BACKBONE = "siglip2"


def extraction(device: str, smoke: bool, dtype: str, backbone: str = BACKBONE, images: int = 1024,
               score: bool = True, section: int = 1) -> dict:
    """Section `section`: extraction against its two bounds; with `score`, `iqa score` on the same images
    and model. Figures of another backbone than BACKBONE are named with its key in front."""
    images, batch, workers = (4, 2, 0) if smoke else (images, 32, 8)
    weights = "tiny" if smoke else "random-init"
    spec = get_spec(backbone, weights)
    model = load_backbone(spec, weights=weights)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        files = make_images(cache, images)
        decode = decode_capacity(files, model.spec, batch, workers)
        request = ExtractRequest(cache, "bench", backbone, weights=weights, dtype=dtype,
                                 batch_size=batch, chunk_rows=batch, progress=False)
        extract = extract_dataset(request, device=device, num_workers=workers).images_per_s
        model = model.to(device).eval()
        forward = forward_limit(model.spec, model, device, dtype, batch, reps=2 if smoke else 10)
        figures = {"extract_images_per_s": extract, "forward_images_per_s": forward, "decode_images_per_s": decode,
                   "extract_share_of_bound": extract / min(decode, forward), "extract_resolution": model.spec.resolution}
        if score:
            scorer = untrained_scorer(model, device, dtype, model.spec.dim, cache)
            start = time.perf_counter()
            score_files(scorer, files, batch, workers, progress=False)
            sync(device)
            figures["score_images_per_s"] = images / (time.perf_counter() - start)
    bound = "decode" if decode < forward else "forward"
    print(f"{section}. {backbone} at {model.spec.resolution} px, {images} images, batch {batch}, "
          f"{workers} workers: iqa extract {extract:.1f} images/s; bare forward {forward:.1f}; decode workers "
          f"{decode:.1f} (bound: {bound}, extract at {extract / min(decode, forward):.0%} of it)"
          + (f"; iqa score {figures['score_images_per_s']:.1f} images/s" if score else ""))
    return figures if backbone == BACKBONE else {f"{backbone}_{key}": value for key, value in figures.items()}


def head_grid(device: str, smoke: bool) -> dict:
    rows, epochs, seeds, mask_ks = (120, 1, SEEDS[:1], MASK_KS[:2]) if smoke else (10_073, 30, SEEDS, MASK_KS)
    cache = synthetic_cache(rows)
    configs = expand_grid([("koniq10k", "koniq10k")], "synthetic", head_choices(["baseline", "sig"], []), seeds,
                          mask_ks, epochs=epochs, compute_dtype=head_dtype("auto", device))  # iqa head's default
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_grid(configs, lambda _: cache, ResultsDB(Path(tmp) / "results.sqlite"), device,
                 STACK_SIZE.get(device.split(":")[0]), progress=False)
        sync(device)
        grid_seconds = time.perf_counter() - start
    tuned_run(cache, configs[0], 1, device)  # warm-up
    start = time.perf_counter()
    tuned_run(cache, configs[1], epochs, device)
    sync(device)
    tuned_seconds = (time.perf_counter() - start) * len(configs)
    print(f"2. Table-4 grid ({len(configs)} runs x {epochs} epochs, {rows} rows): iqa {grid_seconds:.1f} s "
          f"(goal < 60 s on a GPU); the tuned loop one run at a time, scaled: {tuned_seconds:.1f} s "
          f"({tuned_seconds / grid_seconds:.1f}x)")
    return {"grid_runs": len(configs), "grid_epochs": epochs, "grid_seconds": grid_seconds,
            "tuned_loop_grid_seconds": tuned_seconds, "grid_speedup_vs_tuned": tuned_seconds / grid_seconds}


def finetuning(device: str, smoke: bool, dtype: str) -> dict:
    spec = get_spec(BACKBONE, "tiny" if smoke else "pretrained")
    steps, accumulate = (1, 2) if smoke else (5, 6)
    figures = {}
    for mode in ("lora", "full"):
        model = fresh_model(spec, mode, device)
        resolution = model.backbone.spec.resolution if mode == "full" else model.backbone.base_model.model.spec.resolution
        batches = random_batches(steps * accumulate, MICRO_BATCH, resolution, device)
        iqa_loop(model, batches[:accumulate], accumulate, mode, device, dtype)  # warm-up
        seconds, peak = timed(lambda m=model: iqa_loop(m, batches, accumulate, mode, device, dtype), device)
        figures[f"{mode}_steps_per_s"] = steps / seconds
        figures[f"{mode}_peak_mib"] = peak
        print(f"3. {mode} fine-tuning at {resolution} px, batch {MICRO_BATCH} x {accumulate}: {steps / seconds:.2f} steps/s"
              + (f", peak {peak:.0f} MiB (Table S5: {TABLE_S5_MIB} MiB at batch 1, bf16)" if peak else ""))
        del model  # before the next mode's model: its peak memory is its own
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the code, measures nothing")
    parser.add_argument("--dtype", default="auto", help="extraction and fine-tuning compute dtype [auto: bf16 on GPUs]")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run with --device cpu --smoke to check the code")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {name}{' (smoke: tiny sizes)' if args.smoke else ''}")
    start = time.perf_counter()
    figures = {"device": name, "smoke": args.smoke}
    figures.update(extraction(args.device, args.smoke, args.dtype))
    figures.update(head_grid(args.device, args.smoke))
    figures.update(finetuning(args.device, args.smoke, args.dtype))
    figures.update(extraction(args.device, args.smoke, args.dtype, "cleandift", images=256, score=False, section=4))
    figures["seconds"] = time.perf_counter() - start
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
