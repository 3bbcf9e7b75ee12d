"""Extraction throughput: a naive per-image loop against `iqa extract`, on the same random-init model.

naive:     for each image: PIL open -> the model's Hugging Face image processor -> model, batch 1, fp32.
extractor: `extract_dataset` with its defaults (batched, decoding in worker processes, chunked Zarr
           writes, `--dtype auto`: bf16 autocast on GPUs and on CPUs with AVX512-BF16/AMX).
It also times the two limits of a run, the model's pure forward pass on a ready batch at the
extractor's dtype and the decode workers' capacity with no model behind them, says which one bounds
the run and how close `iqa extract` comes to it, and times `iqa score` (`score_files`: the same
decode and embed path plus a head) on the same images. The forward limit is timed before and after the
run (the faster counts); since a shared machine's speed drifts between timings, it also prints the share
of the run's own wall time spent in the model's forward passes.
A ViT at 512 px is compute-bound on a CPU, so in float32 batching and worker decoding buy only a
few percent; the gain on such a CPU comes from bf16. The agreement line says what that costs.

Images are KonIQ-sized (1024 x 768) JPEGs made here. The last line of output is one JSON object.

    python benchmarks/extract_throughput.py --quick
"""

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BitImageProcessorPil

from iqa.cache.load import load_cached
from iqa.cache.manifest import Manifest, write_manifest
from iqa.extract.backbones import load_backbone
from iqa.extract.registry import get_spec
from iqa.extract.run import Embedder, ExtractRequest, ImageRows, compute_dtype_for, default_batch_size, extract_dataset
from iqa.heads.models.mlp import HEADS, StackedMLP
from iqa.heads.saved.config import (BackboneConfig, HeadConfig, Metrics, ModelConfig, MosMap, Targets, TrainingConfig,
                                    Tuning, WeightsFile)
from iqa.heads.saved.model import IqaModel, score_files


def untrained_scorer(model, device: str, dtype: str, width: int, folder: Path) -> IqaModel:
    """`iqa score`'s model over `model` with an untrained sig head of input `width`: what scoring costs, not
    what a trained model predicts. Its record says so (no run, no metrics, random weights)."""
    spec = model.spec
    config = ModelConfig(
        run_key="untrained",
        backbone=BackboneConfig(spec.key, None, "random-init", None, None, None, spec.pooling, spec.dim, spec.resolution,
                                spec.preprocess, spec.resample, None, dtype, Tuning()),
        head=HeadConfig("sig", *HEADS["sig"], mask_k=100.0, dropout=None, keep=1.0, l2norm=False),
        training=TrainingConfig("bench", "bench", *[None] * 11),
        targets=Targets(None, MosMap(1.0, 0.0)),
        metrics=Metrics(*[None] * 5),
        weights=WeightsFile("", ""),
        packages={},
    )
    head = StackedMLP(width, [8], *HEADS["sig"]).eval().to(device)
    return IqaModel(config, Embedder(spec, model, device, compute_dtype_for(device, dtype)), head, folder)


def make_images(cache: Path, n: int) -> list[Path]:
    """Smooth random photographs-to-be: low-frequency noise upsampled, so JPEG decoding costs what it does on photos."""
    root = cache / "images"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        small.resize((1024, 768), Image.Resampling.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)
    paths = sorted(p.name for p in root.iterdir())
    write_manifest(Manifest("bench", str(root), paths, np.zeros(n), np.zeros(n), "none"), cache)
    return [root / p for p in paths]


def naive_loop(files: list[Path], spec, model, device: str) -> tuple[float, np.ndarray]:
    # DINOv3's own processor class needs torchvision; this PIL one does the same steps with its settings.
    processor = BitImageProcessorPil(
        size={"height": spec.resolution, "width": spec.resolution}, resample=Image.Resampling.BICUBIC,
        do_center_crop=False, image_mean=list(spec.mean), image_std=list(spec.std), do_convert_rgb=True,
    )
    outputs = []
    with torch.inference_mode():
        model(processor(images=Image.open(files[0]), return_tensors="pt")["pixel_values"].to(device))  # warm-up
        start = time.perf_counter()
        for path in files:
            pixels = processor(images=Image.open(path), return_tensors="pt")["pixel_values"].to(device)
            outputs.append(model(pixels).float().cpu().numpy()[0])
        sync(device)
    return len(files) / (time.perf_counter() - start), np.stack(outputs)


def forward_limit(spec, model, device: str, dtype: str, batch_size: int, reps: int) -> float:
    """The model alone on a ready batch: what no extraction loop can beat."""
    x = torch.randn(batch_size, 3, spec.resolution, spec.resolution, device=device)
    compute_dtype = compute_dtype_for(device, dtype)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        model(x)
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
        sync(device)
    return reps * batch_size / (time.perf_counter() - start)


def decode_capacity(files: list[Path], spec, batch_size: int, workers: int) -> float:
    """Images/s the decode workers deliver with no model behind them (`iqa extract`'s own ImageRows and
    DataLoader): the other limit a run can hit."""
    rows = ImageRows(files[0].parent, [f.name for f in files], spec)
    start = time.perf_counter()
    for _ in DataLoader(rows, batch_size=batch_size, num_workers=workers):
        pass
    return len(files) / (time.perf_counter() - start)


@contextmanager
def time_in_model(seconds: list[float]):
    """While open, every `Embedder.batch` call (the model's forward on a decoded batch) adds its wall time to
    `seconds`: the rest of a run's wall time is the loop around the model (waiting for decode, writes)."""
    batch = Embedder.batch

    def timed(self, *args):
        start = time.perf_counter()
        out = batch(self, *args)
        seconds.append(time.perf_counter() - start)
        return out

    Embedder.batch = timed
    try:
        yield
    finally:
        Embedder.batch = batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov3-s", help="registry key (random-init weights)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="16 images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="[default: iqa extract's, 4 on CPU, 32 on GPU]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on 4 images: checks the code, measures nothing")
    args = parser.parse_args()
    n = 4 if args.smoke else 16 if args.quick else args.images
    args.batch_size = args.batch_size or default_batch_size(args.device)
    weights = "tiny" if args.smoke else "random-init"
    spec = get_spec(args.backbone, weights)
    model = load_backbone(spec, weights=weights).to(args.device).eval()
    print(f"{spec.key} ({'tiny' if args.smoke else 'random init'}) at {spec.resolution}px on {args.device}, {n} images of 1024x768, "
          f"{torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        files = make_images(cache, n)
        decode = decode_capacity(files, model.spec, args.batch_size, args.workers)
        naive, naive_out = naive_loop(files, spec, model, args.device)
        print(f"naive loop (processor + model per image, fp32): {naive:.2f} images/s")
        # The forward limit is timed before the run (which also readies the kernels of the extractor's dtype
        # and batch, as the first minutes of a real extraction do) and after it; the faster of the two is the limit.
        reps = 10 if args.device.startswith("cuda") else max(2, n // (2 * args.batch_size))
        forward = [forward_limit(spec, model, args.device, args.dtype, args.batch_size, reps)]
        request = ExtractRequest(cache, "bench", spec.key, weights=weights, dtype=args.dtype,
                                 batch_size=args.batch_size, chunk_rows=args.batch_size)
        in_model: list[float] = []
        with time_in_model(in_model):
            summary = extract_dataset(request, device=args.device, num_workers=args.workers)
        stored = load_cached(cache, "bench", spec.key, weights).embeddings
        scorer = untrained_scorer(model, args.device, args.dtype, stored.shape[1], cache)
        start = time.perf_counter()
        score_files(scorer, files, args.batch_size, args.workers, progress=False)
        score_rate = n / (time.perf_counter() - start)
        forward.append(forward_limit(spec, model, args.device, args.dtype, args.batch_size, reps))
    agreement = float(np.abs(stored - naive_out).max() / np.abs(naive_out).max())
    figures = {
        "backbone": spec.key, "device": args.device, "images": n, "resolution": spec.resolution,
        "naive_images_per_s": round(naive, 3), "extract_images_per_s": round(summary.images_per_s, 3),
        "ratio": round(summary.images_per_s / naive, 2), "max_rel_difference": round(agreement, 4),
    }
    figures["extract_dtype"] = str(compute_dtype_for(args.device, args.dtype)).removeprefix("torch.")
    print(f"iqa extract (batch {args.batch_size}, {args.workers} decode workers, dtype {args.dtype}: "
          f"{figures['extract_dtype']}): "
          f"{summary.images_per_s:.2f} images/s, {figures['ratio']}x the naive loop; "
          f"embeddings agree to {agreement:.1e} (relative, float16 store)")
    figures["score_images_per_s"] = round(score_rate, 3)
    figures["score_vs_extract"] = round(score_rate / summary.images_per_s, 2)
    print(f"iqa score (same batch and workers, + a sig head): {score_rate:.2f} images/s, "
          f"{figures['score_vs_extract']:.2f}x iqa extract")
    figures["forward_images_per_s"] = round(max(forward), 2)
    figures["share_of_forward"] = round(summary.images_per_s / figures["forward_images_per_s"], 2)
    figures["decode_images_per_s"] = round(decode, 2)
    bound = min(decode, figures["forward_images_per_s"])
    figures["bound"] = "decode" if decode < figures["forward_images_per_s"] else "forward"
    figures["share_of_bound"] = round(summary.images_per_s / bound, 2)
    figures["share_of_run_in_model"] = round(sum(in_model) / (n / summary.images_per_s), 3)
    print(f"pure forward pass (random input, batch {args.batch_size}): {figures['forward_images_per_s']} images/s; "
          f"decode workers alone ({args.workers}): {decode:.2f} images/s; the run is {figures['bound']}-bound and "
          f"iqa extract reaches {figures['share_of_bound']:.0%} of that limit")
    print(f"inside the run, the model's forward passes took {figures['share_of_run_in_model']:.1%} of its wall time "
          f"(the loop around them: the rest; machine-speed drift between the timings above does not enter this share)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
