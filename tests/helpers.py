"""Release files for the dataset tests: the real label files, and small ones in released formats.

Imported by the other test_data_* files (pytest puts tests/ on sys.path); holds no tests.
"""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import scipy.io


def _shared_labels() -> Path | None:
    # CI clones the repository with shared/ beside it; a worktree may sit elsewhere under /work.
    for candidate in (Path(__file__).resolve().parents[1] / ".." / "shared" / "labels", Path("/work/shared/labels")):
        if candidate.is_dir():
            return candidate.resolve()
    return None


SHARED_LABELS = _shared_labels()
needs_shared_labels = pytest.mark.skipif(
    SHARED_LABELS is None, reason="the real label files (../shared/labels beside the repository) are not here"
)


def real_release(root: Path, shared_name: str, release_name: str) -> Path:
    """A dataset root holding one real label file under the name the release gives it."""
    (root / release_name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED_LABELS / shared_name, root / release_name)
    return root


def touch_images(folder: Path, names: list[str]) -> None:
    """Empty placeholder files: prepare only checks that each listed image exists."""
    paths = [folder / name for name in names]
    for parent in {path.parent for path in paths}:
        parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_xlsx(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    workbook.save(path)
    return path


def write_clive(root: Path, names: list[str], mos: list[float]) -> Path:
    """CLIVE's Data/*.mat as released: AllImages_release an N x 1 cell array of names,
    AllMOS_release a 1 x N double row vector."""
    (root / "Data").mkdir(parents=True, exist_ok=True)
    cells = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = name
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cells})
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos], dtype=np.float64)})
    return root


CLIVE_TRAINING = [f"t{i}.bmp" for i in range(1, 8)]


def clive_release(root: Path, n_test: int = 20) -> tuple[list[str], np.ndarray]:
    """A small CLIVE release: the 7 training images first, then n_test rated images."""
    names = CLIVE_TRAINING + [f"{i + 3}.bmp" for i in range(n_test)]
    mos = np.linspace(3.0, 92.0, len(names))
    write_clive(root, names, list(mos))
    touch_images(root / "Images", names[7:])
    touch_images(root / "Images" / "trainingImages", names[:7])
    return names[7:], mos[7:]


KADID_HEADER = ["dist_img", "ref_img", "dmos", "var"]


def kadid_rows(n_refs: int = 6, n_dist: int = 5) -> list[list]:
    """dmos.csv rows: n_dist distorted images per reference, dmos spread over 1-5."""
    rows = []
    for r in range(1, n_refs + 1):
        for d in range(1, n_dist + 1):
            dmos = 1.0 + 4.0 * ((r * n_dist + d) % 17) / 16
            rows.append([f"I{r:02d}_{d:02d}_01.png", f"I{r:02d}.png", dmos, 0.1 * d])
    return rows


def kadid_release(root: Path, rows: list[list] | None = None) -> list[list]:
    rows = kadid_rows() if rows is None else rows
    write_csv(root / "dmos.csv", KADID_HEADER, rows)
    touch_images(root / "images", [row[0] for row in rows])
    return rows


SPAQ_HEADER = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
SPAQ_LABELS = "Annotations/MOS and Image attribute scores.xlsx"


def spaq_rows(n: int = 12) -> list[list]:
    return [[f"{i:05d}.jpg", 100.0 * i / n, 40.0 + i, 50.0 + i, 30.0 + i, 20.0 + i, 60.0 + i] for i in range(1, n + 1)]


def spaq_release(root: Path, rows: list[list] | None = None) -> list[list]:
    rows = spaq_rows() if rows is None else rows
    write_xlsx(root / SPAQ_LABELS, SPAQ_HEADER, rows)
    touch_images(root / "TestImage", [row[0] for row in rows])
    return rows
