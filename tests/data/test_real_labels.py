"""The adapters on the real released label files (../shared/labels), with placeholder images.

Expected values are read straight from the files with the csv module / openpyxl, independently
of the adapters, and compared row by row.
"""

import csv

import numpy as np
import openpyxl
import pytest

from iqa.cache.manifest import file_sha256, read_manifest
from iqa.data.adapters import ADAPTERS
from iqa.data.prepare import dataset_summary, prepare_dataset
from iqa.data.readers import DatasetError
from iqa.data.splits import official_split
from helpers import SHARED_LABELS, needs_shared_labels, real_release, touch_images, write_csv

pytestmark = needs_shared_labels


def csv_rows(name: str) -> list[dict]:
    with open(SHARED_LABELS / name, newline="") as f:
        return list(csv.DictReader(f))


def prepared(tmp_path, dataset: str, shared_name: str, release_name: str, images: str, name_column: str):
    """The real label file as released, a placeholder for each image it lists under `images`, prepared:
    (its rows, the root, and what prepare_dataset returns: manifest, path, warnings)."""
    root = real_release(tmp_path / dataset, shared_name, release_name)
    rows = csv_rows(shared_name)
    touch_images(root / images, [r[name_column] for r in rows])
    return rows, root, *prepare_dataset(dataset, root, tmp_path / "cache")


def test_koniq10k_sets_variant_is_read_on_its_0_100_scale(tmp_path):
    rows, root, manifest, path, warnings = prepared(tmp_path, "koniq10k", "koniq10k_distributions_sets.csv",
                                                   "koniq10k_distributions_sets.csv", "1024x768", "image_name")
    assert warnings == [] and len(manifest) == 10_073
    assert manifest.paths == [r["image_name"] for r in rows]
    np.testing.assert_allclose(manifest.targets, [float(r["MOS"]) / 100 for r in rows])
    assert "0-100" in manifest.score_scale and "koniq10k_distributions_sets.csv" in manifest.score_scale
    assert manifest.extras["set"] == [r["set"] for r in rows]
    assert manifest.image_root == str((root / "1024x768").resolve())
    labels_sha256 = file_sha256(SHARED_LABELS / "koniq10k_distributions_sets.csv")
    assert manifest.sources == {"koniq10k_distributions_sets.csv": labels_sha256}
    # What was written is what is read back.
    again = read_manifest(tmp_path / "cache", "koniq10k")
    assert again.paths == manifest.paths and np.array_equal(again.targets, manifest.targets)
    assert path == tmp_path / "cache" / "koniq10k" / "manifest.json"
    # the published split: KonIQ-10k's paper gives 7,058 training, 1,000 validation and 2,015 test images
    published = official_split(again.extras["set"])
    assert {name: len(rows) for name, rows in published.items()} == {"training": 7058, "validation": 1000, "test": 2015}
    assert [again.paths[i] for i in published["validation"]] == [r["image_name"] for r in rows if r["set"] == "validation"]
    summary = dataset_summary(again, [8, 19], "official")
    assert summary["splits"] == {"8": {"train": 7058, "test": 2015}, "19": {"train": 7058, "test": 2015}}



def main_release_from(rows: list[dict], order: np.ndarray) -> list[list]:
    """Rows in the main release file's layout (MOS 1-5, MOS_zscore 0-100), in another order than the sets file."""
    return [[rows[i]["image_name"], 1 + 4 * float(rows[i]["MOS"]) / 100, rows[i]["SD"], rows[i]["MOS"]] for i in order]


def test_koniq10k_official_split_with_the_main_file_reads_the_sets_file_beside_it(tmp_path):
    rows = csv_rows("koniq10k_distributions_sets.csv")
    order = np.random.default_rng(0).permutation(len(rows))  # matched by name, not by row
    header = ["image_name", "MOS", "SD", "MOS_zscore"]
    both = real_release(tmp_path / "both", "koniq10k_distributions_sets.csv", "koniq10k_distributions_sets.csv")
    write_csv(both / "koniq10k_scores_and_distributions.csv", header, main_release_from(rows, order))
    touch_images(both / "1024x768", [r["image_name"] for r in rows])
    manifest, _, _ = prepare_dataset("koniq10k", both, tmp_path / "cache")
    assert "MOS 1-5" in manifest.score_scale  # the paper's targets, from the main file
    assert manifest.paths == [rows[i]["image_name"] for i in order]
    assert manifest.extras["set"] == [rows[i]["set"] for i in order]
    assert set(manifest.sources) == {"koniq10k_scores_and_distributions.csv", "koniq10k_distributions_sets.csv"}
    published = official_split(read_manifest(tmp_path / "cache", "koniq10k").extras["set"])
    assert {name: len(rows) for name, rows in published.items()} == {"training": 7058, "validation": 1000, "test": 2015}

    main_only = tmp_path / "main"  # the main file alone has no split: the error names the file to add
    write_csv(main_only / "koniq10k_scores_and_distributions.csv", header, main_release_from(rows, order))
    touch_images(main_only / "1024x768", [r["image_name"] for r in rows])
    alone, _, _ = prepare_dataset("koniq10k", main_only, tmp_path / "cache2")
    assert "set" not in alone.extras
    with pytest.raises(ValueError, match="add koniq10k_distributions_sets.csv"):
        dataset_summary(alone, [8], "official")

    short = real_release(tmp_path / "short", "koniq10k_distributions_sets.csv", "koniq10k_distributions_sets.csv")
    write_csv(short / "koniq10k_scores_and_distributions.csv", header, main_release_from(rows, order) + [["extra.jpg", 3, 0.5, 50]])
    with pytest.raises(DatasetError, match="no set for 1 images.*extra.jpg"):
        prepare_dataset("koniq10k", short, tmp_path / "cache3")


def test_agiqa3k_targets_quality_and_keeps_alignment(tmp_path):
    rows, root, manifest, _, warnings = prepared(tmp_path, "agiqa3k", "agiqa3k_data.csv", "data.csv", "file", "name")
    assert warnings == [] and len(manifest) == 2_982
    np.testing.assert_allclose(manifest.targets, [float(r["mos_quality"]) / 5 for r in rows])
    np.testing.assert_allclose(manifest.extras["mos_align"], [float(r["mos_align"]) for r in rows])
    np.testing.assert_allclose(manifest.extras["std_align"], [float(r["std_align"]) for r in rows])
    assert manifest.extras["prompt"] == [r["prompt"] for r in rows]
    assert manifest.image_root.endswith("file")
    aligned, _, warnings = prepare_dataset("agiqa3k-align", root, tmp_path / "cache")
    assert warnings == [] and aligned.paths == manifest.paths and aligned.dataset == "agiqa3k-align"
    np.testing.assert_allclose(aligned.targets, [float(r["mos_align"]) / 5 for r in rows])
    np.testing.assert_allclose(aligned.extras["mos_quality"], [float(r["mos_quality"]) for r in rows])


def test_flive_all_rows_parse_with_their_sub_folders(tmp_path):
    root = real_release(tmp_path / "flive", "flive_labels_image.csv", "labels_image.csv")
    rows = csv_rows("flive_labels_image.csv")
    manifest = ADAPTERS["flive"].load(root)  # the parser alone: 39,810 placeholder files would dominate the suite
    assert len(manifest) == 39_810 == ADAPTERS["flive"].release_count
    assert manifest.paths == [r["name"] for r in rows]
    assert {p.split("/")[0] for p in manifest.paths} == {"voc_emotic_ava", "blur_dataset", "EE371R"}
    np.testing.assert_allclose(manifest.targets, [float(r["mos"]) / 100 for r in rows])
    assert manifest.image_root == str(root.resolve())  # names carry their folder; no database/ here


def test_flive_prepare_on_the_released_format_reports_missing_images(tmp_path):
    # The real file's first rows, byte for byte (CRLF line ends included), as a smaller release.
    lines = (SHARED_LABELS / "flive_labels_image.csv").read_bytes().splitlines(keepends=True)[:2_001]
    root = tmp_path / "flive"
    (root / "database").mkdir(parents=True)
    (root / "labels_image.csv").write_bytes(b"".join(lines))
    names = [line.decode().split(",")[0] for line in lines[1:]]
    touch_images(root / "database", names)
    manifest, path, warnings = prepare_dataset("flive", root, tmp_path / "cache")
    assert manifest.paths == names and manifest.image_root.endswith("database")
    assert warnings == ["flive: 2,000 images, the release has 39,810 (37,810 fewer)"]

    before = path.read_bytes()
    for name in names[-3:]:
        (root / "database" / name).unlink()
    with pytest.raises(ValueError, match=r"3 of 2000 listed images are missing") as error:
        prepare_dataset("flive", root, tmp_path / "cache")
    assert ", ".join(repr(n) for n in names[-3:]) in str(error.value)
    assert path.read_bytes() == before


def test_agiqa1k_keeps_the_first_of_its_duplicated_row_and_warns(tmp_path):
    root = real_release(tmp_path / "agiqa1k", "agiqa1k_AIGC_MOS_Zscore.xlsx", "AIGC_MOS_Zscore.xlsx")
    workbook = openpyxl.load_workbook(SHARED_LABELS / "agiqa1k_AIGC_MOS_Zscore.xlsx", read_only=True)
    rows = list(workbook.worksheets[0].iter_rows(values_only=True))[1:]
    workbook.close()
    assert len(rows) == 1_080
    touch_images(root / "file", [r[0] for r in rows])
    manifest, _, warnings = prepare_dataset("agiqa1k", root, tmp_path / "cache")
    # The release lists dreamStudio_8_9_1_1.jpg twice: the first row stays, the count warns.
    first = {}
    for name, prompt, mos in rows:
        first.setdefault(name, (prompt, mos))
    assert len(manifest) == len(first) == 1_079
    assert manifest.paths == list(first)
    np.testing.assert_allclose(manifest.targets, [mos / 5 for _, mos in first.values()])
    assert manifest.extras["Prompt"] == [prompt for prompt, _ in first.values()]
    assert len(warnings) == 2
    assert "dreamStudio_8_9_1_1.jpg" in warnings[0] and "kept the first" in warnings[0]
    assert "1,079 images, the release has 1,080 (1 fewer)" in warnings[1]
