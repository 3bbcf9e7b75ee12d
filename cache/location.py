"""Where the cache lives: `--cache`, else the IQA_CACHE variable, else ./iqa-cache."""

import os
from pathlib import Path

DEFAULT_CACHE = "iqa-cache"


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """The cache directory chosen by an explicit path, the IQA_CACHE variable or the default."""
    chosen = path if path is not None else os.environ.get("IQA_CACHE", DEFAULT_CACHE)
    return Path(chosen).expanduser().resolve()


def dataset_dir(root: Path, dataset: str) -> Path:
    """The folder of one dataset inside the cache: its manifest and its embedding stores."""
    return root / dataset
