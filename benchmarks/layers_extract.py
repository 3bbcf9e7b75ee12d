"""All-layers extraction against the default embedding on the same model, and whole-layer read speed.

Two `iqa extract` runs over the same images and the same random-init (or tiny) model, side by side:
the default store, then `--layers all` (one forward pass with `output_hidden_states`, one more zarr
array per layer). Target: the all-layers run costs at most 1.15x the default one. Then every layer
is read whole for all rows (`load_layer`), as a layer sweep reads it, and the store's bytes per
image are counted. The last line of output is one JSON object.

    python benchmarks/layers_extract.py --backbone swin-t --images 64
    python benchmarks/layers_extract.py --backbone dinov2 --weights random-init --images 256 --device cuda
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from extract_throughput import make_images

from iqa.cache.load import load_layer, stored_layers
from iqa.cache.store import store_path
from iqa.extract.run import ExtractRequest, extract_dataset


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="swin-t")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", choices=("tiny", "random-init"), default="tiny",
                        help="random weights: the tiny config, or the full-size architecture")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        make_images(cache, args.images)
        model, tag = dict(weights=args.weights), args.weights
        seconds = {}
        for name, layers in (("default", None), ("all_layers", "all")):
            request = ExtractRequest(cache, "bench", args.backbone, tag=f"{tag}-{name}", layers=layers,
                                     progress=False, **model)
            extract_dataset(request, device=args.device, num_workers=args.workers)  # warm-up (file cache, imports); timed next
            start = time.perf_counter()
            extract_dataset(ExtractRequest(cache, "bench", args.backbone, tag=f"{tag}-{name}", layers=layers,
                                           overwrite=True, progress=False, **model), device=args.device,
                            num_workers=args.workers)
            seconds[name] = time.perf_counter() - start
        layered_tag = f"{tag}-all_layers"
        layers = stored_layers(cache, "bench", args.backbone, layered_tag)
        start = time.perf_counter()
        for n in layers:
            load_layer(cache, "bench", args.backbone, n, layered_tag)
        read_s = (time.perf_counter() - start) / len(layers)
        sizes = {name: folder_bytes(Path(store_path(cache, "bench", args.backbone, f"{tag}-{name}"))) / args.images
                 for name in seconds}
    result = {
        "backbone": args.backbone, "model": tag, "images": args.images, "device": args.device, "layers": len(layers),
        "default_s": round(seconds["default"], 3), "all_layers_s": round(seconds["all_layers"], 3),
        "cost_ratio": round(seconds["all_layers"] / seconds["default"], 3),
        "layer_read_s": round(read_s, 5), "layer_read_rows_per_s": round(args.images / read_s),
        "bytes_per_image": {name: round(b) for name, b in sizes.items()},
    }
    print(f"{args.backbone} ({tag}), {args.images} images on {args.device}: default {seconds['default']:.2f} s, "
          f"all {len(layers)} layers {seconds['all_layers']:.2f} s ({result['cost_ratio']:.2f}x); "
          f"one whole layer read in {read_s * 1000:.1f} ms; store {sizes['default']:.0f} -> {sizes['all_layers']:.0f} B/image")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
