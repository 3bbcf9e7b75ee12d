"""What one member of SMART-IQA's head costs to train as published: the `smart` fusion of Swin-B's four
stages on 7 x 7 maps feeding the eq16 hyper head (App. A, Eq. 14-17), Adam, batch 32, float32.

It prints the member's parameters, seconds per training step and the step's peak memory above what the
process held before the head was built (resident memory on the CPU, allocated memory on a GPU), and sets
that peak, per parameter, beside the grid's own estimate (`BYTES_PER_PARAMETER`, with which a grid without
`--stack-size` decides how many members a stack holds). The last line of output is one JSON object.

    python benchmarks/smart_hyper_memory.py [--device cuda] [--steps 2]
"""

import argparse
import json
import resource
import time

import torch

from iqa.heads.training.grid import BYTES_PER_PARAMETER
from iqa.heads.training.trainer import make_stack

SWIN_B_STAGES = ((4, 1024), (3, 512), (2, 256), (1, 128))  # (stage, channels), named deepest first as SMART-IQA fuses
SMOKE_STAGES = ((2, 16), (1, 8))


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny stages: checks the code, measures nothing")
    args = parser.parse_args()
    stages, side = (SMOKE_STAGES, 2) if args.smoke else (SWIN_B_STAGES, 7)
    width = sum(channels for _, channels in stages) * side * side
    before = torch.cuda.memory_allocated(args.device) if args.device.startswith("cuda") else resident_bytes()
    model = make_stack(width, [8], "hyper", "hyper", [100.0], None, [1.0], fuse="smart", stages=stages,
                       hyper_target="eq16", spatial=side).to(args.device)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(1, args.batch, width, generator=torch.Generator().manual_seed(0)).to(args.device)
    y = torch.rand(1, args.batch, generator=torch.Generator().manual_seed(1)).to(args.device)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        (model(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize(args.device)
        seconds.append(time.perf_counter() - start)
    peak = peak_bytes(args.device) - before
    print(f"one member, {len(stages)} stages on {side} x {side} maps, batch {args.batch}, {args.device}: "
          f"{parameters / 1e6:.1f} M parameters, {min(seconds):.2f} s a step (first {seconds[0]:.2f} s), "
          f"peak {peak / 2**30:.2f} GiB = {peak / parameters:.1f} bytes a parameter "
          f"(the grid counts {BYTES_PER_PARAMETER})")
    print(json.dumps({"device": args.device, "parameters": parameters, "step_seconds": min(seconds),
                      "peak_bytes": peak, "bytes_per_parameter": peak / parameters,
                      "grid_bytes_per_parameter": BYTES_PER_PARAMETER}))


if __name__ == "__main__":
    main()
