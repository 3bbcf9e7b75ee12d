"""The paper-style tables: runs of the results database (iqa.cache.results) laid out as Tables 1-6,
S1 and S3, mean ± std over seeds, in Markdown, CSV, LaTeX or HTML."""

import html
import json
from dataclasses import dataclass

import numpy as np

from iqa.heads.report.page import csv_text

GROUPS = {"Group 1": ("agiqa1k", "kadid10k"), "Group 2": ("clive", "koniq10k")}  # Table 4 / S3


def grouped(datasets: list[str]) -> list[tuple[str | None, list[str]]]:
    """(group, its datasets present) for each group of Table 4 with any present, then (None, [d])
    for every other dataset, in the order given."""
    groups = [(group, [d for d in members if d in datasets]) for group, members in GROUPS.items()]
    in_groups = {d for members in GROUPS.values() for d in members}
    return [(g, present) for g, present in groups if present] + [(None, [d]) for d in datasets if d not in in_groups]


@dataclass(frozen=True)
class Layout:
    lead: tuple[str, ...]  # fields that lead the row label
    level: str | None = None  # field whose levels get Δ group columns against its reference level
    hidden: tuple[str, ...] = ("act1", "act2")  # never row fields: the head name spells act1/act2
    runs: str = "all"  # "all", or "cross" for train != test runs only


LAYOUTS = {
    "backbones": Layout(("backbone",)),  # Tables 1, 2
    "variants": Layout(("head",)),
    "masking": Layout(("head", "mask_k"), "mask_k"),  # Table 4
    "dropout": Layout(("head", "dropout", "keep"), "keep"),  # Table S3
    "cross": Layout(("backbone", "head"), runs="cross"),  # Table 3: columns are train->test
    "activations": Layout(("act1", "act2"), hidden=("head",)),  # Table 6
    "regimes": Layout(("backbone", "regime", "head")),  # Table S1: frozen vs LoRA vs full
}
REFERENCE_LEVEL = {"mask_k": 100.0, "keep": 1.0}
NOT_ROW_FIELDS = {"train_dataset", "test_dataset", "seed", "prompt_pairs"}  # a zero-shot set's name stands for its pairs
OUTCOME_FIELDS = {"key", "fingerprint_id", "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc",
                  "last_plcc", "diverged_epoch", "curves", "gates", "finished_at"}


def _row_value(value):
    """A list-valued field (a run's `layers`) as its row label: [4, 3] -> "4+3", the concatenation."""
    return "+".join(map(str, value)) if isinstance(value, list) else value


def dataset_column(run: dict) -> str:
    train, test = run["train_dataset"], run["test_dataset"]
    return train if train == test else f"{train}->{test}"


def _row_fields(runs: list[dict], layout: Layout) -> list[str]:
    """The lead fields, then every other config field that varies, so no cell mixes two configs.

    Fields are gathered over all runs: fine-tuning runs carry fields (lora_rank, ...) cached runs lack.
    """
    hidden = NOT_ROW_FIELDS | set(layout.hidden)
    every_field = dict.fromkeys(k for run in runs for k in run)
    config_fields = [k for k in every_field if k not in OUTCOME_FIELDS and k not in hidden]
    varying = [k for k in config_fields if len({json.dumps(r.get(k)) for r in runs}) > 1]
    return list(layout.lead) + [k for k in varying if k not in layout.lead]


@dataclass
class Cell:
    kind: str  # "value", "delta", or why it is empty: "not run", "diverged", "incomplete" (a Δ missing inputs)
    mean: float | None = None
    std: float | None = None  # sample std over seeds (NaN for one seed: no spread); None for a Δ
    seeds: int = 0
    best: bool = False  # the best value of its column


def _summary(runs: list[dict], which: str, metric: str) -> Cell:
    """Mean ± std over seeds; "diverged" when any seed diverged (the paper's "—")."""
    if any(r["status"] != "done" for r in runs):
        return Cell("diverged", seeds=len(runs))
    values = np.array([r[f"{which}_{metric}"] for r in runs], dtype=float)
    return Cell("value", values.mean(), values.std(ddof=1) if len(values) > 1 else float("nan"), len(values))


def results_table(runs: list[dict], layout: str = "backbones", fmt: str = "md", which: str = "best") -> str:
    """Mean ± std over seeds: rows = backbone/variant (plus whatever else varies), columns = datasets.

    `which` is "best" (the epoch each run's selection rule kept; the note names the rule) or "last" (final epoch). The
    masking and dropout layouts add Table 4's Δ columns per dataset group against level 100 / 1.0.
    The best value of each column is marked (bold; `*` in the CSV's best column); empty cells say
    why: "not run" or "diverged" (any seed). Cells averaging fewer seeds than the table's most say so.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if which not in ("best", "last"):
        raise ValueError("which must be 'best' or 'last'")
    spec = LAYOUTS[layout]
    if spec.runs == "cross":
        runs = [r for r in runs if r["train_dataset"] != r["test_dataset"]]
    if not runs:
        raise ValueError(f"no runs for the {layout} table in the results database")
    fields = _row_fields(runs, spec)
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        row = tuple(_row_value(run.get(f)) for f in fields)
        groups.setdefault(row, {}).setdefault(dataset_column(run), []).append(run)
    datasets = sorted({dataset_column(r) for r in runs})
    rows = sorted(groups, key=lambda r: [(v is None, -v if isinstance(v, (int, float)) else str(v)) for v in r])

    def summary(row: tuple, dataset: str, metric: str) -> Cell:
        dataset_runs = groups.get(row, {}).get(dataset)
        return _summary(dataset_runs, which, metric) if dataset_runs else Cell("not run")

    columns: list[tuple[str, str]] = []  # (header, kind) kind = dataset name or a group name for Δ
    if spec.level is None:
        columns = [(d, d) for d in datasets]
    else:
        for group, present in grouped(datasets):
            columns += [(d, d) for d in present] + ([(f"Δ {group}", group)] if group else [])

    def delta(row: tuple, group: str, metric: str) -> Cell:
        """Mean over the group's datasets of (this level - the reference level)."""
        i = fields.index(spec.level)
        base = row[:i] + (REFERENCE_LEVEL[spec.level],) + row[i + 1 :]
        pairs = [(summary(row, d, metric), summary(base, d, metric)) for d in GROUPS[group]]
        if any(c.kind != "value" for pair in pairs for c in pair):
            return Cell("incomplete")
        return Cell("delta", float(np.mean([here.mean - there.mean for here, there in pairs])))

    table = [
        [
            delta(row, kind, metric) if header.startswith("Δ") else summary(row, kind, metric)
            for header, kind in columns
            for metric in ("srcc", "plcc")
        ]
        for row in rows
    ]
    _mark_best(table)
    kept = "last epoch per run" if which == "last" else "; ".join(
        f"select={rule}: {RULE_NOTES[rule]}" for rule in sorted({r.get("select") or "test" for r in runs}))
    sizes = test_sizes(runs)
    if sizes:
        kept += "; test images: " + ", ".join(f"{d} {'/'.join(f'{n:,}' for n in ns)}" for d, ns in sizes.items())
    if small_test_warning(runs):
        kept += f" (under {SMALL_TEST}: rank correlations are unreliable)"
    return _render(fields, rows, columns, table, fmt, kept)


SMALL_TEST = 20  # fewer test images than this: a rank correlation says little (5 images give SRCC 1.0 often)


def test_sizes(runs: list[dict]) -> dict[str, list[int]]:
    """The test-split sizes behind each dataset column (runs record theirs as curves["test_images"])."""
    sizes: dict[str, set[int]] = {}
    for run in runs:
        n = (run.get("curves") or {}).get("test_images")
        if n is not None:
            sizes.setdefault(dataset_column(run), set()).add(int(n))
    return {d: sorted(ns) for d, ns in sorted(sizes.items())}


def small_test_warning(runs: list[dict]) -> str | None:
    """One line naming the datasets whose test split is too small to rank on, or None."""
    small = {d: min(ns) for d, ns in test_sizes(runs).items() if min(ns) < SMALL_TEST}
    if not small:
        return None
    listed = ", ".join(f"{d} ({n} images)" for d, n in small.items())
    return (f"the test split of {listed} has fewer than {SMALL_TEST} images: its SRCC and PLCC are unreliable "
            "(a handful of images often ranks perfectly); use more images or --split-by random")


def _mark_best(table: list[list[Cell]]) -> None:
    """Mark the highest value of each column (as displayed, 3 decimals; ties all), where 2+ rows have one."""
    for j in range(len(table[0]) if table else 0):
        column = [row[j] for row in table if row[j].kind in ("value", "delta")]
        if len(column) < 2:
            continue
        top = max(round(c.mean, 3) for c in column)
        for c in column:
            c.best = round(c.mean, 3) == top


def _label(value) -> str:
    """A row label: an unset field (no tag, no dropout) is blank, not "None"; a whole number as one (mask k 100, not 100.0)."""
    if value is None:
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


RULE_NOTES = {
    "test": "the epoch of best test SRCC (the paper's protocol; optimistic, the test set chose it)",
    "val": "the epoch of best SRCC on a validation part of the training split (no test row chose it)",
    "last": "the last epoch",
}


def _render(fields, rows, columns, table, fmt, kept) -> str:
    metric_headers = [f"{h} {m}" for h, _ in columns for m in ("SRCC", "PLCC")]
    most_seeds = max((c.seeds for row in table for c in row), default=0)
    spread = "one seed each" if most_seeds == 1 else f"mean ± std over {most_seeds} seeds, (n=...) where fewer"
    note = f"{kept}; {spread}; best per column in bold"

    def text(c: Cell, latex: bool = False) -> str:
        if c.kind == "delta":
            shown = f"{c.mean:+.3f}"
        elif c.kind == "value" and c.seeds == 1:  # one value has no spread: no "± 0.000"
            shown = f"{c.mean:.3f}"
        elif c.kind == "value":
            pm = " \\pm " if latex else " ± "
            shown = f"{c.mean:.3f}{pm}{c.std:.3f}"
        else:
            return {"diverged": "— (diverged)", "not run": "not run", "incomplete": "incomplete"}[c.kind]
        if latex:
            shown = f"\\mathbf{{{shown}}}" if c.best else shown
            shown = f"${shown}$"
        elif c.best:
            shown = f"**{shown}**" if fmt == "md" else f"<b>{shown}</b>"
        if c.kind == "value" and c.seeds < most_seeds:
            shown += f" (n={c.seeds})"
        return shown

    if fmt == "csv":
        head = list(fields)
        for header in metric_headers:
            head += [f"{header}"] if header.startswith("Δ") else [f"{header} {s}" for s in ("mean", "std")]
            head.append(f"{header} best")
        head += [f"{h} seeds" for h, _ in columns if not h.startswith("Δ")]
        lines = [head]
        for row, cells in zip(rows, table):
            out = [_label(v) for v in row]
            for c in cells:
                if c.kind == "value":
                    out += [f"{c.mean:.4f}", f"{c.std:.4f}" if c.seeds > 1 else ""]
                elif c.kind == "delta":
                    out.append(f"{c.mean:.4f}")
                else:  # the reason in the value field, the std (if any) left blank
                    out += [c.kind] + ([] if c.kind == "incomplete" else [""])
                out.append("*" if c.best else "")
            out += [str(cells[2 * j].seeds) for j, (h, _) in enumerate(columns) if not h.startswith("Δ")]
            lines.append(out)
        return csv_text(lines)
    if fmt == "md":
        lines = [f"<!-- {note} -->", "| " + " | ".join(fields + metric_headers) + " |"]
        lines.append("|" + "---|" * (len(fields) + len(metric_headers)))
        for row, cells in zip(rows, table):
            lines.append("| " + " | ".join([_label(v) for v in row] + [text(c) for c in cells]) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        lines = [f"% {note}", "\\begin{tabular}{" + "l" * len(fields) + "c" * len(metric_headers) + "}", "\\toprule"]
        headers = [h.replace("Δ", "$\\Delta$").replace("->", "$\\to$") for h in metric_headers]
        lines.append(" & ".join(fields + headers).replace("_", "\\_") + " \\\\")
        lines.append("\\midrule")
        for row, cells in zip(rows, table):
            line = " & ".join([_label(v).replace("_", "\\_") for v in row] + [text(c, latex=True) for c in cells])
            lines.append(line.replace("—", "---") + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        esc = html.escape
        lines = [f"<table><caption>{esc(note)}</caption>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in fields + metric_headers) + "</tr>"]
        for row, cells in zip(rows, table):
            tds = [f"<td>{esc(_label(v))}</td>" for v in row]
            tds += [f'<td class="{c.kind.replace(" ", "-")}">{text(c)}</td>' for c in cells]
            lines.append("<tr>" + "".join(tds) + "</tr>")
        return "\n".join(lines + ["</table>"]) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use md, csv, latex or html")
