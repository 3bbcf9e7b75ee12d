"""Loading a store for training: its embeddings (or stored layers), validity, manifest and fingerprint in
one call, checked first (stale, damaged, unfinished stores are refused with the command that mends them)."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from iqa.cache.integrity import check_array, describe_chunks, read_checked
from iqa.cache.manifest import Manifest, manifest_checksum, read_manifest
from iqa.cache.stamps import content_digest, describe_changes
from iqa.cache.store import (DONE, PENDING, DamagedStore, EmbeddingStore, IncompleteStore, StaleStore, check_layer_pooling,
                             extract_command, layer_array, map_array,
                             embedding_fingerprint_id, open_store, store_exists, store_path)


@dataclass
class CachedEmbeddings:
    embeddings: np.ndarray  # (N, D) float32, NaN where not valid
    valid: np.ndarray  # (N,) bool: computed from a readable image
    manifest: Manifest
    fingerprint: dict
    fingerprint_id: str
    path: Path | str | None = None  # the store, for `select_layers`
    command: str = ""  # the `iqa extract` that makes or repairs the store, for messages
    stages: tuple[tuple[int, int], ...] | None = None  # after `select_layers`: (layer, width or channels) of each, in order

    @property
    def targets(self) -> np.ndarray:
        return self.manifest.targets

    def select_layers(self, layers: tuple[int, ...], spatial: int | None = None) -> "CachedEmbeddings":
        """The same rows with the named stored layers, concatenated in order, as the embeddings; with `spatial`
        S, their S x S maps (`read_maps`: each layer's S*S*C_n columns, positions first), the stages' widths
        then their channels C_n."""
        store = EmbeddingStore(self.path)
        arrays = read_layers(store, layers, self.command) if spatial is None else read_maps(store, layers, spatial, self.command)
        return replace(self, embeddings=np.concatenate(arrays, axis=1),
                       stages=tuple((n, a.shape[1] // (spatial or 1) ** 2) for n, a in zip(layers, arrays)))


def load_cached(
    cache: Path, dataset: str, backbone: str, tag: str | None = None, stores: Path | str | None = None,
    allow_partial: bool = False,
) -> CachedEmbeddings:
    """Embeddings, validity, manifest (targets, groups) and fingerprint of one store, in one call.

    The manifest comes from the local `cache`; the store from `stores` (a path or fsspec URL), default the cache.
    An unfinished store is refused unless `allow_partial` (then only its finished rows are valid, and
    its fingerprint id says so); a damaged one always is, naming the chunks.
    """
    path = store_path(cache if stores is None else stores, dataset, backbone, tag)
    command = extract_command(backbone, dataset, tag)
    if not store_exists(path):
        raise FileNotFoundError(f"no embeddings at {path}; run `{command}` first")
    manifest = read_manifest(cache, dataset)  # first: a damaged manifest is named as such, not as a stale store
    store = open_store(path, command)
    if store.fingerprint.get("manifest_sha256") != manifest_checksum(cache, dataset):
        raise ValueError(f"{path} is stale: the {dataset} manifest changed since extraction; re-run with --overwrite")
    rows = read_checked(store, manifest.paths)
    if rows.damaged:
        raise DamagedStore(f"{path} is damaged: {rows.describe(store)}; `{command}` recomputes those chunks")
    if changes := store.changed_images(manifest):
        raise StaleStore(f"{path} is stale: {describe_changes(changes, manifest.paths)}; `{command}` recomputes their chunks")
    fid = embedding_fingerprint_id(store.fingerprint)
    if digest := content_digest(store.stamps()):
        fid = f"{fid}-{digest}"  # the images' bytes: a replaced and re-embedded image gives a new key
    pending = int((rows.status == PENDING).sum())
    if pending and not allow_partial:
        raise IncompleteStore(f"{path} is unfinished: {store.n_rows - pending} of {store.n_rows} rows done; "
                              f"`{command}` finishes it (or --allow-partial trains on the finished rows)")
    return CachedEmbeddings(
        embeddings=rows.embeddings.astype(np.float32),
        valid=rows.status == DONE,
        manifest=manifest,
        fingerprint=store.fingerprint,
        # a partial store's runs are their own results: the finished store trains afresh
        fingerprint_id=f"{fid}-partial-{store.n_rows - pending}of{store.n_rows}" if pending else fid,
        path=path, command=command,
    )


def load_layer(cache: Path, dataset: str, backbone: str, layer: int, tag: str | None = None,
               stores: Path | str | None = None) -> np.ndarray:
    """One layer's pooled vectors for every row (N, D_layer) float32, NaN where the row is not valid;
    only that layer's array is read. The store must hold the layer (`iqa extract --layers`)."""
    path = store_path(cache if stores is None else stores, dataset, backbone, tag)
    command = extract_command(backbone, dataset, tag)
    return read_layers(open_store(path, command), (layer,), command)[0]


def stored_layers(cache: Path, dataset: str, backbone: str, tag: str | None = None,
                  stores: Path | str | None = None) -> list[int]:
    """The layers a store holds (`iqa extract --layers`), in the order they were named; [] for none."""
    path = store_path(cache if stores is None else stores, dataset, backbone, tag)
    if not store_exists(path):
        raise FileNotFoundError(f"no embeddings at {path}; run `{extract_command(backbone, dataset, tag)} --layers all` first")
    return list(open_store(path, extract_command(backbone, dataset, tag)).layer_dims)


def read_layers(store: EmbeddingStore, layers: tuple[int, ...], command: str = "iqa extract ...") -> list[np.ndarray]:
    """The named layers' arrays, float32, each read whole and checked as `read_checked` checks the
    embeddings; a layer the store lacks, has not finished adding, or holds damaged is refused,
    saying how `command` (the store's `iqa extract`) mends it."""
    missing = [n for n in layers if n not in store.layer_dims]
    if missing:
        raise ValueError(f"{store.path} holds layers {list(store.layer_dims) or 'none'}, not {missing}; "
                         f"`{command} --layers all` adds every layer to it")
    return _read_arrays(store, [(layer_array(n), f"layer {n}") for n in layers], command)


def read_maps(store: EmbeddingStore, layers: tuple[int, ...], side: int, command: str = "iqa extract ...") -> list[np.ndarray]:
    """The named layers' side x side maps (`iqa extract --spatial`), float32, each (N, side*side*C_n) and checked
    as `read_layers` checks layers; a store without them is refused, naming the command that adds them."""
    wanted = f"`{command} --layers {','.join(map(str, layers))} --spatial {side}`"
    if store.map_side not in (None, side):
        raise ValueError(f"{store.path} holds {store.map_side} x {store.map_side} maps, not {side} x {side}; "
                         f"{wanted[:-1]} --overwrite` rebuilds it with them")
    if missing := [n for n in layers if n not in store.map_dims]:
        raise ValueError(f"{store.path} holds no {side} x {side} maps of layers {missing}; {wanted} adds them")
    return _read_arrays(store, [(map_array(n), f"the map of layer {n}") for n in layers], command)


def _read_arrays(store: EmbeddingStore, arrays: list[tuple[str, str]], command: str) -> list[np.ndarray]:
    """The (array, what it is) arrays, each read whole and checked; unfinished or damaged ones are refused."""
    check_layer_pooling(store, command)
    status, done, out = store.status(), store.done_chunks(), []
    for name, what in arrays:
        if (unfinished := done & ~store.array_done_chunks(name)).any():
            raise IncompleteStore(f"{store.path} is still adding {what} ({int(unfinished.sum())} of {store.n_chunks} "
                                  f"chunks to go); `{command}` finishes it")
        values, damaged = check_array(store, name, status, None)
        if damaged:
            raise DamagedStore(f"{store.path} is damaged: {describe_chunks(store, damaged)}; `{command}` recomputes those chunks")
        out.append(values.astype(np.float32))
    return out
