import pytest

from iqa.cache.atomic import atomic_path, folder_state, remove_stale


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.json"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_folder_state_tells_iqa_outputs_from_what_the_user_made(tmp_path):
    assert folder_state(tmp_path / "absent", ".mark") == "new"
    (tmp_path / "empty").mkdir()
    assert folder_state(tmp_path / "empty", ".mark") == "new"
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / ".mark").write_text("")
    assert folder_state(tmp_path / "ours", ".mark") == "marked"
    assert folder_state(tmp_path / "ours", ".other-mark") == "foreign"  # another command's output is not this one's
    (tmp_path / "fake" / ".mark").mkdir(parents=True)  # a folder named like the mark is no mark
    assert folder_state(tmp_path / "fake", ".mark") == "foreign"
    (tmp_path / "notes.txt").write_text("mine")
    assert folder_state(tmp_path / "notes.txt", ".mark") == "file"
    (tmp_path / "link").symlink_to(tmp_path / "ours")  # swapping or writing through it touches the user's link
    assert folder_state(tmp_path / "link", ".mark") == "file"


def test_remove_stale_skips_names_without_a_pid(tmp_path):
    (tmp_path / ".x.tmp-notapid").mkdir()
    assert remove_stale(tmp_path, ".x.tmp-") == [] and (tmp_path / ".x.tmp-notapid").exists()
