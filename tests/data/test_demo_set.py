import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from skimage.metrics import structural_similarity
from typer.testing import CliRunner

from iqa.cli import app
from iqa.data import demo
from iqa.data.demo import COLUMNS, COLOUR_ONLY, DISTORTIONS, LABELS_FILE, PHOTOS, colour_ssim, load_photo, make_demo
from iqa.data.splits import PAPER_SEEDS, split_indices

GREY_PHOTOS = {"camera", "moon", "coins", "grass", "gravel", "brick", "cell"}


def distortions_of(photo):
    return [d for d in DISTORTIONS if photo not in GREY_PHOTOS or d not in COLOUR_ONLY]


def read_rows(labels: Path) -> list[dict]:
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


@pytest.fixture
def full_set(demo_labels) -> Path:
    """The real default build (all photos, distortions and levels), made once per session."""
    return demo_labels


def test_full_set_layout_and_groups(full_set):
    rows = read_rows(full_set)
    assert len(rows) == 505 == sum(1 + 5 * len(distortions_of(p)) for p in PHOTOS)
    assert {r["ref"] for r in rows} == set(PHOTOS) and GREY_PHOTOS < set(PHOTOS)
    for r in rows:
        assert (full_set.parent / r["image"]).is_file()
        assert r["image"].startswith(f"images/{r['ref']}")
        assert 0 <= float(r["score"]) <= 1
    # Every photo is one content group with its pristine image and all its distorted versions;
    # grey photos are stored as RGB and skip saturation.
    for photo in PHOTOS:
        group = [r for r in rows if r["ref"] == photo]
        assert [(r["distortion"], r["level"]) for r in group if r["level"] == "0"] == [("pristine", "0")]
        assert {r["distortion"] for r in group} == {"pristine", *distortions_of(photo)}
        with Image.open(full_set.parent / group[0]["image"]) as pristine:
            assert pristine.mode == "RGB" and min(pristine.size) == 256
    # The content-held-out split tests on whole photos never seen in training.
    for seed in PAPER_SEEDS:
        train, test = split_indices([r["image"] for r in rows], seed, by="group", groups=[r["ref"] for r in rows])
        assert not {rows[i]["ref"] for i in train} & {rows[i]["ref"] for i in test}
        assert len({rows[i]["ref"] for i in test}) >= 2


def test_scores_fall_strictly_with_level_and_pristine_is_best(full_set):
    rows = read_rows(full_set)
    for photo in PHOTOS:
        group = [r for r in rows if r["ref"] == photo]
        pristine = [float(r["score"]) for r in group if r["distortion"] == "pristine"]
        assert pristine == [1.0]
        assert max(float(r["score"]) for r in group if r["distortion"] != "pristine") < 1.0
        for distortion in distortions_of(photo):
            levels = sorted((int(r["level"]), float(r["score"])) for r in group if r["distortion"] == distortion)
            assert [lv for lv, _ in levels] == [1, 2, 3, 4, 5]
            scores = [s for _, s in levels]
            assert all(a > b for a, b in zip(scores, scores[1:])), (photo, distortion, scores)


def test_score_is_weighted_ycbcr_ssim():
    photo, colour = load_photo("coffee", short_side=64)
    assert colour and load_photo("camera", short_side=64)[1] is False
    grey = photo.convert("L").convert("RGB")
    dark = ImageEnhance.Brightness(grey).enhance(0.6)
    # Grey images have flat chroma (SSIM 1), so the score is (6 * SSIM(Y) + 2) / 8 with Y = the grey level.
    y_ssim = structural_similarity(
        np.asarray(grey, dtype=np.float64)[..., 0],
        np.asarray(dark, dtype=np.float64)[..., 0],
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert colour_ssim(grey, dark) == pytest.approx((6 * y_ssim + 2) / 8)
    assert colour_ssim(photo, photo) == 1.0
    # Desaturating keeps the luminance but the score still drops: the chroma terms see it.
    assert colour_ssim(photo, ImageEnhance.Color(photo).enhance(0.0)) < 0.99


def small_build(out: Path) -> Path:
    return make_demo(out, photos=("chelsea", "coins"), distortions=("noise", "jpeg", "saturation"), short_side=48)


def test_two_builds_are_byte_identical(tmp_path):
    a, b = small_build(tmp_path / "a"), small_build(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    names = [r["image"] for r in read_rows(a)]
    assert len(names) == (1 + 3 * 5) + (1 + 2 * 5)  # the grey photo skips saturation
    for name in names:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    with Image.open(a.parent / names[0]) as first:
        assert min(first.size) == 48


def test_force_replaces_only_a_demo_set_and_an_existing_one_needs_it(tmp_path):
    out = tmp_path / "demo-src"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an iqa data set"):
        make_demo(out, photos=("chelsea",), distortions=("jpeg",), short_side=32, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder is fine
    dead = tmp_path / f".demo-src.tmp-999999999-{'a' * 32}"  # a killed build's temporary
    dead.mkdir()
    make_demo(out, photos=("chelsea",), distortions=("jpeg",), short_side=32)
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="force"):
        small_build(out)
    labels = make_demo(out, photos=("chelsea",), distortions=("jpeg",), short_side=32, force=True)
    assert not (out / "stale.txt").exists() and len(read_rows(labels)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-src"]  # no temporary folders left


def test_a_crashed_build_leaves_nothing(tmp_path, monkeypatch):
    saved = []

    def save_then_crash(image, path):
        if len(saved) == 3:
            raise RuntimeError("disk full")
        saved.append(path)

    monkeypatch.setattr(demo, "_save_png", save_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        small_build(tmp_path / "demo-src")
    assert list(tmp_path.iterdir()) == []


def test_unknown_photo_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        make_demo(tmp_path / "x", photos=("lena",))


def test_cli_builds_into_the_cache_and_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PHOTOS", {"chelsea": PHOTOS["chelsea"]})
    monkeypatch.setattr(demo, "SHORT_SIDE", 32)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "make-demo", "--cache", str(tmp_path)])
    assert result.exit_code == 0, result.output
    labels = tmp_path / "demo-src" / LABELS_FILE
    assert len(read_rows(labels)) == 1 + 5 * len(DISTORTIONS) and str(labels) in result.output
    again = runner.invoke(app, ["data", "make-demo", "--cache", str(tmp_path)])
    assert again.exit_code != 0 and "--force" in again.output
