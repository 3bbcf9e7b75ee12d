"""How the report writes text: one table renderer (Markdown, CSV, HTML) and one HTML page shell.

CSV goes through the csv module, so a cell holding a comma, a quote or a line break stays one cell.
"""

import csv
import html
import io


def csv_text(rows: list[list]) -> str:
    """Rows (the header first) as CSV text with "\\n" line ends; cells that are not text are written with str()."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def text_table(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """Cells already written as text, as a Markdown table, CSV or an HTML <table> (escaped), ending in a newline."""
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
    if fmt == "csv":
        return csv_text([header, *rows])
    if fmt == "html":
        def cells(row, tag):
            return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"

        return "\n".join(["<table>", cells(header, "th"), *(cells(row, "td") for row in rows), "</table>"]) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use md, csv or html")


def html_page(title: str, style: str, body: list[str]) -> str:
    """A whole HTML page: `title` (escaped), the `style` sheet and the `body` parts, one a line."""
    head = ["<!DOCTYPE html>", f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
            f"<style>{style}</style></head><body>"]
    return "\n".join(head + body + ["</body></html>"]) + "\n"
