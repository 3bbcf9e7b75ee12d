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
# What iqa itself makes inside the cache beside the datasets' folders: a dataset of one of these names
# would be wiped or mixed up by the command that owns it (`iqa report` rewrites report/ whole).
RESERVED_NAMES = frozenset({"report", "models", "runs", "gridpg", "demo-src", "results.sqlite"})


class UnsafeName(ValueError):
    """A name that becomes a path component (dataset, tag, backbone key, run name) but is not a plain one."""


def plain_name(name: str, what: str) -> str:
    """`name` if it is one plain path component (no '/', '\\', '..', leading '.', NUL), else UnsafeName:
    every name a user gives that becomes part of a path passes here before any file is touched."""
    if (not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith(".")
            or "\\" in name or "\0" in name):
        raise UnsafeName(f"{what} {name!r} is not a plain folder name (no '/', '..' or leading '.'); give a plain name")
    return name


def dataset_name(name: str, what: str = "dataset") -> str:
    """A plain name that is not one of the folders iqa makes in the cache."""
    plain_name(name, what)
    if name in RESERVED_NAMES:
        raise UnsafeName(f"{what} {name!r} is reserved: iqa keeps its own {name} in the cache; choose another name")
    return name


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
    dataset_name(dataset)
    return f"{root}/{dataset}" if is_url(root) else Path(root) / dataset


def backbone_label(backbone: str, tag: str | None = None) -> str:
    """`backbone@tag` (tiny, random-init, a tuning), or the backbone alone when it has no tag."""
    return f"{backbone}@{tag}" if tag else backbone
