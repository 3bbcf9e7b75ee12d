"""Bad input: one clear DatasetError, and nothing half-written (an earlier manifest survives)."""

import numpy as np
import pytest

from iqa.data.custom_csv import parse_score_range
from iqa.cache.manifest import manifest_path
from iqa.data.prepare import dataset_summary, prepare_dataset
from iqa.data.readers import DatasetError
from helpers import (
    SPAQ_LABELS,
    clive_release,
    iqa,
    kadid_release,
    kadid_rows,
    spaq_release,
    spaq_rows,
    touch_images,
    write_clive,
    write_csv,
    write_xlsx,
)


def prepare_fails(name, root, cache, match, **options):
    with pytest.raises(DatasetError, match=match) as error:
        prepare_dataset(name, root, cache, **options)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_missing_label_file(tmp_path):
    (tmp_path / "kadid").mkdir()
    prepare_fails("kadid10k", tmp_path / "kadid", tmp_path / "cache", r"label file not found: .*dmos\.csv")
    prepare_fails("koniq10k", tmp_path / "kadid", tmp_path / "cache", r"neither koniq10k_scores_and_distributions\.csv")
    prepare_fails("clive", tmp_path / "kadid", tmp_path / "cache", r"AllImages_release\.mat")


def test_missing_column(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "mos", "var"], [["a.png", "r.png", 3.0, 0.1]])
    message = prepare_fails("kadid10k", tmp_path, tmp_path / "cache", r"dmos\.csv: missing column\(s\) \['dmos'\]")
    assert "'mos'" in message  # names the columns the file does have
    write_xlsx(tmp_path / SPAQ_LABELS, ["Image", "MOS"], [["1.jpg", 50.0]])
    prepare_fails("spaq", tmp_path, tmp_path / "cache", r"missing column\(s\) \['Image name', 'Brightness'")


def test_unreadable_spreadsheet(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / SPAQ_LABELS).write_bytes(b"this is not a zip archive")
    prepare_fails("spaq", tmp_path, tmp_path / "cache", r"MOS and Image attribute scores\.xlsx: unreadable spreadsheet")


def test_unreadable_or_inconsistent_mat_files(tmp_path):
    write_clive(tmp_path, [f"t{i}.bmp" for i in range(1, 8)] + ["1.bmp", "2.bmp"], [50.0] * 8)
    prepare_fails("clive", tmp_path, tmp_path / "cache", r"lists 9 images but AllMOS_release\.mat has 8 scores")
    (tmp_path / "Data" / "AllMOS_release.mat").write_bytes(b"garbage")
    prepare_fails("clive", tmp_path, tmp_path / "cache", r"AllMOS_release\.mat: unreadable MATLAB file")


def test_nan_and_non_numeric_scores(tmp_path):
    rows = kadid_rows()
    rows[3][2] = ""
    rows[8][2] = "nan"
    kadid_release(tmp_path, rows)
    message = prepare_fails("kadid10k", tmp_path, tmp_path / "cache", r"2 score\(s\) are NaN or empty")
    assert repr(rows[3][0]) in message and repr(rows[8][0]) in message
    rows[3][2] = "high"
    kadid_release(tmp_path, rows)
    prepare_fails("kadid10k", tmp_path, tmp_path / "cache", r"column 'dmos' row 5 is not a number: 'high'")


def test_out_of_range_scores(tmp_path):
    rows = spaq_rows()
    rows[2][1] = 130.0
    rows[5][1] = -1.0
    spaq_release(tmp_path, rows)
    message = prepare_fails("spaq", tmp_path, tmp_path / "cache", r"2 score\(s\) outside the scale \[MOS 0-100")
    assert "00003.jpg=130" in message and "00006.jpg=-1" in message


def test_duplicate_names(tmp_path):
    rows = kadid_rows()
    rows[4][0] = rows[1][0]
    kadid_release(tmp_path, rows)
    prepare_fails("kadid10k", tmp_path, tmp_path / "cache", rf"1 image name\(s\) listed more than once: '{rows[1][0]}'")


def test_missing_images_are_counted_and_the_first_few_named(tmp_path):
    names, _ = clive_release(tmp_path, n_test=20)
    for name in names[4:12]:
        (tmp_path / "Images" / name).unlink()
    message = prepare_fails("clive", tmp_path, tmp_path / "cache", r"8 of 20 listed images are missing under .*Images")
    assert ", ".join(repr(n) for n in names[4:9]) + " (+3 more)" in message


def test_count_differs_from_the_release_is_a_warning_naming_the_difference(tmp_path):
    kadid_release(tmp_path)
    manifest, path, warnings = prepare_dataset("kadid10k", tmp_path, tmp_path / "cache")
    assert path.exists() and warnings == ["kadid10k: 30 images, the release has 10,125 (10,095 fewer)"]


def test_a_failed_prepare_leaves_the_earlier_manifest_byte_identical(tmp_path):
    cache = tmp_path / "cache"
    rows = spaq_release(tmp_path)
    _, path, _ = prepare_dataset("spaq", tmp_path, cache)
    before = path.read_bytes()
    rows[0][1] = float("nan")
    spaq_release(tmp_path, rows)  # the label file changed, and now holds a NaN
    prepare_fails("spaq", tmp_path, cache, "NaN")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json"]  # no temporary left behind


def test_unknown_dataset_option_and_root(tmp_path):
    prepare_fails("imagenet", tmp_path, tmp_path / "cache", r"unknown dataset 'imagenet'; known: koniq10k, clive")
    prepare_fails("spaq", tmp_path, tmp_path / "cache", r"spaq does not take lower_better; it takes images",
                  lower_better=True)
    prepare_fails("spaq", tmp_path / "nowhere", tmp_path / "cache", r"dataset root is not a folder")
    assert not manifest_path(tmp_path / "cache", "spaq").exists()


def test_custom_csv_needs_its_options_and_a_valid_range(tmp_path):
    prepare_fails("csv", tmp_path, tmp_path / "cache", r"needs --labels --image-col --score-col --score-range")
    for text, match in [("0-100", "two numbers"), ("5,1", "LO < HI"), ("a,b", "two numbers")]:
        with pytest.raises(DatasetError, match=match):
            parse_score_range(text)
    assert parse_score_range("1,5") == (1.0, 5.0)


def test_group_split_needs_groups(tmp_path):
    spaq_release(tmp_path)
    manifest, _, _ = prepare_dataset("spaq", tmp_path, tmp_path / "cache")
    with pytest.raises(DatasetError, match="spaq has no content groups; use split_by random"):
        dataset_summary(manifest, [8], "group")
    assert np.isfinite(dataset_summary(manifest, [8])["target_max"])


# prepare refuses rows that escape the root, aliases of one file, and unsafe names
@pytest.mark.parametrize("names, name, needle", [
    (["a.png", "../../../../etc/passwd"], "mine", "lead outside the image folder"),
    (["a.png", "/etc/hostname"], "mine", "lead outside the image folder"),
    (["img/a.png", "./img/a.png"], "mine", "two spellings of one file"),
    (["a.png", "b.png"], "../../evil", "not a plain folder name"),
])
def test_prepare_refuses_unsafe_rows_and_names(tmp_path, names, name, needle):
    root = tmp_path / "set" / "inner"
    touch_images(root, [n for n in names if not n.startswith(("/", ".."))])
    write_csv(root / "labels.csv", ["file", "mos"], [[n, 5] for n in names])
    cache = tmp_path / "cache"
    result = iqa("data", "prepare", "csv", "--root", root, "--cache", cache, "--labels", "labels.csv", "--image-col",
                 "file", "--score-col", "mos", "--score-range", "0,10", "--name", name)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not list(tmp_path.rglob("manifest.json")), "nothing written, inside the cache or out"
