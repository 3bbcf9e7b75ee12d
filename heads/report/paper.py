"""The paper's published numbers (heads/report/paper_values.json) beside the results database's.

paper_values.json holds Tables 1-6 and S1-S5 cell by cell as printed (null where the extracted text
is unreadable); each row of the paper's own method names the runs it stands for (`match`: config
fields of the results database) and its standard-deviation row in Table S2 or S4 (`sd_row`).
A measured cell is *reproduced* when |measured - published| <= 2 sd + half a unit of the printed
value's last digit (the printed mean is itself only known to that precision); *off* otherwise.
"""

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iqa.heads.report.page import csv_text, html_page
from iqa.heads.report.tables import GROUPS, OUTCOME_FIELDS
from iqa.errors import SettingError

PAPER_FILE = Path(__file__).with_name("paper_values.json")
COMPARED = ("1", "2", "3", "4", "5a", "5b", "6", "S1", "S3")  # the tables with measured cells beside them
SD_TABLES = ("S2", "S4")
REFERENCE = {"mask_k": 100.0, "keep": 1.0}  # Δ columns of Tables 4 and S3 are against this level
# iqa's classical baselines, shown beside a published row they resemble, under their own protocol
CLASSICAL = {"nss": ("5a", "BRISQUE [21]", "iqa nss (BRISQUE's 36 features) + MLP head; the paper's BRISQUE used an SVR")}
VERDICTS = ("reproduced", "off", "no published sd", "different protocol", "not run", "diverged", "several configs", "unreadable",
            "no published value", "published only")


def load_paper(path: Path = PAPER_FILE) -> dict:
    """The published tables, each checked to have the shape the paper prints (rows x columns x metrics)."""
    try:
        doc = json.loads(Path(path).read_text())
        tables = doc["tables"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"unreadable paper values {path}: {error}") from None
    for tid, table in tables.items():
        width = len(table["columns"]) * len(table["metrics"] or [None])
        for row in table["rows"]:
            if len(row["cells"]) != width:
                raise ValueError(f"paper table {tid} row {row['label']!r}: {len(row['cells'])} cells, expected {width}")
            if table.get("kind") != "profile":
                for cell in row["cells"]:
                    printed_value(cell)  # raises on a cell that is not a number or an empty mark
    return tables


def printed_value(cell: str | None) -> float | None:
    """The number a printed cell stands for: '.875' 0.875, '.781 (s)' 0.781, '3.918†' 3.918,
    '<.0001' 0.0001 (its bound); None for the paper's empty marks ('-', '—') and unreadable cells."""
    if cell is None or cell.strip() in ("-", "—"):
        return None
    text = cell.split(" (")[0].rstrip("†").lstrip("<")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"paper cell {cell!r} is not a number") from None


def rounding(cell: str) -> float:
    """Half a unit of the printed value's last digit: '.875' 0.0005."""
    text = cell.split(" (")[0].rstrip("†")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0**-decimals


@dataclass
class Compared:
    printed: str | None  # the paper's cell as printed (None: unreadable)
    verdict: str  # one of VERDICTS
    measured: float | None = None
    seeds: int = 0
    sd: float | None = None  # the paper's sd of this cell, where published

    @property
    def diff(self) -> float | None:
        value = printed_value(self.printed)
        return None if self.measured is None or value is None else self.measured - value


def _select(runs: list[dict], match: dict, column: str) -> list[dict]:
    """Runs of this row and dataset column ("a->b" cross-dataset); ablation fields at their plain level unless matched."""
    train, _, test = column.partition("->")
    test = test or train

    def fits(run: dict) -> bool:
        if run["train_dataset"] != train or run["test_dataset"] != test:
            return False
        plain = {"mask_k": 100.0, "keep": 1.0, "dropout": None}
        for field, want in {**plain, **match}.items():
            got = run.get(field, plain.get(field))
            if isinstance(want, float) and isinstance(got, (int, float)):
                if not math.isclose(got, want):
                    return False
            elif got != want:
                return False
        return True

    return [r for r in runs if fits(r)]


def _measure(runs: list[dict], match: dict, column: str, metric: str) -> tuple[str | None, float | None, int]:
    """(None, mean over seeds, seeds), or (why there is no value, None, seeds)."""
    chosen = _select(runs, match, column)
    if not chosen:
        return "not run", None, 0
    if len({json.dumps({k: v for k, v in r.items() if k not in OUTCOME_FIELDS | {"seed"}}, sort_keys=True) for r in chosen}) > 1:
        return "several configs", None, len(chosen)  # e.g. frozen and LoRA runs of a table that names no regime
    if any(r["status"] != "done" for r in chosen):
        return "diverged", None, len(chosen)
    return None, float(np.mean([r[f"best_{metric}"] for r in chosen])), len(chosen)


def _measured_cell(runs, table, match, column, metric, unpublished=()) -> tuple[str | None, float | None, int]:
    """A dataset column, the table's average over its dataset columns (but the `unpublished` ones, which the
    paper's average leaves out: CDIFT +Sig's NaN SPAQ), or a Δ group column."""
    if column == "average":
        parts = [_measure(runs, match, c, metric) for c in table["columns"]
                 if c != "average" and not c.startswith("delta:") and c not in unpublished]
        missing = next((why for why, _, _ in parts if why), None)
        return (missing, None, 0) if missing else (None, float(np.mean([v for _, v, _ in parts])), min(n for _, _, n in parts))
    if column.startswith("delta:"):
        level = next(f for f in REFERENCE if f in match)
        base = {**match, level: REFERENCE[level]}
        diffs, seeds = [], []
        for dataset in GROUPS[column[len("delta:"):]]:
            (why, here, n), (why_base, there, _) = _measure(runs, match, dataset, metric), _measure(runs, base, dataset, metric)
            if why or why_base:
                return why or why_base, None, 0
            diffs.append(here - there)
            seeds.append(n)
        return None, float(np.mean(diffs)), min(seeds)
    return _measure(runs, match, column, metric)


def _sd(tables: dict, table: dict, row: dict, column: str, metric: str) -> float | None:
    if not table.get("sd_table") or not row.get("sd_row"):
        return None
    sd_table = tables[table["sd_table"]]
    sd_row = next(r for r in sd_table["rows"] if r["label"] == row["sd_row"])
    if column not in sd_table["columns"] or metric not in sd_table["metrics"]:
        return None
    i = sd_table["columns"].index(column) * len(sd_table["metrics"]) + sd_table["metrics"].index(metric)
    return printed_value(sd_row["cells"][i])


def compare_row(tables: dict, tid: str, row: dict, runs: list[dict], protocol: bool = False) -> list[Compared]:
    """Each printed cell of `row` beside its measured value; `protocol`: a classical stand-in, never judged."""
    table, out = tables[tid], []
    width = len(table["metrics"] or [None])
    marked = [cell is not None and printed_value(cell) is None for cell in row["cells"]]  # the paper's "-" and "—"
    for i, printed in enumerate(row["cells"]):
        column, metric = table["columns"][i // len(table["metrics"])], table["metrics"][i % len(table["metrics"])]
        unpublished = [] if row.get("measured_only") else [c for j, c in enumerate(table["columns"]) if marked[j * width + i % width]]
        if "match" not in row:  # another method's row, or one of the paper's with no iqa backbone (its note says)
            absent = "not run" if row.get("kind") == "ours" else "published only"
            out.append(Compared(printed, "unreadable" if printed is None else absent))
            continue
        why, measured, seeds = _measured_cell(runs, table, row["match"], column, metric, unpublished)
        sd = _sd(tables, table, row, column, metric)
        if printed is None:
            verdict = "unreadable"
        elif printed_value(printed) is None:
            verdict = "no published value"
        elif why:
            verdict = why
        elif protocol:
            verdict = "different protocol"
        elif sd is None:
            verdict = "no published sd"
        else:
            tolerance = 2 * sd + rounding(printed)
            verdict = "reproduced" if abs(measured - printed_value(printed)) <= tolerance + 1e-12 else "off"
        out.append(Compared(printed, verdict, measured, seeds, sd))
    return out


def _classical_rows(tables: dict, tid: str, runs: list[dict]) -> list[tuple[int, dict]]:
    """(index of the published row it sits under, a row of iqa's classical runs) for each head and regime run."""
    out = []
    for backbone, (table_id, beside, label) in CLASSICAL.items():
        if table_id != tid:
            continue
        rows = tables[tid]["rows"]
        at = next(i for i, r in enumerate(rows) if r["label"] == beside)
        for head, regime in sorted({(r["head"], r["regime"]) for r in runs if r["backbone"] == backbone}):
            match = {"backbone": backbone, "head": head, "regime": regime}
            out.append((at, {"label": f"{label}: {head}, {regime}", "cells": rows[at]["cells"], "match": match}))
    return out


ZERO_SHOT = ("zeroshot", "learned-prompts")  # heads/zeroshot's runs: no published counterpart, shown in Table 5a
ZERO_SHOT_TABLE, ZERO_SHOT_BEFORE = "5a", "B"  # among the compared methods, above the paper's own rows


def _zero_shot_rows(tables: dict, tid: str, runs: list[dict]) -> list[tuple[int, dict]]:
    """(index of the row they go above, a row) per backbone, head and prompt set of `iqa zeroshot` runs on the
    seeds' test rows: measured beside the published methods, with no printed value of their own."""
    if tid != ZERO_SHOT_TABLE:
        return []
    table = tables[tid]
    at = next(i for i, r in enumerate(table["rows"]) if r["label"] == ZERO_SHOT_BEFORE)
    width = len(table["columns"]) * len(table["metrics"] or [None])
    found = sorted({(r["backbone"], r["head"], r["prompts"]) for r in runs
                    if r.get("head") in ZERO_SHOT and r.get("evaluated_on") == "test"})
    return [(at - 1, {"label": f"iqa {head} ({backbone}, {prompts} prompts)", "cells": ["—"] * width, "measured_only": True,
                      "match": {"backbone": backbone, "head": head, "prompts": prompts, "evaluated_on": "test"}})
            for backbone, head, prompts in found]


@dataclass
class TableComparison:
    tid: str
    title: str
    headers: list[str]
    rows: list[tuple[str, list[Compared]]]
    notes: list[str]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICTS, 0)
        for _, cells in self.rows:
            for c in cells:
                counts[c.verdict] += 1
        return counts

    def summary(self) -> str:
        c = self.counts()
        compared = c["reproduced"] + c["off"]
        line = (f"{self.title}: {compared} cells compared, {c['reproduced']} reproduced, {c['off']} off, "
                f"{c['not run']} not run")
        extra = [f"{c[v]} {v}" for v in VERDICTS[2:] if v not in ("not run",) and c[v]]
        return line + (f" ({', '.join(extra)})" if extra else "")


def compare(runs: list[dict], tables: dict | None = None) -> list[TableComparison]:
    """Every compared table, its rows in the paper's order, iqa's classical runs beside their published row."""
    tables = tables if tables is not None else load_paper()
    out = []
    for tid in COMPARED:
        table = tables[tid]
        headers = [f"{c.replace('delta:', 'Δ ')} {m.upper()}" for c in table["columns"] for m in table["metrics"]]
        rows = [(r["label"], compare_row(tables, tid, r, runs)) for r in table["rows"]]
        notes = [f"{r['label']}: {r['note']}" for r in table["rows"] if r.get("note")]
        for shift, (at, row) in enumerate(_classical_rows(tables, tid, runs) + _zero_shot_rows(tables, tid, runs)):
            rows.insert(at + 1 + shift, (row["label"], compare_row(tables, tid, row, runs, protocol=True)))
        if not table.get("sd_table"):
            notes.append("the paper publishes no standard deviations for this table: measured cells are shown, not judged")
        out.append(TableComparison(tid, table["title"], headers, rows, notes))
    return out


MARK = {"reproduced": "✓", "off": "✗", "no published sd": "(no sd)", "different protocol": "(other protocol)"}


def cell_text(c: Compared) -> str:
    printed = "unreadable" if c.printed is None else c.printed
    if c.measured is None:
        return printed if c.verdict in ("published only", "unreadable") else f"{printed} / {c.verdict}"
    diff = f" ({c.diff:+.3f})" if c.diff is not None else ""
    return f"{printed} / {c.measured:.3f}{diff} {MARK.get(c.verdict, c.verdict)}".rstrip()


def comparison_md(comparisons: list[TableComparison]) -> str:
    lines = ["Each cell: published / measured (measured - published); ✓ within 2 published sd (+ printing precision), ✗ off.", ""]
    for t in comparisons:
        lines += [f"### {t.title}", "", t.summary(), "", "| row | " + " | ".join(t.headers) + " |",
                  "|" + "---|" * (len(t.headers) + 1)]
        lines += ["| " + " | ".join([label] + [cell_text(c) for c in cells]) + " |" for label, cells in t.rows]
        lines += [""] + [f"- {n}" for n in t.notes] + ([""] if t.notes else [])
    return "\n".join(lines) + "\n"


def comparison_csv(comparisons: list[TableComparison]) -> str:
    rows = [["table", "row", "column", "published", "measured", "seeds", "diff", "paper_sd", "verdict"]]
    for t in comparisons:
        for label, cells in t.rows:
            for header, c in zip(t.headers, cells):
                rows.append([t.tid, label, header, "" if c.printed is None else c.printed,
                             "" if c.measured is None else f"{c.measured:.4f}", c.seeds or "",
                             "" if c.diff is None else f"{c.diff:+.4f}", "" if c.sd is None else c.sd, c.verdict])
    return csv_text(rows)


PAGE_STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}th{background:#f3f3f3}td.label{text-align:left}
td.reproduced{background:#dff3df}td.off{background:#f8d7d7}td.not-run,td.published-only,td.no-published-value{color:#888}
td.unreadable,td.several-configs{background:#eee;color:#a60}td.different-protocol,td.no-published-sd{background:#fff6d6}td.diverged{color:#b00}
p.summary{font-weight:bold}"""


def comparison_html(comparisons: list[TableComparison]) -> str:
    esc = html.escape
    parts = ["<h1>Measured beside the paper</h1>",
             "<p>Each cell: published / measured (measured &minus; published). Green: within two of the paper's "
             "standard deviations for the cell (Table S2/S4) plus half the printed precision; red: off; yellow: "
             "measured but not judged (no published sd, or a different protocol); grey: not run or published only.</p>",
             "<ul>", *(f"<li>{esc(t.summary())}</li>" for t in comparisons), "</ul>"]
    for t in comparisons:
        parts += [f"<h2>{esc(t.title)}</h2>", f'<p class="summary">{esc(t.summary())}</p>', "<table>",
                  "<tr><th>row</th>" + "".join(f"<th>{esc(h)}</th>" for h in t.headers) + "</tr>"]
        for label, cells in t.rows:
            tds = "".join(
                f'<td class="{c.verdict.replace(" ", "-")}" title="{esc(c.verdict)}'
                f'{"" if c.sd is None else f"; paper sd {c.sd:g}"}{f"; {c.seeds} seeds" if c.seeds else ""}">'
                f"{esc(cell_text(c))}</td>" for c in cells)
            parts.append(f'<tr><td class="label">{esc(label)}</td>{tds}</tr>')
        parts.append("</table>")
        if t.notes:
            parts += ["<ul>", *(f"<li>{esc(n)}</li>" for n in t.notes), "</ul>"]
    return html_page("iqa: beside the paper", PAGE_STYLE, parts)


def render(comparisons: list[TableComparison], fmt: str) -> str:
    renderers = {"md": comparison_md, "csv": comparison_csv, "html": comparison_html}
    if fmt not in renderers:
        raise SettingError(f"unknown format {fmt!r} for `paper`; use md, csv or html")
    return renderers[fmt](comparisons)
