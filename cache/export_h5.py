"""A store as one HDF5 file (`iqa export --format h5`), for tools that do not read Zarr."""

import json
from pathlib import Path

import h5py
import numpy as np

from iqa.cache.atomic import atomic_path, replaceable_file
from iqa.cache.store import DamagedStore, EmbeddingStore, fingerprint_id
from iqa.cache.verify import verify_store


def is_h5_export(path: Path) -> bool:
    """Whether `path` is an HDF5 file `export_h5` wrote: it carries the store's fingerprint attributes."""
    try:
        with h5py.File(path, "r") as f:
            return {"fingerprint", "fingerprint_id"} <= set(f.attrs)
    except (OSError, ValueError):  # not HDF5 at all
        return False


def export_h5(store_dir: Path, path: Path, allow_partial: bool = False) -> Path:
    """The store as one HDF5 file (same arrays and names, the `layer<n>` and `map<n>` arrays included, fingerprint as
    a JSON attribute), written atomically. Only a sound, finished store is exported (an unfinished one's
    missing rows are NaN: with `allow_partial`), and only a new file or an earlier export is replaced."""
    replaceable_file(path, is_h5_export, "--out")
    problems = [p for p in verify_store(store_dir) if not (allow_partial and p.startswith("incomplete"))]
    if problems:
        fix = "; --allow-partial exports its finished rows (the rest NaN)" if any(p.startswith("incomplete") for p in problems) else ""
        raise DamagedStore(f"{store_dir}: {'; '.join(problems)}{fix}")
    store = EmbeddingStore(store_dir)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        rows_per_chunk = max(1, min(store.chunk_rows, store.n_rows))
        f.create_dataset("embeddings", data=store.embeddings[:], chunks=(rows_per_chunk, store.dim))
        for name, width in store.arrays.items():  # layer<n>, then map<n>
            f.create_dataset(name, data=store.group[name][:], chunks=(rows_per_chunk, width))
        f.create_dataset("keys", data=np.array(store.keys(), dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("status", data=store.status())
        reasons = store.group["reasons"][:].astype(object)
        f.create_dataset("reasons", data=reasons, dtype=h5py.string_dtype())
        f.attrs["fingerprint"] = json.dumps(store.fingerprint, sort_keys=True)
        f.attrs["fingerprint_id"] = fingerprint_id(store.fingerprint)
    return path
