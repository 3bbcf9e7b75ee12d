"""Options shared by commands: `--device auto` (every command's default) and `--seeds`."""

import torch
from typer.testing import CliRunner

from iqa.cli import app, chosen_device
from helpers import one_error_line


def test_auto_device_follows_what_torch_sees_and_named_devices_pass_through(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert chosen_device("auto") == "cpu"
    assert chosen_device("cuda:1", engine="ray") == "cuda:1"  # the workers' device, not this machine's
    one_error_line(CliRunner().invoke(app, ["score", "m", "x.png", "--device", "cuda"]), "--device cuda: torch sees no CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert chosen_device("auto") == "cuda"
    assert chosen_device("cuda:1") == "cuda:1" and chosen_device("cpu") == "cpu"
    one_error_line(CliRunner().invoke(app, ["score", "m", "x.png", "--device", "gpu"]), "--device 'gpu' is not a device")


def test_bad_seeds_end_each_command_in_one_line_before_any_work(tmp_path):
    for command in (["demo"], ["head", "--cached", "--backbone", "nss", "--dataset", "demo"], ["data", "show", "demo"]):
        result = CliRunner().invoke(app, [*command, "--seeds", "8,x", "--cache", str(tmp_path)])
        assert result.exit_code == 1 and "--seeds must be comma-separated integers, got '8,x'" in result.output, command
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert list(tmp_path.iterdir()) == []  # nothing built
