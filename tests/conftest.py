"""Fixtures and settings for every test; shared helper functions live in helpers.py."""

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist every core runs a worker: one torch thread each, so they do not oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_labels(tmp_path_factory) -> Path:
    """The real default demo set (all photos, distortions and levels), built once per test session;
    its labels CSV. Tests that change files copy the folder first."""
    from iqa.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "demo-src")


@pytest.fixture
def one_thread():
    """Tiny models: on busy cores, syncing two threads costs more than the arithmetic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
