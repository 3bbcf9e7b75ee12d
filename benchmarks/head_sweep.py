"""Table-4-shaped head sweep (2 heads x 6 mask k x 3 seeds) on a synthetic KonIQ-shaped cache.

(a) the per-run loop as research code usually writes it: DataLoader over a TensorDataset, batch 12,
    torch.optim.Adam defaults, a Python double loop over pairs for the ranking loss;
(b) the tuned single-run loop a careful researcher writes: tensors preloaded on the device, the
    inputs masked once per run, the vectorised loss (iqa_loss, micro-batch 2), fused Adam, batch 12,
    no DataLoader, one evaluation per epoch; its runs have as many epochs as ours, so both pay their
    per-run setup (masking, copies) over the same number of epochs, and they run between our stacks,
    timed apart from them, so a shared machine's drift in speed reaches both alike;
(c) iqa's stacked trainer (iqa.heads.training.grid.run_grid), with everything around it (masking, evaluation,
    database writes, kept weights).
It also times the step's own kernels alone at their shapes (the kernel floor: the matmuls and one fused
Adam step, `kernel_floor`), so the share of a step spent around its kernels shows.
Prints model-epochs/s of all three, ours against each, the measured peak matmul rate and memory bandwidth, and
our share of the roofline bound for this work:
    bound time per model-epoch = steps * max(FLOPs per step / peak matmul rate,
                                             bytes per step / memory bandwidth)
    FLOPs per step = 2*B*(D*H + H*H + H) forward + 2*B*(D*H + H*H + H) weight grads + 2*B*(H*H + H) input grads
    bytes per step = 36 * parameters (weights read 4, gradient written 4, fused Adam reads p,g,m,v and writes p,m,v 28)
The matmuls and the optimiser's pass over the weights run one after the other, so the sum of the two
times (the sequential bound) is printed beside it. Bandwidth is measured on a buffer the size of one
stack's weights + gradients + Adam state (the memory level the trainer streams from). The last line is one JSON object.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import scipy.stats
import torch
from torch import nn

from iqa.cache.manifest import Manifest
from iqa.heads.training.grid import STACK_SIZE, expand_grid, head_choices, run_grid, run_rows, train_here
from iqa.heads.training.loss import iqa_loss
from iqa.heads.models.mlp import HIDDEN
from iqa.cache.results import ResultsDB

N, D, B = 10_073, 1152, 12
MASK_KS = [100, 90, 70, 50, 30, 10]
SEEDS = [8, 19, 25]


def synthetic_cache(n: int = N) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, D)).astype(np.float16)
    score = x.astype(np.float32) @ rng.normal(size=D).astype(np.float32) / np.sqrt(D)
    y = 1 / (1 + np.exp(-2 * score))  # learnable target in (0, 1)
    manifest = Manifest("koniq10k", "/synthetic", [f"{i:05d}.jpg" for i in range(n)], y, y, "synthetic")
    return SimpleNamespace(embeddings=x, valid=np.ones(n, bool), manifest=manifest, fingerprint_id="synthetic")


def naive_run(cache, config, epochs: int, device: str) -> None:
    """One run the usual way (what most research code looks like)."""
    torch.manual_seed(config.seed)
    train_rows, test_rows = run_rows(config, cache, cache)
    x = torch.tensor(cache.embeddings, dtype=torch.float32)
    y = torch.tensor(cache.manifest.targets, dtype=torch.float32)
    acts = {"lrelu": nn.LeakyReLU, "sigmoid": nn.Sigmoid}
    model = nn.Sequential(nn.Linear(D, HIDDEN), acts[config.act1](), nn.Linear(HIDDEN, HIDDEN), acts[config.act2](), nn.Linear(HIDDEN, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[train_rows], y[train_rows]), batch_size=B, shuffle=True)

    def mask(batch):
        if config.mask_k == 100:
            return batch
        count = int(np.ceil(config.mask_k / 100 * D))
        top = batch.abs().topk(count, dim=1).indices
        return batch * torch.zeros_like(batch).scatter_(1, top, 1.0)

    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            pred = model(mask(xb)).squeeze(1)
            loss = nn.functional.mse_loss(pred, yb)
            margin = 0.25 * yb.std()
            rank, n = 0.0, len(yb)
            for i in range(n):
                for j in range(i + 1, n):
                    rank = rank + torch.relu(-torch.sign(yb[i] - yb[j]) * (pred[i] - pred[j]) + margin)
            loss = loss + 2 * rank / (n * (n - 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(mask(x[test_rows].to(device))).squeeze(1).cpu().numpy()
        scipy.stats.spearmanr(pred, y[test_rows].numpy())


def tuned_run(cache, config, epochs: int, device: str) -> None:
    """One run as a careful researcher writes it by hand (b)."""
    torch.manual_seed(config.seed)
    train_rows, test_rows = run_rows(config, cache, cache)
    x = torch.tensor(cache.embeddings, dtype=torch.float32, device=device)
    if config.mask_k < 100:  # the top-k input mask is fixed per row: applied once, not per step
        count = int(np.ceil(config.mask_k / 100 * D))
        x = x * torch.zeros_like(x).scatter_(1, x.abs().topk(count, dim=1).indices, 1.0)
    y = torch.tensor(cache.manifest.targets, dtype=torch.float32, device=device)
    x_train, y_train = x[train_rows], y[train_rows]
    x_test, y_test = x[test_rows], y[test_rows].cpu().numpy()
    acts = {"lrelu": nn.LeakyReLU, "sigmoid": nn.Sigmoid}
    model = nn.Sequential(nn.Linear(D, HIDDEN), acts[config.act1](), nn.Linear(HIDDEN, HIDDEN), acts[config.act2](),
                          nn.Linear(HIDDEN, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    steps = len(train_rows) // B
    for _ in range(epochs):
        order = torch.randperm(len(train_rows), device=device)[: steps * B].view(steps, B)
        for rows in order:
            loss = iqa_loss(model(x_train[rows]).view(1, B), y_train[rows].view(1, B), micro_batch=2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = model(x_test).squeeze(1).cpu().numpy()
        scipy.stats.spearmanr(pred, y_test)


def timed_local_engine(device: str, trainer_seconds: list[float], between: Callable[[int], None], times: int):
    """The local engine, adding the seconds spent inside the trainer to `trainer_seconds` (the rest of run_grid's
    time is the grid around it: keys, splits, stacking, kept weights, database writes) and calling `between(i)`
    for i = 0 .. times - 1, spread evenly between the stacks, outside both: the tuned loop timed in the same
    minutes as ours, so a shared machine's drift reaches both alike."""

    def engine(jobs, engine_device, bar):
        every = max(1, len(jobs) // times)
        calls = 0
        start = time.perf_counter()
        for i, (job, results) in enumerate(train_here(jobs, engine_device, bar), 1):
            sync(device)
            trainer_seconds.append(time.perf_counter() - start)
            yield job, results
            if i % every == 0 and calls < times:
                between(calls)
                calls += 1
            start = time.perf_counter()

    return engine


def kernel_floor(device: str, stack: int) -> float:
    """Seconds per step of the stacked step's own kernels timed alone at its shapes (stack x batch 12, D -> 512
    -> 512 -> 1): the forward matmuls, the backward matmuls (weight gradients of every layer, input gradients of
    layers 2 and 3) and one fused Adam step over the stack's parameters. What a step costs with nothing
    around it: eager PyTorch cannot go below it without fusing kernels."""
    m, h = stack, HIDDEN
    t = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    x, w1, w2, w3 = t(m, B, D), t(m, D, h), t(m, h, h), t(m, h, 1)
    b1, b3, g1, g3 = t(m, 1, h), t(m, 1, 1), t(m, B, h), t(m, B, 1)
    params = [torch.nn.Parameter(w) for w in (w1, w2, w3)] + [torch.nn.Parameter(t(m, n)) for n in (h, h, 1)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    kernels = [
        lambda: torch.baddbmm(b1, x, w1), lambda: torch.baddbmm(b1, g1, w2), lambda: torch.baddbmm(b3, g1, w3),
        lambda: torch.bmm(x.transpose(1, 2), g1), lambda: torch.bmm(g1.transpose(1, 2), g1),
        lambda: torch.bmm(g1.transpose(1, 2), g3), lambda: torch.bmm(g1, w2.transpose(1, 2)),
        lambda: torch.bmm(g3, w3.transpose(1, 2)), opt.step,
    ]
    total, reps = 0.0, 50
    for kernel in kernels:
        kernel()
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            kernel()
        sync(device)
        total += (time.perf_counter() - start) / reps
    return total


def peak_matmul(device: str) -> float:
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    reps = 5 if device == "cpu" else 50
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def bandwidth(device: str, nbytes: int) -> float:
    """Bytes moved per second by a copy (read + write) of a buffer of nbytes."""
    src = torch.empty(max(nbytes // 8, 1 << 16), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = max(5, int(2e9 // src.nbytes))
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.nbytes * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch per run for ours, 1 naive run-epoch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run for ours [30, --quick 1]")
    parser.add_argument("--naive-runs", type=int, default=None, help="naive runs timed, 1 epoch each [3, --quick 1]")
    parser.add_argument("--tuned-runs", type=int, default=None,
                        help="tuned-loop runs timed between our stacks, each with ours' epochs per run [3, --quick 6]")
    parser.add_argument("--stack-size", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="--quick on 240 rows: checks the code, measures nothing")
    args = parser.parse_args()
    args.quick = args.quick or args.smoke
    epochs = args.epochs or (1 if args.quick else 30)
    naive_runs = args.naive_runs or (1 if args.quick else 3)
    device = args.device
    stack = args.stack_size or STACK_SIZE.get(device.split(":")[0], 1)

    cache = synthetic_cache(240 if args.smoke else N)
    heads = head_choices(["baseline", "sig"], [])
    configs = expand_grid([("koniq10k", "koniq10k")], "synthetic", heads, SEEDS, MASK_KS, epochs=epochs)

    start = time.perf_counter()
    for config in configs[:: max(1, len(configs) // naive_runs)][:naive_runs]:
        naive_run(cache, config, 1, device)
    naive_rate = naive_runs / (time.perf_counter() - start)
    print(f"(a) naive per-run loop: {naive_runs} run-epochs, {naive_rate:.3f} model-epochs/s")
    tuned_runs = args.tuned_runs or (6 if args.quick else 3)
    tuned_configs = configs[:: max(1, len(configs) // tuned_runs)][:tuned_runs]
    tuned_run(cache, configs[0], 1, device)  # warm-up: first-call allocations and kernels
    tuned_seconds: list[float] = []

    def time_tuned(i: int) -> None:
        start = time.perf_counter()
        tuned_run(cache, tuned_configs[i % len(tuned_configs)], epochs, device)  # as many epochs as ours' runs
        sync(device)
        tuned_seconds.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        db = ResultsDB(Path(tmp) / "results.sqlite")
        start = time.perf_counter()
        trainer_seconds: list[float] = []
        engine = timed_local_engine(device, trainer_seconds, time_tuned, tuned_runs)
        records = run_grid(configs, lambda _: cache, db, device, stack, engine=engine)
        sync(device)
        ours_seconds = time.perf_counter() - start - sum(tuned_seconds)
    ours_rate = len(configs) * epochs / ours_seconds
    tuned_rate = len(tuned_seconds) * epochs / sum(tuned_seconds)
    print(f"(b) tuned single-run loop: {len(tuned_seconds)} runs x {epochs} epochs between our stacks, "
          f"{tuned_rate:.3f} model-epochs/s")
    trainer = sum(trainer_seconds)
    print(f"(c) iqa stacked trainer: {len(configs)} runs x {epochs} epochs in {ours_seconds:.1f} s, {ours_rate:.3f} model-epochs/s (stack {stack})")
    print(f"    of which inside the trainer {trainer:.1f} s ({trainer / ours_seconds:.0%}; masking, training, per-epoch "
          f"evaluation), the grid around it {ours_seconds - trainer:.1f} s")

    params = D * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN + 1
    flops_step = 2 * B * (D * HIDDEN + HIDDEN * HIDDEN + HIDDEN) * 2 + 2 * B * (HIDDEN * HIDDEN + HIDDEN)
    bytes_step = 36 * params
    steps = len(run_rows(configs[0], cache, cache)[0]) // B
    floor_rate = stack / (steps * kernel_floor(device, stack))
    peak = peak_matmul(device)
    bw = bandwidth(device, 16 * params * stack)  # weights, grads, 2 Adam moments of one stack
    bound_rate = 1 / (steps * max(flops_step / peak, bytes_step / bw))
    limiter = "compute" if flops_step / peak > bytes_step / bw else "memory"
    # The matmuls and the optimiser step run one after the other, so a step also cannot beat the sum.
    sequential_rate = 1 / (steps * (flops_step / peak + bytes_step / bw))
    print(f"peak matmul {peak / 1e9:.1f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s at {16 * params * stack / 2**20:.0f} MiB")
    print(f"bound ({limiter}): {bound_rate:.3f} model-epochs/s; ours {ours_rate / bound_rate:.1%} of it; "
          f"compute then memory in sequence: {sequential_rate:.3f}, ours {ours_rate / sequential_rate:.1%} of it; "
          f"ours/naive {ours_rate / naive_rate:.2f}x, ours/tuned {ours_rate / tuned_rate:.2f}x")
    print(f"kernel floor (the step's matmuls and fused Adam step timed alone, stack {stack}): {floor_rate:.3f} "
          f"model-epochs/s; ours {ours_rate / floor_rate:.1%} of it, the rest is Python, autograd and small ops per step")
    best = float(np.mean([r["best_srcc"] for r in records if r["mask_k"] == 100]))
    print(json.dumps({
        "device": device, "threads": torch.get_num_threads(), "runs": len(configs), "epochs": epochs, "stack_size": stack,
        "naive_model_epochs_per_s": naive_rate, "ours_model_epochs_per_s": ours_rate, "speedup": ours_rate / naive_rate,
        "tuned_model_epochs_per_s": tuned_rate, "speedup_vs_tuned": ours_rate / tuned_rate,
        "peak_matmul_gflops": peak / 1e9, "bandwidth_gbps": bw / 1e9, "bound": limiter,
        "bound_model_epochs_per_s": bound_rate, "share_of_bound": ours_rate / bound_rate,
        "kernel_floor_model_epochs_per_s": floor_rate, "share_of_kernel_floor": ours_rate / floor_rate,
        "sequential_bound_model_epochs_per_s": sequential_rate, "share_of_sequential_bound": ours_rate / sequential_rate, "ours_seconds": ours_seconds,
        "ours_trainer_seconds": trainer,
        "mean_best_srcc_k100": best,
    }))


if __name__ == "__main__":
    main()
