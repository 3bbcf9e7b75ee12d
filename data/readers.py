"""Reading label files as released: CSV and .xlsx tables by column name, image folders.

Every adapter goes through these helpers, so a missing file, a missing column or an
unreadable spreadsheet gives the same kind of error everywhere: one `DatasetError` whose
message names the file and what is wrong with it.
"""

import csv
import math
from pathlib import Path

from iqa.errors import IqaError


class DatasetError(IqaError, ValueError):
    """Bad dataset input: the message is one line that says what to fix."""


def require_file(path: Path, what: str = "label file") -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _select_columns(path: Path, header: list[str], rows: list[tuple], columns: list[str]) -> dict[str, list]:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DatasetError(f"{path.name}: missing column(s) {missing}; the file has {header}")
    if not rows:
        raise DatasetError(f"{path.name}: no data rows")
    at = {c: header.index(c) for c in columns}
    return {c: [row[at[c]] if at[c] < len(row) else None for row in rows] for c in columns}


def read_csv_columns(path: Path, columns: list[str]) -> dict[str, list[str]]:
    """The named columns of a CSV file with a header row, as strings (blank lines skipped)."""
    require_file(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path.name}: not a readable CSV file ({e})") from None
    if not table:
        raise DatasetError(f"{path.name}: the file is empty")
    header = [cell.strip() for cell in table[0]]
    return _select_columns(path, header, [tuple(row) for row in table[1:]], columns)


def read_xlsx_columns(path: Path, columns: list[str]) -> dict[str, list]:
    """The named columns of the first sheet of an .xlsx file with a header row (empty rows skipped)."""
    require_file(path)
    import openpyxl  # here, not at the top: it costs `iqa --help` 0.1 s

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises zip, XML and key errors for a damaged file
        raise DatasetError(f"{path.name}: unreadable spreadsheet ({type(e).__name__}: {e})") from None
    try:
        sheet = workbook.worksheets[0]
        table = [row for row in sheet.iter_rows(values_only=True) if any(cell is not None for cell in row)]
    finally:
        workbook.close()  # read-only mode keeps the file open until closed
    if not table:
        raise DatasetError(f"{path.name}: the first sheet is empty")
    header = [str(cell).strip() if cell is not None else "" for cell in table[0]]
    return _select_columns(path, header, table[1:], columns)


def to_floats(values: list, column: str, path: Path) -> list[float]:
    """Numbers from cells; blank cells become NaN (reported later with the image names)."""
    numbers = []
    for row, value in enumerate(values, start=2):  # row 1 is the header
        if value is None or (isinstance(value, str) and not value.strip()):
            numbers.append(math.nan)
            continue
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            raise DatasetError(f"{path.name}: column {column!r} row {row} is not a number: {value!r}") from None
    return numbers


def to_names(values: list, column: str, path: Path) -> list[str]:
    """Image names from cells; an empty name is an error (it cannot point at an image)."""
    names = [str(v).strip() if v is not None else "" for v in values]
    blank = [row for row, name in enumerate(names, start=2) if not name]
    if blank:
        raise DatasetError(f"{path.name}: column {column!r} is empty in {len(blank)} row(s), first rows {blank[:5]}")
    return names


def image_folder(root: Path, images: str | None, candidates: tuple[str, ...]) -> Path:
    """The folder image names are relative to: `images` if given, else the first candidate
    sub-folder of `root` that exists (a release unpacks to one of them), else the first one."""
    if images is not None:
        return (root / images).resolve()
    for name in candidates:
        if (root / name).is_dir():
            return (root / name).resolve()
    return (root / candidates[0]).resolve()
