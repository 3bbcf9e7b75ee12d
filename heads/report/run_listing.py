"""`iqa results --runs`: one line (or JSON object) per run, to find the run worth exporting."""

import json
from pathlib import Path

from iqa.cache.location import backbone_label
from iqa.heads.saved.weights import run_weights_path

SUMMARY = ("regime", "backbone", "tag", "train_dataset", "test_dataset", "head", "mask_k", "keep", "seed", "epochs", "select")
METRICS = ("status", "best_epoch", "best_srcc", "best_plcc", "last_srcc")


def run_listing(runs: list[dict], db_path: Path, as_json: bool = False) -> str:
    rows = [
        {"key": r["key"], **{k: r.get(k) for k in SUMMARY + METRICS},
         "weights": run_weights_path(db_path, r["key"]).is_file()}
        for r in runs
    ]
    if as_json:
        return "".join(json.dumps(row) + "\n" for row in rows)
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else str(v)
    head = ["key", "backbone", "train->test", "head", "seed", "select", "epoch", "srcc", "plcc", "weights"]
    lines = ["\t".join(head)]
    for row in rows:
        lines.append("\t".join(map(fmt, (row["key"][:12], backbone_label(row["backbone"], row["tag"]), f"{row['train_dataset']}->{row['test_dataset']}", row["head"],
                                          row["seed"], row["select"] or "test", row["best_epoch"], row["best_srcc"],
                                          row["best_plcc"], "yes" if row["weights"] else "no"))))
    return "\n".join(lines) + "\n"
