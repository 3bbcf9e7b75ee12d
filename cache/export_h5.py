"""A store as one HDF5 file (`iqa export --format h5`), for tools that do not read Zarr."""

import json
from pathlib import Path

import h5py
import numpy as np

from iqa.cache.atomic import atomic_path
from iqa.cache.store import EmbeddingStore, fingerprint_id, layer_array


def export_h5(store_dir: Path, path: Path) -> Path:
    """The store as one HDF5 file (same arrays and names, the `layer<n>` arrays included, fingerprint as
    a JSON attribute), written atomically."""
    store = EmbeddingStore(store_dir)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        rows_per_chunk = max(1, min(store.chunk_rows, store.n_rows))
        f.create_dataset("embeddings", data=store.embeddings[:], chunks=(rows_per_chunk, store.dim))
        for n, width in store.layer_dims.items():
            f.create_dataset(layer_array(n), data=store.group[layer_array(n)][:], chunks=(rows_per_chunk, width))
        f.create_dataset("keys", data=np.array(store.keys(), dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("status", data=store.status())
        reasons = store.group["reasons"][:].astype(object)
        f.create_dataset("reasons", data=reasons, dtype=h5py.string_dtype())
        f.attrs["fingerprint"] = json.dumps(store.fingerprint, sort_keys=True)
        f.attrs["fingerprint_id"] = fingerprint_id(store.fingerprint)
    return path
