"""The adapters on small files built in the released formats of CLIVE, KADID-10k, SPAQ, KonIQ."""

import numpy as np

from iqa.data.prepare import dataset_summary, prepare_dataset
from iqa.data.splits import split_indices
from helpers import (
    CLIVE_TRAINING,
    clive_release,
    kadid_release,
    spaq_release,
    touch_images,
    write_csv,
)


def test_clive_drops_the_seven_training_images(tmp_path):
    names, mos = clive_release(tmp_path / "clive", n_test=20)
    manifest, _, warnings = prepare_dataset("clive", tmp_path / "clive", tmp_path / "cache")
    assert manifest.paths == names and not set(CLIVE_TRAINING) & set(manifest.paths)
    np.testing.assert_allclose(manifest.scores, mos)
    np.testing.assert_allclose(manifest.targets, mos / 100)
    assert manifest.image_root.endswith("Images")
    assert set(manifest.sources) == {"Data/AllImages_release.mat", "Data/AllMOS_release.mat"}
    assert warnings == ["clive: 20 images, the release has 1,162 (1,142 fewer)"]


def test_clive_full_size_release_gives_1162_rows_without_warning(tmp_path):
    names, _ = clive_release(tmp_path / "clive", n_test=1_162)
    manifest, _, warnings = prepare_dataset("clive", tmp_path / "clive", tmp_path / "cache")
    assert len(manifest) == 1_162 and manifest.paths[0] == names[0] and warnings == []


def test_kadid10k_targets_groups_and_group_split(tmp_path):
    rows = kadid_release(tmp_path / "kadid")
    manifest, _, _ = prepare_dataset("kadid10k", tmp_path / "kadid", tmp_path / "cache")
    assert manifest.paths == [r[0] for r in rows]
    np.testing.assert_allclose(manifest.targets, [(r[2] - 1) / 4 for r in rows])
    assert manifest.groups == [r[1] for r in rows]
    np.testing.assert_allclose(manifest.extras["var"], [r[3] for r in rows])
    assert "(y-1)/4" in manifest.score_scale
    summary = dataset_summary(manifest, [8, 19, 25], "group")
    assert summary["groups"] == 6
    for seed in (8, 19, 25):
        train, test = split_indices(manifest.paths, seed, by="group", groups=manifest.groups)
        assert not {manifest.groups[i] for i in train} & {manifest.groups[i] for i in test}
        assert summary["splits"][str(seed)] == {"train": len(train), "test": len(test)}


def test_spaq_reads_the_xlsx_and_keeps_attributes(tmp_path):
    rows = spaq_release(tmp_path / "spaq")
    manifest, _, warnings = prepare_dataset("spaq", tmp_path / "spaq", tmp_path / "cache")
    assert manifest.paths == [r[0] for r in rows]
    np.testing.assert_allclose(manifest.targets, [r[1] / 100 for r in rows])
    np.testing.assert_allclose(manifest.extras["Sharpness"], [r[6] for r in rows])
    assert sorted(manifest.extras) == ["Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    assert manifest.image_root.endswith("TestImage")
    assert warnings == ["spaq: 12 images, the release has 11,125 (11,113 fewer)"]


def test_koniq10k_prefers_the_main_1_5_file_and_finds_512x384(tmp_path):
    root = tmp_path / "koniq"
    names = [f"{1000 + i}.jpg" for i in range(10)]
    mos = [1.0 + 0.4 * i for i in range(10)]
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    write_csv(root / "koniq10k_scores_and_distributions.csv", header,
              [[n, 0, 0, 0, 0, 0, 100, m, 0.5, 20 * m] for n, m in zip(names, mos)])
    write_csv(root / "koniq10k_distributions_sets.csv", ["image_name", "MOS", "SD", "set"],
              [[n, 99.0, 0.5, "test"] for n in names])
    touch_images(root / "512x384", names)
    manifest, _, _ = prepare_dataset("koniq10k", root, tmp_path / "cache")
    np.testing.assert_allclose(manifest.targets, np.array(mos) / 5)
    np.testing.assert_allclose(manifest.extras["MOS_zscore"], [20 * m for m in mos])
    assert manifest.score_scale.startswith("MOS 1-5 (koniq10k_scores_and_distributions.csv)")
    # the sets file beside it gives only its `set` column (for --split-by official), joined by image name
    assert list(manifest.sources) == ["koniq10k_scores_and_distributions.csv", "koniq10k_distributions_sets.csv"]
    assert manifest.extras["set"] == ["test"] * 10
    assert manifest.image_root.endswith("512x384")
