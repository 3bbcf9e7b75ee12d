"""`iqa results --runs`: one line (or JSON object) per run, to find the run worth exporting."""

import json
from pathlib import Path

from iqa.cache.location import backbone_label
from iqa.heads.saved.weights import run_weights_path

SUMMARY = ("regime", "backbone", "tag", "train_dataset", "test_dataset", "head", "mask_k", "keep", "seed", "epochs", "select")
METRICS = ("status", "best_epoch", "best_srcc", "best_plcc", "last_srcc")
GRID_FIELDS = ("train_dataset", "test_dataset", "backbone", "head", "act1", "act2", "mask_k", "dropout", "keep", "seed",
               "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")


OUTCOME = {"key", "fingerprint_id", "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc",
           "diverged_epoch", "curves", "gates", "finished_at"}


def run_summary(record: dict) -> dict:
    """A trained run as `iqa head --json` prints it: its key (what `iqa export` takes), the grid's fields, the metrics."""
    return {"key": record["key"], **{k: record[k] for k in GRID_FIELDS}, "layers": record.get("layers"),
            "fuse": record.get("fuse"), **({"spatial": record["spatial"]} if record.get("spatial") else {})}


def differing_fields(runs: list[dict]) -> list[str]:
    """Config fields whose value differs between the runs listed, beyond the listing's own columns: what
    tells two otherwise identical lines apart (a mask k, a loss, a learning rate)."""
    shown = {"backbone", "tag", "train_dataset", "test_dataset", "head", "seed", "select"}
    names = sorted({k for r in runs for k in r} - OUTCOME - shown)
    return [k for k in names if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in runs}) > 1]


def run_listing(runs: list[dict], db_path: Path, as_json: bool = False) -> str:
    rows = [
        {"key": r["key"], **{k: r.get(k) for k in SUMMARY + METRICS},
         "weights": run_weights_path(db_path, r["key"]).is_file()}
        for r in runs
    ]
    if as_json:
        return "".join(json.dumps(row) + "\n" for row in rows)
    def fmt(v):
        if isinstance(v, float) and float(v).is_integer():
            return str(int(v))  # a mask k of 100, not 100.0
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    extra = differing_fields(runs)
    head = ["key", "backbone", "train->test", "head", "seed", "select", *extra, "epoch", "srcc", "plcc", "weights"]
    lines = ["\t".join(head)]
    for run, row in zip(runs, rows):
        backbone = backbone_label(row["backbone"], row["tag"])
        lines.append("\t".join(map(fmt, (row["key"][:12], backbone, f"{row['train_dataset']}->{row['test_dataset']}", row["head"],
                                          row["seed"], row["select"] or "test", *(run.get(k) for k in extra),
                                          row["best_epoch"], row["best_srcc"], row["best_plcc"],
                                          "yes" if row["weights"] else "no"))))
    return "\n".join(lines) + "\n"
