"""The results database (SQLite, default <cache>/results.sqlite) and the paper-style tables.

A run is keyed by its full config (regime, backbone, datasets, head, mask k, dropout, seed, epochs,
lr, ...) and the fingerprint of the cache it trained on, so a grid re-run skips what is finished
and a changed cache trains afresh. Frozen-head, LoRA and full fine-tuning runs share the table
through the `regime` field.
"""

import hashlib
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS_FILE = "results.sqlite"
GROUPS = {"Group 1": ("agiqa1k", "kadid10k"), "Group 2": ("clive", "koniq10k")}  # Table 4 / S3
LAYOUTS = {  # name -> (fields that lead the row label, field whose levels get Δ columns or None)
    "backbones": (("backbone",), None),
    "variants": (("head",), None),
    "regimes": (("backbone", "regime", "head"), None),  # Table S1: frozen vs LoRA vs full
    "masking": (("head", "mask_k"), "mask_k"),
    "dropout": (("head", "dropout", "keep"), "keep"),
}
NOT_ROW_FIELDS = {"train_dataset", "test_dataset", "seed", "act1", "act2"}  # the head name spells act1/act2
OUTCOME_FIELDS = {"key", "fingerprint_id", "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc",
                  "last_plcc", "diverged_epoch", "curves", "gates", "finished_at"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    fingerprint_id TEXT NOT NULL,
    regime TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    best_epoch INTEGER,
    best_srcc REAL,
    best_plcc REAL,
    last_srcc REAL,
    last_plcc REAL,
    diverged_epoch INTEGER,
    curves TEXT NOT NULL,
    gates TEXT,
    finished_at TEXT NOT NULL
)
"""


def default_db(cache: Path) -> Path:
    return Path(cache) / RESULTS_FILE


def run_key(config: dict, fingerprint_id: str) -> str:
    if "regime" not in config:
        raise ValueError("a run config needs its regime (frozen, lora or full)")
    canonical = json.dumps({"config": config, "fingerprint_id": fingerprint_id}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResultsDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def finished_keys(self) -> set[str]:
        with self._connect() as db:
            return {key for (key,) in db.execute("SELECT key FROM runs")}

    def record(self, runs: list[tuple[dict, str, object]]) -> None:
        """Store (config, fingerprint_id, RunResult) rows in one transaction: all or none."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [
            (
                run_key(config, fp), fp, config["regime"], json.dumps(config, sort_keys=True), r.status,
                r.best_epoch, r.best_srcc, r.best_plcc, r.last_srcc, r.last_plcc, r.diverged_epoch,
                json.dumps(r.curves), json.dumps(r.gates) if r.gates is not None else None, now,
            )
            for config, fp, r in runs
        ]
        with self._connect() as db:
            db.executemany(f"INSERT OR REPLACE INTO runs VALUES ({','.join('?' * 14)})", rows)

    def runs(self) -> list[dict]:
        """Every stored run as its config merged with its outcome (curves and gates decoded)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            out = []
            for row in db.execute("SELECT * FROM runs ORDER BY rowid"):
                run = dict(row)
                config = json.loads(run.pop("config"))
                run["curves"] = json.loads(run["curves"])
                run["gates"] = json.loads(run["gates"]) if run["gates"] else None
                out.append({**config, **run})
            return out


def _column(run: dict) -> str:
    train, test = run["train_dataset"], run["test_dataset"]
    return train if train == test else f"{train}->{test}"


def _row_fields(runs: list[dict], lead: tuple[str, ...]) -> list[str]:
    """The lead fields, then every other config field that varies, so no cell mixes two configs.

    Fields are gathered over all runs: fine-tuning runs carry fields (lora_rank, ...) cached runs lack.
    """
    every_field = dict.fromkeys(k for run in runs for k in run)
    config_fields = [k for k in every_field if k not in OUTCOME_FIELDS and k not in NOT_ROW_FIELDS]
    varying = [k for k in config_fields if len({json.dumps(r.get(k)) for r in runs}) > 1]
    return list(lead) + [k for k in varying if k not in lead]


def _summary(runs: list[dict], which: str) -> dict[str, tuple[float, float] | None]:
    """{"srcc": (mean, std), "plcc": ...} over seeds; None when any seed diverged (the paper's "—")."""
    if any(r["status"] != "done" for r in runs):
        return {"srcc": None, "plcc": None}
    out = {}
    for metric in ("srcc", "plcc"):
        values = np.array([r[f"{which}_{metric}"] for r in runs], dtype=float)
        out[metric] = (values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0)
    return out


def results_table(runs: list[dict], layout: str = "backbones", fmt: str = "md", which: str = "best") -> str:
    """Mean ± std over seeds: rows = backbone/variant (plus whatever else varies), columns = datasets.

    `which` is "best" (best epoch per run, the paper's protocol) or "last" (final epoch). The
    masking and dropout layouts add Table 4's Δ columns per dataset group against level 100 / 1.0.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if which not in ("best", "last"):
        raise ValueError("which must be 'best' or 'last'")
    if not runs:
        raise ValueError("no runs in the results database")
    lead, level_field = LAYOUTS[layout]
    fields = _row_fields(runs, lead)
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        row = tuple(run.get(f) for f in fields)
        cells.setdefault(row, {}).setdefault(_column(run), []).append(run)
    datasets = sorted({_column(r) for r in runs})
    rows = sorted(cells, key=lambda r: [(v is None, -v if isinstance(v, (int, float)) else str(v)) for v in r])
    summaries = {row: {col: _summary(cells[row][col], which) for col in cells[row]} for row in rows}

    columns: list[tuple[str, str]] = []  # (header, kind) kind = dataset name or "Δ <group>"
    if level_field is None:
        columns = [(d, d) for d in datasets]
    else:
        for group, members in GROUPS.items():
            present = [d for d in members if d in datasets]
            columns += [(d, d) for d in present] + ([(f"Δ {group}", group)] if present else [])
        columns += [(d, d) for d in datasets if not any(d in m for m in GROUPS.values())]
    reference_level = 100.0 if level_field == "mask_k" else 1.0

    def delta(row: tuple, group: str, metric: str) -> float | None:
        i = fields.index(level_field)
        base = summaries.get(row[:i] + (reference_level,) + row[i + 1 :])
        if base is None:
            return None
        diffs = []
        for d in GROUPS[group]:
            here, there = summaries[row].get(d, {}).get(metric), base.get(d, {}).get(metric)
            if here is None or there is None:
                return None
            diffs.append(here[0] - there[0])
        return float(np.mean(diffs))

    table = []
    for row in rows:
        values = []
        for header, kind in columns:
            for metric in ("srcc", "plcc"):
                if header.startswith("Δ"):
                    values.append(("delta", delta(row, kind, metric)))
                else:
                    summary = summaries[row].get(kind)
                    values.append(("cell", summary[metric]) if summary else ("missing", None))
        table.append((row, values))
    return _render(fields, columns, table, fmt, which)


def _label(value) -> str:
    """A row label: an unset field (no tag, no dropout) is blank, not "None"."""
    return "" if value is None else str(value)


def _render(fields, columns, table, fmt, which) -> str:
    metric_headers = [f"{h} {m}" for h, _ in columns for m in ("SRCC", "PLCC")]
    if fmt == "csv":
        head = fields + [f"{h} {s}" for h in metric_headers for s in (("mean", "std") if not h.startswith("Δ") else ("",))]
        lines = [",".join(x.strip() for x in head)]
        for row, values in table:
            out = [_label(v) for v in row]
            for kind, v in values:
                if kind == "delta":
                    out.append("" if v is None else f"{v:.4f}")
                elif kind == "missing":
                    out += ["", ""]
                else:
                    out += ["", ""] if v is None else [f"{v[0]:.4f}", f"{v[1]:.4f}"]
            lines.append(",".join(out))
        return "\n".join(lines) + "\n"

    def show(kind, v, latex):
        if v is None:
            return "—" if kind == "cell" else ""  # a dash for diverged runs, blank where nothing ran
        if kind == "delta":
            return f"{v:+.3f}"
        text = f"{v[0]:.3f} ± {v[1]:.3f}"
        return f"${v[0]:.3f} \\pm {v[1]:.3f}$" if latex else text

    note = f"{which} epoch per run; mean ± std over seeds; — = diverged"
    if fmt == "md":
        lines = [f"<!-- {note} -->", "| " + " | ".join(fields + metric_headers) + " |"]
        lines.append("|" + "---|" * (len(fields) + len(metric_headers)))
        for row, values in table:
            lines.append("| " + " | ".join([_label(v) for v in row] + [show(k, v, False) for k, v in values]) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        lines = [f"% {note}", "\\begin{tabular}{" + "l" * len(fields) + "c" * len(metric_headers) + "}", "\\toprule"]
        lines.append(" & ".join(fields + [h.replace("Δ", "$\\Delta$").replace("_", "\\_") for h in metric_headers]) + " \\\\")
        lines.append("\\midrule")
        for row, values in table:
            cells = [_label(v).replace("_", "\\_") for v in row] + [show(k, v, True) for k, v in values]
            lines.append(" & ".join(cells).replace("—", "---") + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use md, csv or latex")
