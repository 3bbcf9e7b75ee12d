"""`--device auto` (every command's default) is the GPU when torch sees one, else the CPU."""

import torch

from iqa.cli import resolve_device


def test_auto_device_follows_what_torch_sees_and_named_devices_pass_through(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
