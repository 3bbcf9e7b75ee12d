"""Making a store, or reopening one to append: built aside and renamed into place, so concurrent shard
processes agree on one store and a killed one leaves nothing half-made (cache/store.py: the layout)."""

import os
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import zarr

from iqa.cache.atomic import remove_stale
from iqa.cache.location import is_url
from iqa.cache.stamps import WIDTH as STAMP_WIDTH
from iqa.cache.store import (DEFAULT_CHUNK_ROWS, LAYER_POOLING, PENDING, STORE_FORMAT, EmbeddingStore, FingerprintMismatch,
                             GROWN_FIELDS, create_row_arrays, fingerprint_difference, fingerprint_id, row_arrays)


def _create(path: Path | str, fingerprint: dict, keys: list[str], dim: int, dtype: str, chunk_rows: int,
            arrays: dict[str, int]) -> None:
    n = len(keys)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("embeddings", shape=(n, dim), dtype=dtype, chunks=(chunk_rows, dim), fill_value=np.nan)
    create_row_arrays(group, arrays, n, chunk_rows, dtype)
    group.create_array("keys", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.array(keys, dtype=str)
    group.create_array("status", shape=(n,), dtype="uint8", chunks=(chunk_rows,), fill_value=PENDING)
    group.create_array("reasons", shape=(n,), dtype=str, chunks=(chunk_rows,), fill_value="")
    add_stamps(group, n, chunk_rows)
    n_chunks = -(-n // chunk_rows)
    group.create_array("chunk_done", shape=(n_chunks,), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs.update(
        {"format": STORE_FORMAT, "chunk_rows": chunk_rows, "fingerprint": fingerprint,
         "fingerprint_id": fingerprint_id(fingerprint), **({"layer_pooling": LAYER_POOLING} if arrays else {})}
    )


def add_stamps(group, n: int, chunk_rows: int) -> None:
    group.create_array("image_stamps", shape=(n, STAMP_WIDTH), dtype="int64", chunks=(chunk_rows, STAMP_WIDTH), fill_value=0)


def open_for_writing(
    path: Path | str, fingerprint: dict, keys: list[str], dim: int, dtype: str = "float16",
    chunk_rows: int = DEFAULT_CHUNK_ROWS, overwrite: bool = False, layer_dims: dict[int, int] | None = None,
    map_side: int | None = None, map_channels: dict[int, int] | None = None,
) -> EmbeddingStore:
    """Create the store once (atomically: built aside, then renamed) or reopen it to append.

    Several shard processes may call this at once: exactly one rename wins, the others reopen the
    winner's store. Reopening checks the fingerprint; a store built differently is refused.
    `chunk_rows` applies only to a new store; an existing one keeps its own. `layer_dims` (layer ->
    width, the fingerprint's `layers`) adds one array per layer; an existing store whose fingerprint
    matches but for its layers is extended with the ones it lacks (`EmbeddingStore.add_layers`) and
    keeps those it has: the returned store's `arrays` are what every row is written with.
    `map_side` S (the fingerprint's `spatial`) keeps every stored layer's S x S map too; `map_channels` (layer ->
    channels, every layer of the model) sizes the maps of layers that lack one. A store with maps keeps them.
    """
    layer_dims, map_channels = layer_dims or {}, map_channels or {}
    if dtype not in ("float16", "float32"):
        raise ValueError(f"store dtype must be float16 or float32, got {dtype!r}")
    arrays = row_arrays(layer_dims, {n: map_side**2 * map_channels[n] for n in layer_dims} if map_side else {})
    if is_url(path):
        _create_remote(path, fingerprint, keys, dim, dtype, chunk_rows, overwrite, arrays)
    else:
        _create_local(path, fingerprint, keys, dim, dtype, chunk_rows, overwrite, arrays)
    store = EmbeddingStore(path, mode="r+")
    grown = tuple(f"{field}:" for field in GROWN_FIELDS)  # added in place below, or kept from the store
    different = [d for d in fingerprint_difference(store.fingerprint, fingerprint) if not d.startswith(grown)]
    if map_side and store.map_side not in (None, map_side):
        different.append(f"spatial: store has {store.map_side} x {store.map_side} maps, now {map_side} x {map_side}")
    if different:
        raise FingerprintMismatch(
            f"{path} was built differently ({'; '.join(different)}); pass --overwrite to rebuild it"
        )
    new = {n: width for n, width in layer_dims.items() if n not in store.layer_dims}
    side = store.map_side or map_side
    new_maps = {n: side**2 * map_channels[n] for n in [*store.layer_dims, *new] if n not in store.map_dims} if side else {}
    if new or new_maps:
        store.add_layers(new, new_maps, side)
    if "image_stamps" not in store.group:  # a store from before stamps: rows written from now on get them
        add_stamps(store.group, store.n_rows, store.chunk_rows)
    return store


def _create_local(path: Path, fingerprint: dict, keys: list[str], dim: int, dtype: str, chunk_rows: int,
                  overwrite: bool, arrays: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and path.exists():
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        os.rename(path, trash)
        shutil.rmtree(trash)
    remove_stale(path.parent, f".{path.name}.tmp-")  # stores half-created by killed runs
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
        _create(tmp, fingerprint, keys, dim, dtype, chunk_rows, arrays)
        try:
            os.rename(tmp, path)
        except OSError:  # another shard created it first
            shutil.rmtree(tmp)


def _create_remote(url: str, fingerprint: dict, keys: list[str], dim: int, dtype: str, chunk_rows: int,
                   overwrite: bool, arrays: dict[str, int]) -> None:
    fs, where = fsspec.core.url_to_fs(url)
    if overwrite and fs.exists(where):
        fs.rm(where, recursive=True)
    if not fs.exists(where):
        name = where.rstrip("/").rsplit("/", 1)[-1]
        tmp = f"{url.rsplit('/', 1)[0]}/.{name}.tmp-{uuid.uuid4().hex}"
        _create(tmp, fingerprint, keys, dim, dtype, chunk_rows, arrays)
        fs.mv(fsspec.core.url_to_fs(tmp)[1], where, recursive=True)
