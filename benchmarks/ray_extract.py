"""Ray's overhead: `extract_dataset` (local engine) against `extract_with_ray` on the same random model.

Both fill a store of the same KonIQ-sized JPEGs (made here). The Ray engine runs on a local cluster
started here (all CPUs, or every GPU with one actor each). Both times run from the store being open
to the last chunk written (the driver's model load and fingerprint excluded, the cluster already
up), so Ray's includes its actors' start-up (process, imports, model load): `ray_overhead_s`. On GPUs it also reports images/s
per GPU. The last line of output is one JSON object.

    python benchmarks/ray_extract.py --quick
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from extract_throughput import make_images  # noqa: E402 (benchmarks/ is the script's folder)

from iqa.cache.load import load_cached
from iqa.cache.location import backbone_label
from iqa.extract.ray_engine import extract_with_ray
from iqa.extract.run import ExtractRequest, extract_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov3-s", help="registry key (random-init weights)")
    parser.add_argument("--weights", choices=("random-init", "tiny"), default="random-init",
                        help="random weights: the full-size architecture, or the tiny config")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="64 images, tiny model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=64)
    args = parser.parse_args()
    n, weights = (64, "tiny") if args.quick else (args.images, args.weights)
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    model = dict(weights=weights, batch_size=args.batch_size, chunk_rows=args.chunk_rows, progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        make_images(cache, n)
        local = extract_dataset(ExtractRequest(cache, "bench", args.backbone, tag="local", **model), device=device,
                                num_workers=min(4, os.cpu_count()))
        ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        distributed = extract_with_ray(ExtractRequest(cache, "bench", args.backbone, tag="ray", **model))
        ray_seconds = distributed.seconds
        ray.shutdown()
        same = np.array_equal(load_cached(cache, "bench", args.backbone, "local").embeddings,
                              load_cached(cache, "bench", args.backbone, "ray").embeddings, equal_nan=True)

    result = {
        "backbone": backbone_label(args.backbone, weights),
        "images": n,
        "device": torch.cuda.get_device_name() if gpus else f"cpu x{os.cpu_count()}",
        "local_images_per_s": round(n / local.seconds, 1),
        "ray_images_per_s": round(n / ray_seconds, 1),
        "ray_images_per_s_per_gpu": round(n / ray_seconds / gpus, 1) if gpus else None,
        "local_s": round(local.seconds, 2),
        "ray_s": round(ray_seconds, 2),
        "ray_overhead_s": round(ray_seconds - local.seconds, 2),
        "stores_equal": bool(same),
    }
    print(f"local {result['local_images_per_s']} img/s, ray {result['ray_images_per_s']} img/s "
          f"(+{result['ray_overhead_s']} s), stores equal: {same}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
