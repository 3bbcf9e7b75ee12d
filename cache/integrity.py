"""A store's integrity: read its arrays chunk by chunk where a chunk file no longer decodes, name what a done
chunk should hold but does not, and repair by marking those chunks undone for the next extraction."""

from dataclasses import dataclass

import numpy as np

from iqa.cache.store import DONE, PENDING, EmbeddingStore


@dataclass
class CheckedRows:
    """A store's arrays as read, with what a finished chunk should hold but does not."""

    embeddings: np.ndarray
    status: np.ndarray
    damaged: dict[int, str]  # chunk -> what is wrong in it
    keys_wrong: bool

    def describe(self, store: EmbeddingStore) -> str:
        return describe_chunks(store, self.damaged)


def describe_chunks(store: EmbeddingStore, damaged: dict[int, str]) -> str:
    parts = [f"chunk {c} (rows {store.rows_of_chunk(c).start}-{store.rows_of_chunk(c).stop - 1}): {why}"
             for c, why in sorted(damaged.items())[:5]]
    more = len(damaged) - 5
    return "; ".join(parts) + (f"; and {more} more chunks" if more > 0 else "")


def _read(array, store: EmbeddingStore, fill) -> tuple[np.ndarray, set[int]]:
    """The whole array, else chunk by chunk: a chunk file that no longer decodes is filled and named."""
    try:
        return array[:], set()
    except Exception:  # zarr/numcodecs raise codec-specific errors for a garbled chunk file
        out = np.full(array.shape, fill, dtype=array.dtype)
        broken = set()
        for chunk in range(store.n_chunks):
            rows = store.rows_of_chunk(chunk)
            try:
                out[rows.start : rows.stop] = array[rows.start : rows.stop]
            except Exception:
                broken.add(chunk)
        return out, broken


def read_checked(store: EmbeddingStore, manifest_paths: list[str] | None, arrays: tuple[str, ...] = ()) -> CheckedRows:
    """Read the arrays a run needs anyway and check each done chunk: every row has a status, done
    rows hold finite numbers, the keys are the manifest's. Costs one pass over data already in memory.
    `arrays` (of `store.arrays`: layers, maps) are checked too (`check_array`), their damage named with the array."""
    embeddings, broken_e = _read(store.embeddings, store, np.nan)
    status, broken_s = _read(store.group["status"], store, PENDING)
    try:
        keys_wrong = manifest_paths is not None and store.keys() != list(manifest_paths)
    except Exception:  # the keys chunk no longer decodes
        keys_wrong = manifest_paths is not None
    damaged = _damage(store, embeddings, broken_e | broken_s, status, store.done_chunks(), manifest_paths)
    for name in arrays:
        for chunk, why in check_array(store, name, status, manifest_paths)[1].items():
            damaged[chunk] = f"{damaged[chunk]}; {why}" if chunk in damaged else why
    if keys_wrong:
        damaged.setdefault(0, "keys do not match the manifest")
    return CheckedRows(embeddings, status, damaged, keys_wrong)


def check_array(store: EmbeddingStore, name: str, status: np.ndarray,
                manifest_paths: list[str] | None) -> tuple[np.ndarray, dict[int, str]]:
    """One of the store's layer or map arrays as read, and its damage in the chunks it should be written in
    (a chunk file missing or unreadable, done rows without numbers), each named `<array>: ...`."""
    values, broken = _read(store.group[name], store, np.nan)
    damage = _damage(store, values, broken, status, store.array_done_chunks(name), manifest_paths)
    return values, {chunk: f"{name}: {why}" for chunk, why in damage.items()}


def _damage(store: EmbeddingStore, values: np.ndarray, broken: set[int], status: np.ndarray, done: np.ndarray,
            manifest_paths: list[str] | None) -> dict[int, str]:
    """What is wrong in each chunk of `done` of one row-aligned array (chunk -> why)."""
    damaged = {}
    for chunk in np.flatnonzero(done):
        chunk, rows = int(chunk), store.rows_of_chunk(int(chunk))
        block, numbers = status[rows.start : rows.stop], values[rows.start : rows.stop]
        if chunk in broken:
            damaged[chunk] = "chunk file unreadable"
        elif (block == PENDING).any():
            damaged[chunk] = f"{int((block == PENDING).sum())} rows without a status"
        elif (lost := (block == DONE) & ~np.isfinite(numbers.astype(np.float32)).all(axis=1)).any():
            first = rows.start + int(np.flatnonzero(lost)[0])
            name = manifest_paths[first] if manifest_paths is not None else f"row {first}"
            damaged[chunk] = f"{int(lost.sum())} done rows hold NaN/inf (first: {name})"
    return damaged


def repair_store(store: EmbeddingStore, manifest_paths: list[str], chunks: set[int] | None = None) -> dict[int, str]:
    """Mark damaged done chunks undone (the next extraction recomputes exactly those) and rewrite
    the keys from the manifest; returns what was damaged. Damage in a layer or map array recomputes its
    chunk whole, as damaged embeddings do. With `chunks` (a shard's own), only those are looked at: another
    shard's chunk may be mid-write in another process (its rows written, its done mark not yet), which
    reads as damage; its own shard repairs it."""
    rows = read_checked(store, manifest_paths, tuple(store.arrays))
    damaged = dict(rows.damaged)
    if rows.keys_wrong:
        store.group["keys"][:] = np.array(manifest_paths, dtype=str)
        if damaged.get(0) == "keys do not match the manifest":
            del damaged[0]
            damaged[-1] = "keys rewritten from the manifest"
    if chunks is not None:
        damaged = {chunk: why for chunk, why in damaged.items() if chunk < 0 or chunk in chunks}
    for chunk in damaged:
        if chunk >= 0:
            store.group["chunk_done"][chunk] = 0
    return damaged
