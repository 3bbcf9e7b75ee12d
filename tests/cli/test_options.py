"""Options shared by commands: `--device auto` (every command's default) and `--seeds`."""

import torch
from typer.testing import CliRunner

from iqa.cli import app, resolve_device


def test_auto_device_follows_what_torch_sees_and_named_devices_pass_through(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


def test_bad_seeds_end_each_command_in_one_line_before_any_work(tmp_path):
    for command in (["demo"], ["head", "--cached", "--backbone", "nss", "--dataset", "demo"], ["data", "show", "demo"]):
        result = CliRunner().invoke(app, [*command, "--seeds", "8,x", "--cache", str(tmp_path)])
        assert result.exit_code == 1 and "--seeds must be comma-separated integers, got '8,x'" in result.output, command
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert list(tmp_path.iterdir()) == []  # nothing built
