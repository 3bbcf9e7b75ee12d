"""`iqa explain --evaluate`'s evaluation (heads/explain/evaluate.py) timed against a per-step loop, in one run.

(a) before: the evaluation as a careful researcher writes it with one forward pass per deletion step: the
    same maps, orders and pointing game, then for each curve (the attribution order and RANDOM_ORDERS
    random ones) the image blanked step by step (each step blanks only the blocks it adds, on the previous
    step's image) and scored alone under no_grad; the image and the blank image, every curve's first and
    last step, scored once per grid (as (b) does), so the figure is the batching's;
(b) after: iqa's `evaluate`, which scores each grid's blanked images, of all its curves, in forward passes
    of at most DELETION_BATCH images.
The model is a tiny random DINOv2 (2 blocks, width 32, patch 8) at --resolution px with a one-member head;
the grids are the default grid set's layout (2x2 photos of 128 px, one cell distorted), --grids of them.
(a) and (b) must give the same numbers (pointing game, both deletion areas, to 1e-5); each is timed
--repeats times, alternating, and the fastest kept, in wall and in process CPU seconds (the steadier on
shared cores). Beside the whole evaluation, the deletion curves alone (the maps computed once beforehand)
are timed both ways: the part the batching changes. Prints seconds and speed-ups; the last line is one
JSON object.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iqa.data.gridpg import make_gridpg, read_gridpg
from iqa.extract.backbones import load_backbone
from iqa.extract.preprocess import decode_image
from iqa.extract.registry import get_spec
from iqa.heads.explain.attribution import attribute, score_target
from iqa.heads.explain.evaluate import (DELETION_STEPS, RANDOM_ORDERS, area, block_order, blocks, cell_share,
                                        deletion_curves, evaluate, predicted)
from iqa.heads.explain.maps import Subject, input_pixels
from iqa.heads.models.mlp import StackedMLP


def tiny_subject(resolution: int) -> Subject:
    torch.manual_seed(0)
    backbone = load_backbone(get_spec("dinov2", "tiny"), weights="tiny", resolution=resolution).eval()
    return Subject("tiny-dinov2", backbone, StackedMLP(backbone.spec.config["hidden_size"], [8]).eval())


def per_step_curves(subject: Subject, pixels: torch.Tensor, orders: list[np.ndarray], fill: str) -> list[tuple]:
    """[(deleted fraction, score) per step] per order: the image blanked incrementally, one forward pass per
    step; the image and the blank image (every order's first and last step) scored once."""
    cells = blocks(*pixels.shape[-2:])
    blank = pixels.float().mean((2, 3), keepdim=True).round().to(pixels.dtype) if fill == "mean" else 0
    first, last = float(predicted(subject, pixels)[0]), float(predicted(subject, torch.zeros_like(pixels) + blank)[0])
    cuts = np.linspace(0, len(cells), DELETION_STEPS + 1).round().astype(int)
    curves = []
    for order in orders:
        blanked, done, area_done = pixels.clone(), 0, 0
        fractions, scores = [0.0], [first]
        for cut in cuts[1:]:
            for b in order[done:cut]:
                rows, cols = cells[int(b)]
                blanked[..., rows, cols] = blank
                area_done += (rows.stop - rows.start) * (cols.stop - cols.start)
            done = cut
            fractions.append(area_done / pixels[0, 0].numel())
            scores.append(last if cut == cuts[-1] else float(predicted(subject, blanked)[0]))
        curves.append((np.array(fractions), np.array(scores)))
    return curves


def maps_and_orders(subject: Subject, grid_set: Path, method: str) -> list[tuple]:
    """Per grid: (pixels, pointing-game share, the deletion orders), drawn as `evaluate` draws them."""
    rng, found = np.random.default_rng(0), []
    for path, cell in read_gridpg(grid_set):
        image, _, _ = decode_image(path)
        pixels = input_pixels(subject.backbone, image)
        share = cell_share(attribute(subject.backbone, score_target(subject.head, "low"), pixels, method)[0], cell)
        order = block_order(attribute(subject.backbone, score_target(subject.head, "high"), pixels, method)[0])
        found.append((pixels, share, [order, *(rng.permutation(len(order)) for _ in range(RANDOM_ORDERS))]))
    return found


def per_step_evaluation(subject: Subject, grid_set: Path, method: str, fill: str) -> dict:
    """(a): the measures `evaluate` gives."""
    found = maps_and_orders(subject, grid_set, method)
    curves = [per_step_curves(subject, pixels, orders, fill) for pixels, _, orders in found]
    pointed = [share for _, share, _ in found if share is not None]
    return {"pointing_game": float(np.mean(pointed)) if pointed else float("nan"),
            "deletion_auc": float(np.mean([area(*c[0]) for c in curves])),
            "deletion_auc_random": float(np.mean([area(*x) for c in curves for x in c[1:]]))}


def timed(work, times: list) -> object:
    """`work()`, its (wall, process CPU) seconds appended to `times`: on shared cores a single-threaded run's
    CPU seconds do not count the time other processes held the core."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--grids", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--fill", default="zero")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on shared cores two threads' syncing costs more than a tiny model)")
    parser.add_argument("--smoke", action="store_true", help="64 px, 2 grids, once: seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.resolution, args.grids, args.repeats = 64, 2, 1
    subject = tiny_subject(args.resolution)
    times = {"per_step": [], "batched": [], "deletion_per_step": [], "deletion_batched": []}
    with tempfile.TemporaryDirectory() as tmp:
        grid_set = make_gridpg(Path(tmp) / "grids", grids=args.grids, progress=False).parent
        found = maps_and_orders(subject, grid_set, args.method)
        for _ in range(args.repeats):  # alternating, so a shared machine's drift reaches both
            measured = timed(lambda: per_step_evaluation(subject, grid_set, args.method, args.fill), times["per_step"])
            ours = timed(lambda: evaluate(subject, grid_set, args.method, args.fill, progress=False), times["batched"])
            timed(lambda: [per_step_curves(subject, p, orders, args.fill) for p, _, orders in found],
                  times["deletion_per_step"])
            timed(lambda: [deletion_curves(subject, p, orders, fill=args.fill) for p, _, orders in found],
                  times["deletion_batched"])
        for key, value in measured.items():
            if not np.isclose(value, getattr(ours, key), rtol=0, atol=1e-5, equal_nan=True):
                raise SystemExit(f"{key}: per-step {value} != batched {getattr(ours, key)}")
    best = {f"{name}_{clock}_seconds": min(t[i] for t in runs) for name, runs in times.items()
            for i, clock in enumerate(("wall", "cpu"))}
    figures = {"resolution": args.resolution, "grids": args.grids, "blocks": len(blocks(args.resolution, args.resolution)),
               "curves_per_grid": 1 + RANDOM_ORDERS, "steps": DELETION_STEPS + 1, "repeats": args.repeats, **best,
               **{f"{part}speedup_{clock}": best[f"{part}per_step_{clock}_seconds"] / best[f"{part}batched_{clock}_seconds"]
                  for part in ("", "deletion_") for clock in ("wall", "cpu")},
               "threads": torch.get_num_threads(), "smoke": args.smoke}
    print_figures(figures)
    print(json.dumps(figures))


def print_figures(figures: dict) -> None:
    """Both evaluations' wall and CPU seconds, and the speed-up, for a reader."""
    print(f"evaluation of {figures['grids']} grids at {figures['resolution']} px ({figures['blocks']} blocks, "
          f"{figures['curves_per_grid']} curves x {figures['steps']} steps each), best of {figures['repeats']}, "
          "wall | CPU seconds:")
    for part, what in (("", "whole evaluation"), ("deletion_", "deletion curves alone")):
        loop = [figures[f"{part}per_step_{clock}_seconds"] for clock in ("wall", "cpu")]
        ours = [figures[f"{part}batched_{clock}_seconds"] for clock in ("wall", "cpu")]
        print(f"  {what}: per-step loop {loop[0]:.2f} | {loop[1]:.2f}, batched (iqa) {ours[0]:.2f} | {ours[1]:.2f}: "
              f"x{figures[f'{part}speedup_wall']:.2f} | x{figures[f'{part}speedup_cpu']:.2f}")


if __name__ == "__main__":
    main()
