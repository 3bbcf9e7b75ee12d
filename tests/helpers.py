"""What several test files share: small datasets and release files, a CLI runner, results rows, fake caches.

Every test file imports them as `from helpers import ...` (tests/conftest.py puts tests/ on sys.path);
this module holds no tests. Torch, the extractor and the fine-tuning loop are imported inside the
helpers that use them, so the data tests do not pay for them.
"""

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import numpy as np
import openpyxl
import pytest
import scipy.io
from PIL import Image
from typer.testing import CliRunner

from iqa.cache.manifest import Manifest, write_manifest
from iqa.cli import app


# ---- the dataset tests: the real label files, and small ones in released formats ----
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


# ---- the command line ----
runner = CliRunner()


def iqa(*args):
    """`iqa ARGS` through the real command (arguments made text), its result kept for the test to read."""
    return runner.invoke(app, [str(a) for a in args])


# ---- images and stores ----
QUIET = dict(progress=False)


def make_dataset(cache: Path, n: int = 12, extra: dict | None = None) -> list[str]:
    """n random RGB images of varied sizes, plus `extra` {name: writer(path)} files, as dataset "toy"."""
    root = cache / "images"
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (20 + 3 * i, 40 - i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"im{i:02d}.png")
        paths.append(f"im{i:02d}.png")
    for name, write in (extra or {}).items():
        write(root / name)
        paths.append(name)
    write_manifest(Manifest("toy", str(root), paths, np.arange(len(paths)), np.zeros(len(paths)), "test"), cache)
    return paths


def by_hand(spec, backbone, root: Path, paths: list[str]) -> np.ndarray:
    """Each image alone: PIL decode, the checkpoint's resize filter, numpy normalisation, the model, the pooling rule."""
    import torch

    rows = []
    for path in paths:
        image = Image.open(root / path).convert("RGB").resize((spec.resolution,) * 2, Image.Resampling[spec.resample.upper()])
        x = (np.asarray(image, np.float32) / 255 - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
        with torch.no_grad():
            rows.append(backbone(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])[0].numpy())
    return np.stack(rows)


def toy_dataset(cache, n=40):
    """`make_dataset` with targets spread over 0.1-0.9, so heads have something to learn."""
    paths = make_dataset(cache, n=n)
    targets = np.linspace(0.1, 0.9, n)
    write_manifest(Manifest("toy", str(cache / "images"), paths, targets, targets, "test"), cache)
    return paths


def extract(cache, shard=(0, 1)):
    """The tiny dinov2 over dataset "toy" in chunks of 8 rows: the store `toy/dinov2@tiny.zarr`."""
    from iqa.extract.run import ExtractRequest, extract_dataset

    request = ExtractRequest(cache, "toy", "dinov2", weights="tiny", dtype="float32", chunk_rows=8, batch_size=8,
                             shard=shard, progress=False)
    return extract_dataset(request, num_workers=0)


def head(cache, *extra):
    """`iqa head` on the tiny dinov2 store of "toy": one seed, two epochs, JSON lines out."""
    return iqa("head", "--cached", "--backbone", "dinov2", "--tag", "tiny", "--dataset", "toy", "--seeds", "8",
               "--epochs", "2", "--device", "cpu", "--json", "--cache", cache, *extra)


# ---- fine-tuning ----
def bright_dataset(cache: Path, n: int = 15) -> np.ndarray:
    """Dataset "bright": noisy grey 32-px images whose mean brightness is their score (a learnable task)."""
    root = cache / "images"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    targets = rng.uniform(0.1, 0.9, n)
    for i, b in enumerate(targets):
        pixels = np.clip(b * 255 + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"im{i:02d}.png")
    paths = [f"im{i:02d}.png" for i in range(n)]
    write_manifest(Manifest("bright", str(root), paths, targets, targets, "brightness"), cache)
    return targets


RUNTIME = {"device", "dtype", "source", "run_dir", "db", "num_workers", "progress", "on_epoch"}


def run(cache: Path, backbone: str = "dinov2", **options):
    """A fine-tuning run on "bright" (tiny model, one epoch unless asked); `options` go to the config or the run."""
    from iqa.heads.finetune.loop import finetune, finetune_config

    # float32 unless a test asks: `auto` means bf16 on some CPUs, and tests must mean the same everywhere
    options = {"weights": "tiny", "epochs": 1, "num_workers": 0, "progress": False, "dtype": "float32", **options}
    config = finetune_config("bright", backbone, **{k: v for k, v in options.items() if k not in RUNTIME})
    return finetune(cache, config, **{k: v for k, v in options.items() if k in RUNTIME})


class Killed(Exception):
    pass


def straight_and_resumed(cache: Path, backbone: str, **options):
    """A two-epoch run in <cache>/straight, and the same run killed after epoch 1 in <cache>/resumed
    and run again to the end."""
    from iqa.extract.checkpoint import load_checkpoint

    straight = run(cache, backbone, run_dir=cache / "straight", **options)

    def kill_after_first(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run(cache, backbone, run_dir=cache / "resumed", on_epoch=kill_after_first, **options)
    assert load_checkpoint(cache / "resumed")["epoch"] == 1
    return straight, run(cache, backbone, run_dir=cache / "resumed", **options)


# ---- results and fake caches ----
def db_row(config: dict, fingerprint_id: str, result) -> tuple:
    """A (key, config, fingerprint_id, result) row for ResultsDB.record, keyed by the config itself."""
    key = hashlib.sha256(json.dumps([config, fingerprint_id], sort_keys=True).encode()).hexdigest()
    return key, config, fingerprint_id, result


def record(dataset, head, seed, srcc, status="done", test=None, regime="frozen", k=100.0):
    """A results row of a siglip2 run of `head` (a HEADS name or "act1+act2") on `dataset`, recorded as given."""
    from iqa.heads.models.mlp import HEADS

    act1, act2 = HEADS[head] if head in HEADS else head.split("+")
    config = dict(train_dataset=dataset, test_dataset=test or dataset, backbone="siglip2", head=head, act1=act1,
                  act2=act2, mask_k=k, dropout=None, keep=1.0, seed=seed, regime=regime)
    result = SimpleNamespace(status=status, best_epoch=2, best_srcc=srcc, best_plcc=srcc - 0.05, last_srcc=srcc,
                             last_plcc=srcc, diverged_epoch=None, curves={}, gates=None)
    return db_row(config, "fp", result)


def fake_cache(name, n=120, d=16, fingerprint="fp1"):
    """A cache stand-in of `n` float16 embeddings whose targets a head can learn; image 5 failed."""
    rng = np.random.default_rng(len(name))
    x = rng.normal(size=(n, d)).astype(np.float16)
    y = 1 / (1 + np.exp(-x.astype(float) @ rng.normal(size=d) / 3))
    manifest = Manifest(name, "/img", [f"{i}.png" for i in range(n)], y, y, "synthetic")
    valid = np.ones(n, dtype=bool)
    valid[5] = False  # one image failed: it must never be trained or tested on
    return SimpleNamespace(embeddings=x, valid=valid, manifest=manifest, fingerprint_id=fingerprint)


def small_grid(**kw):
    """Two heads and an activation pair, two seeds, two mask sizes on clive: 16 runs of two epochs."""
    from iqa.heads.training.grid import expand_grid, head_choices

    heads = head_choices(["baseline", "sig"], [("sigmoid", "gelu")])
    return expand_grid([("clive", "clive")], "siglip2", heads, [8, 19], mask_ks=[100, 50], epochs=2, **kw)


# ---- the reliability tests: one-line refusals, a tiny NSS cache, one trained run, its model folder ----
def one_error_line(result, *words):
    """A refusal: non-zero exit, no exception but the exit, and exactly one `error:` line, the last, holding `words`."""
    assert result.exit_code != 0 and isinstance(result.exception, (SystemExit, type(None))), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert all(word in errors[0] for word in words), errors[0]


def nss_cache(cache, n=16):
    """The toy dataset, its NSS store written in chunks of 4 rows, one 1-epoch baseline run; the run."""
    from functools import partial

    from iqa.cache.load import load_cached
    from iqa.cache.results import ResultsDB, default_db
    from iqa.extract.run import ExtractRequest, extract_dataset
    from iqa.heads.training.grid import expand_grid, head_choices, run_grid

    toy_dataset(cache, n=n)
    assert extract_dataset(ExtractRequest(cache, "toy", "nss", chunk_rows=4, progress=False), num_workers=0).ok
    configs = expand_grid([("toy", "toy")], "nss", head_choices(["baseline"], []), [8], epochs=1)
    (run,) = run_grid(configs, partial(load_cached, cache, backbone="nss"), ResultsDB(default_db(cache)), progress=False)
    return run


def nss_model(cache, out, n=16):
    from iqa.cache.results import default_db
    from iqa.heads.saved.export import export_run

    run = nss_cache(cache, n)
    return export_run(cache, default_db(cache), run, out), run


# ---- layers: a timm tower's blocks caught by hooks ----
def timm_blocks_by_hand(model, x):
    """Each block's output tokens [B, T, D] of a timm ViT, caught by forward hooks on a full forward pass."""
    import torch

    states = []
    hooks = [block.register_forward_hook(lambda _, __, out: states.append(out)) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return states


# ---- the report: stored runs of a masking grid ----
def masking_run(dataset, head, k, seed, srcc):
    """A finished run of a masking grid as the results database returns it (config and outcome)."""
    return dict(train_dataset=dataset, test_dataset=dataset, backbone="nss", head=head, act1="relu", act2="relu",
                mask_k=k, dropout=None, keep=1.0, seed=seed, regime="frozen", epochs=15, standardize=True,
                status="done", best_srcc=srcc, key=f"{dataset}{head}{k}{seed}")


# ---- the report as a browser shows it: headless Chromium (Debian's chromium-headless-shell, which .ci/run
# installs) loads a page and says which images failed; local links are checked on disk; a screenshot is kept
# under <repo>/.screenshots/. Tests that need the browser skip only where none is installed. ----
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parent.parent / ".screenshots"

PROBE = """<html><body><iframe id="page" src="{page}" width="1400" height="900"></iframe><script>
document.getElementById("page").onload = function () {{
  var broken = [], images = this.contentDocument.images;
  for (var img of images) if (!img.complete || img.naturalWidth === 0) broken.push(img.getAttribute("src"));
  document.title = JSON.stringify({{images: images.length, broken: broken}});
}};
</script></body></html>"""


def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("no headless Chromium here (apt-get install chromium-headless-shell)")
    return found


def _run(args: list[str]) -> str:
    return subprocess.run([browser(), "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", *args],
                          capture_output=True, text=True, timeout=120).stdout


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("href", "src"):
            if attrs.get(name):
                self.links.append(attrs[name])


def missing_links(page: Path) -> list[str]:
    """Local href/src targets of the page that are not on disk."""
    parser = _Links()
    parser.feed(page.read_text())
    local = [link for link in parser.links if not urlparse(link).scheme and not link.startswith("#")]
    return [link for link in local if not (page.parent / unquote(link.split("#")[0])).exists()]


def loaded_images(page: Path) -> dict:
    """{"images": how many the page shows, "broken": the src of each one the browser could not load}."""
    with tempfile.TemporaryDirectory(dir=page.parent) as probe_dir:  # beside the page: same file origin
        probe = Path(probe_dir) / "probe.html"
        probe.write_text(PROBE.format(page=f"../{page.name}"))
        dom = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()])
    title = re.search(r"<title>(.*)</title>", dom, re.S)
    assert title, f"the browser did not load {page}"
    return json.loads(title.group(1).replace("&quot;", '"'))


def screenshot(page: Path, name: str, height: int = 2400) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / f"{name}.png"
    _run([f"--screenshot={shot}", f"--window-size=1400,{height}", "--hide-scrollbars", page.as_uri()])
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page}"
    return shot


def check_page(page: Path, name: str) -> dict:
    """The page's links resolve, every image loads in the browser; a screenshot is kept. Returns the counts."""
    assert missing_links(page) == [], f"{page.name} links to files that are not there"
    loaded = loaded_images(page)
    assert loaded["broken"] == [], f"{page.name}: images the browser could not load: {loaded['broken']}"
    screenshot(page, name)
    return loaded
