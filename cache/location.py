"""Where the cache lives: `--cache`, else the IQA_CACHE variable, else ./iqa-cache.

A store is named by its backbone and the tag of its weights: `<backbone>@<tag>.zarr`, or
`<backbone>.zarr` without a tag (`backbone_label`); listings and reports name runs the same way.

Embedding stores may live elsewhere, under an fsspec URL (`s3://bucket/iqa`, `gs://...`,
`memory://...`): a location is then a string, and `dataset_dir` joins it with "/". Manifests and the
results database always stay in the local cache.
"""

import os
from pathlib import Path

DEFAULT_CACHE = "iqa-cache"


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """The cache directory chosen by an explicit path, the IQA_CACHE variable or the default."""
    chosen = path if path is not None else os.environ.get("IQA_CACHE", DEFAULT_CACHE)
    return Path(chosen).expanduser().resolve()


def store_root(location: str | os.PathLike) -> Path | str:
    """Where embedding stores live: a local path (`file://` URLs included) or another fsspec URL, kept as text."""
    text = str(location)
    if is_url(text) and not text.startswith("file://"):
        return text.rstrip("/")
    return Path(text.removeprefix("file://")).expanduser().resolve()


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location


def dataset_dir(root: Path | str, dataset: str) -> Path | str:
    """The folder of one dataset inside the cache (or a store root URL): its manifest and its embedding stores."""
    return f"{root}/{dataset}" if is_url(root) else Path(root) / dataset


def backbone_label(backbone: str, tag: str | None = None) -> str:
    """`backbone@tag` (tiny, random-init, a tuning), or the backbone alone when it has no tag."""
    return f"{backbone}@{tag}" if tag else backbone
