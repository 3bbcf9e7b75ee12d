"""`iqa --help`, `iqa COMMAND --help`, `--version` and argument errors answer without importing the heavy
libraries: what `python -X importtime` lists for each, and what the help says."""

import os
import re
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "zarr", "matplotlib")
STRAY_DOT = re.compile(r"\S \.\s")  # "Cache directory ." where markup ate a "[default: ...]"


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m iqa.cli ARGS` in a fresh interpreter, and the top-level packages it imported."""
    env = {**os.environ, "COLUMNS": "400"}  # help lines unwrapped
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "iqa.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    return done, imported


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["head", "--help"], 0),
    (["extract", "--help"], 0),
    (["explain", "--help"], 0),
    (["--version"], 0),
    (["head", "--backbone", "nss", "--epochs", "x"], 2),  # an argument error
    (["extract", "--backbone", "nss", "--dataset", "d", "--weights", "x"], 2),
    (["extract", "--backbone", "nss", "--dataset", "d", "--shard", "1"], 1),  # checked by the command, before torch
    (["head", "--backbone", "nss", "--seeds", "8,8"], 1),
])
def test_help_version_and_argument_errors_import_no_heavy_library(args, code):
    done, imported = run_cli(*args)
    assert done.returncode == code, done.stdout + done.stderr
    assert "iqa" in imported  # the listing is real: the package itself is in it
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_texts_show_their_defaults_and_extras():
    head, _ = run_cli("head", "--help")
    assert "(default: $IQA_CACHE or ./iqa-cache)" in head.stdout  # markup once ate "[default: ...]", leaving " ."
    assert not STRAY_DOT.search(head.stdout), STRAY_DOT.search(head.stdout)
    assert "pip install 'iqa[ray]'" in head.stdout
    assert "baseline, sig, gated, hyper" in head.stdout
    assert "--cached" not in head.stdout  # kept for old scripts, no longer asked for
    extract, _ = run_cli("extract", "--help")
    assert "pip install 'iqa[ray]'" in extract.stdout and not STRAY_DOT.search(extract.stdout)


def test_version_is_the_package_version():
    import iqa

    done, _ = run_cli("--version")
    assert done.stdout.strip() == f"iqa {iqa.__version__}"


def test_the_cli_spells_the_paper_seeds_and_the_weights_as_the_library_holds_them():
    from typing import get_args

    from iqa.cli import PAPER_SEEDS, WEIGHTS
    from iqa.data.splits import PAPER_SEEDS as seeds
    from iqa.extract.registry import WEIGHTS as weights

    assert PAPER_SEEDS == ",".join(map(str, seeds))
    assert get_args(WEIGHTS) == weights


def test_public_names_list_the_registry_and_the_adapters():
    import iqa
    from iqa.data.adapters import ADAPTERS
    from iqa.extract.registry import BACKBONES

    assert iqa.list_backbones() == list(BACKBONES) and {"nss", "dinov2", "siglip2"} <= set(iqa.list_backbones())
    assert iqa.list_datasets() == list(ADAPTERS) and {"koniq10k", "csv"} <= set(iqa.list_datasets())
