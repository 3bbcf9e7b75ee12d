"""Embedding stores: one Zarr v3 group per (dataset, backbone, optional tag).

Layout of `<cache>/<dataset>/<backbone>.zarr` (`<backbone>@<tag>.zarr` with a tag), the
contract other tools read:
- `embeddings` (N, D) float16 or float32, row i = manifest row i, chunks of `chunk_rows` rows;
  rows not (yet) computed or invalid hold NaN.
- `keys` (N,) the manifest's relative image paths.
- `status` (N,) uint8: 0 pending, 1 done, 2 invalid; `reasons` (N,) why a row is invalid.
- `image_stamps` (N, 5) int64: each row's image file (size, mtime, content hash, ctime, inode) when it
  was read (cache/stamps.py; (N, 3) in stores made before ctime and inode were kept); all zero where
  unknown (rows of stores made before stamps were kept).
- `chunk_done` (N_chunks,) uint8, one element per Zarr chunk, set only after a whole row block
  (embeddings, status, reasons) is written: a set flag is the record of done work.
- `layer<n>` (N, D_n), only for layers named at extraction (`iqa extract --layers`, counted from
  1; the fingerprint's `layers` lists them): block/stage n's pooled vector, one array per layer so
  reading one layer for every row touches only that layer's chunk files; written with the row block.
- `extension_done` (N_chunks,) uint8, only while layers are being added to a finished store (the
  attribute `extending` names them): set per chunk once those layers' rows are written (the other
  arrays of a done chunk are left as they are). When every chunk has it, the attribute and the
  array go: the layers are then the store's like any other.
- attributes: `fingerprint` (what produced the numbers), `fingerprint_id`, `chunk_rows`.

Writers only ever write whole chunk-aligned row blocks (Zarr v3 loses rows when two writers
share a chunk), and Zarr's local store writes each chunk file atomically, so any number of
processes may fill disjoint chunks of one store and a killed one leaves no half-written chunk.

A store may also live under an fsspec URL (Zarr's FsspecStore; see cache/location.py): the same
fingerprint and resume rules apply. Object stores put each chunk object whole; they have no
atomic rename, so there a new store is built aside and moved by one process (the Ray driver).
"""

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import fsspec
import h5py
import numpy as np
import zarr

from iqa.cache.atomic import atomic_path, remove_stale, replaceable_file
from iqa.cache.location import dataset_dir, is_url, plain_name
from iqa.cache.manifest import Manifest, manifest_checksum, manifest_path, read_manifest
from iqa.cache.stamps import WIDTH as STAMP_WIDTH
from iqa.cache.stamps import changed_images, content_digest, describe_changes

STORE_FORMAT = 1
DEFAULT_CHUNK_ROWS = 256
PENDING, DONE, INVALID = 0, 1, 2


class FingerprintMismatch(ValueError):
    """The store was built by something else; the message names the differing fields."""


def store_path(root: Path | str, dataset: str, backbone: str, tag: str | None = None) -> Path | str:
    """The store's location under a cache (or store root URL): a Path, or a URL string."""
    name = plain_name(backbone, "backbone") if tag is None else f"{plain_name(backbone, 'backbone')}@{plain_name(tag, 'tag')}"
    return f"{dataset_dir(root, dataset)}/{name}.zarr" if is_url(root) else dataset_dir(root, dataset) / f"{name}.zarr"


def extract_command(backbone: str, dataset: str, tag: str | None) -> str:
    """The `iqa extract` command that makes (or resumes) a store: the untrained models' tags are
    the flags that make them (`--tag tiny` would embed with the pretrained weights)."""
    model = {"tiny": " --tiny", "random-init": " --random-init"}.get(tag, f" --tag {tag}" if tag else "")
    return f"iqa extract --backbone {backbone} --dataset {dataset}{model}"


def store_exists(path: Path | str) -> bool:
    if is_url(path):
        fs, where = fsspec.core.url_to_fs(path)
        return fs.exists(where)
    return Path(path).exists()


def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def embedding_fingerprint_id(fingerprint: dict) -> str:
    """The id results are keyed on: the fingerprint without its `layers` list. Layers are added to a
    store in place, and which layers a store holds changes no number a run reads (a run on stored
    layers names its own in its config), so adding layers keeps every finished run's key."""
    return fingerprint_id({k: v for k, v in fingerprint.items() if k != "layers"})


def fingerprint_difference(stored: dict, current: dict) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [f"{k}: store has {stored.get(k)!r}, now {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


class EmbeddingStore:
    """An open store; `write_block` is the only way rows get written."""

    def __init__(self, path: Path | str, mode: str = "r"):
        self.path = path
        self.group = zarr.open_group(str(path), mode=mode)
        if self.group.attrs.get("format") != STORE_FORMAT:
            raise ValueError(f"{path} is not an iqa embedding store (format {self.group.attrs.get('format')!r})")
        self.fingerprint: dict = self.group.attrs["fingerprint"]
        self.chunk_rows: int = self.group.attrs["chunk_rows"]
        self.embeddings = self.group["embeddings"]
        self.layer_dims: dict[int, int] = {n: self.group[layer_array(n)].shape[1] for n in self.fingerprint.get("layers", [])}
        self.extending: list[int] = list(self.group.attrs.get("extending", []))  # layers being added (add_layers)
        self.n_rows, self.dim = self.embeddings.shape
        self.n_chunks = -(-self.n_rows // self.chunk_rows)

    def rows_of_chunk(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows))

    def done_chunks(self) -> np.ndarray:
        return self.group["chunk_done"][:].astype(bool)

    def layer_done_chunks(self, layer: int) -> np.ndarray:
        """The chunks whose rows of `layer` are written: the done chunks, and, while the layer is
        being added, only those the extension has reached."""
        done = self.done_chunks()
        return done & self.group["extension_done"][:].astype(bool) if layer in self.extending else done

    def extension_todo(self) -> list[int]:
        """Done chunks still without the layers being added: only those layers are computed for them."""
        if not self.extending:
            return []
        return np.flatnonzero(self.done_chunks() & ~self.group["extension_done"][:].astype(bool)).tolist()

    def add_layers(self, layer_dims: dict[int, int]) -> None:
        """Extend the store in place with new layer arrays (layer -> width); the fingerprint then lists
        the union. Done chunks keep their rows, the new layers are filled by `write_layers`.

        Crash-safe in this order: arrays first (a leftover of a killed call is recreated here), then
        one metadata write that names them. One extension at a time."""
        if self.extending:
            raise FingerprintMismatch(
                f"{self.path} is still adding layers {self.extending}; run the same `iqa extract` without "
                f"new layers to finish that, then add {list(layer_dims)}")
        check_layer_pooling(self, "iqa extract ...")  # new layers beside old-rule ones would mix two rules
        for layer, width in layer_dims.items():
            self.group.create_array(layer_array(layer), shape=(self.n_rows, width), dtype=self.embeddings.dtype,
                                    chunks=(self.chunk_rows, width), fill_value=np.nan, overwrite=True)
        self.group.create_array("extension_done", shape=(self.n_chunks,), dtype="uint8", chunks=(1,), fill_value=0,
                                overwrite=True)
        fingerprint = {**self.fingerprint, "layers": list(self.layer_dims) + list(layer_dims)}
        self.group.attrs.update({"fingerprint": fingerprint, "fingerprint_id": fingerprint_id(fingerprint),
                                 "extending": list(layer_dims), "layer_pooling": LAYER_POOLING})
        self.fingerprint, self.extending = fingerprint, list(layer_dims)
        self.layer_dims = {**self.layer_dims, **layer_dims}

    def finish_extension(self) -> bool:
        """Once every chunk holds the added layers, drop the extension's bookkeeping (attribute first:
        an array left behind by a crash is harmless and recreated by the next `add_layers`)."""
        if not self.extending:
            return False
        try:
            if not self.group["extension_done"][:].all():
                return False
            del self.group.attrs["extending"]
        except (KeyError, FileNotFoundError):  # a concurrent extraction finished it first
            pass
        self.extending = []
        try:
            del self.group["extension_done"]
        except KeyError:  # another shard finished it first
            pass
        return True

    def keys(self) -> list[str]:
        return self.group["keys"][:].tolist()

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def stamps(self) -> np.ndarray:
        if "image_stamps" not in self.group:
            return np.zeros((self.n_rows, STAMP_WIDTH), dtype=np.int64)
        return self.group["image_stamps"][:]

    def changed_images(self, manifest: Manifest, rehash: bool = False) -> dict[int, str]:
        """Rows whose image file is no longer what was embedded; empty when the image folder is
        absent altogether (a cache moved to a machine without the images)."""
        root = Path(manifest.image_root)
        if not root.is_dir():
            return {}
        return changed_images(self.stamps(), root, manifest.paths, rehash)

    def undo_chunks_of(self, rows) -> list[int]:
        """Mark the chunks holding `rows` not done, so the next extraction recomputes them."""
        chunks = sorted({int(row) // self.chunk_rows for row in rows})
        for chunk in chunks:
            self.group["chunk_done"][chunk] = 0
        return chunks

    def invalid_rows(self) -> list[tuple[str, str]]:
        rows = np.flatnonzero(self.status() == INVALID)
        keys, reasons = self.group["keys"][:], self.group["reasons"][:]
        return [(str(keys[i]), str(reasons[i])) for i in rows]

    def write_block(self, chunk: int, embeddings: np.ndarray, reasons: list[str], stamps: np.ndarray | None = None) -> None:
        """One whole chunk: rows with a reason are invalid (their embedding is ignored, stored as NaN);
        `stamps` (rows, 3) are the image files as read (None: rows not read from the manifest's files)."""
        rows = self.rows_of_chunk(chunk)
        bad = np.array([bool(r) for r in reasons])
        width = self.dim + sum(self.layer_dims.values())  # the default embedding, then each layer's vector
        if embeddings.shape != (len(rows), width) or len(reasons) != len(rows):
            raise ValueError(f"chunk {chunk} needs {len(rows)} rows of {width}, got {embeddings.shape}")
        block = np.where(bad[:, None], np.nan, embeddings)
        self.embeddings[rows.start : rows.stop] = block[:, : self.dim].astype(self.embeddings.dtype)
        start = self.dim
        for n, layer_dim in self.layer_dims.items():
            self.group[layer_array(n)][rows.start : rows.stop] = block[:, start : start + layer_dim].astype(self.embeddings.dtype)
            start += layer_dim
        self.group["status"][rows.start : rows.stop] = np.where(bad, INVALID, DONE).astype(np.uint8)
        self.group["reasons"][rows.start : rows.stop] = np.array(reasons, dtype=str)
        if stamps is not None:
            kept = self.group["image_stamps"]  # an older store keeps the first 3 columns
            kept[rows.start : rows.stop] = np.asarray(stamps, dtype=np.int64)[:, : kept.shape[1]]
        self.group["chunk_done"][chunk] = 1  # last: only now is this block done work
        if self.extending:
            self.group["extension_done"][chunk] = 1

    def write_layers(self, chunk: int, embeddings: np.ndarray) -> None:
        """The layers being added, for one done chunk; `embeddings` are whole rows as `write_block` takes
        them. Their default embedding is checked against the stored one first: layers computed by a
        model that does not give the stored numbers would not belong to them."""
        rows = self.rows_of_chunk(chunk)
        width = self.dim + sum(self.layer_dims.values())
        if embeddings.shape != (len(rows), width):
            raise ValueError(f"chunk {chunk} needs {len(rows)} rows of {width}, got {embeddings.shape}")
        stored = self.embeddings[rows.start : rows.stop].astype(np.float32)
        done = self.group["status"][rows.start : rows.stop] == DONE
        valid = done & np.isfinite(embeddings[:, : self.dim]).all(axis=1)
        new = embeddings[:, : self.dim][valid]
        error = np.linalg.norm(new - stored[valid], axis=1) / np.maximum(np.linalg.norm(stored[valid], axis=1), 1e-12)
        if (error > LAYER_CHECK_TOLERANCE).any():
            worst = int(np.flatnonzero(valid)[int(np.argmax(error))])
            raise FingerprintMismatch(
                f"{self.path}: the model gives {self.group['keys'][rows.start + worst]} a default embedding "
                f"{float(error.max()):.2g} (relative) away from the stored one, so its layers would not belong to "
                f"the store; pass --overwrite to rebuild the store with every layer")
        bad = ~done[:, None]
        start = self.dim
        for n, layer_dim in self.layer_dims.items():
            if n in self.extending:
                block = np.where(bad, np.nan, embeddings[:, start : start + layer_dim])
                self.group[layer_array(n)][rows.start : rows.stop] = block.astype(self.embeddings.dtype)
            start += layer_dim
        try:
            self.group["extension_done"][chunk] = 1  # last, as chunk_done in write_block
        except (KeyError, FileNotFoundError):  # a concurrent extraction finished the extension: every chunk holds the layers
            pass


# A recomputed default embedding may differ from the stored one by float16 rounding (~5e-4) and by
# bf16 autocast in other batch shapes (~3e-3); a different model or image is far beyond this.
LAYER_CHECK_TOLERANCE = 2e-2


def layer_array(layer: int) -> str:
    return f"layer{layer}"


# What a `layer<n>` row holds (extract/backbones.pool_layer, extract/timm_tower.TimmTap): kept in the store's
# attributes beside its layer arrays and in the recipe of runs on layers, so layers pooled by another rule
# are refused, not read as these, and runs on them are keyed apart.
LAYER_POOLING = "stage maps: global average; tokens: patch-token mean, then the class token where the model has one"


def layer_pooling_problem(store: "EmbeddingStore", command: str) -> str | None:
    """Why the store's layers cannot be read as this version pools them, with the way out; None when they can."""
    held = store.group.attrs.get("layer_pooling")
    if store.layer_dims and held != LAYER_POOLING:
        return (f"holds layers pooled by an earlier rule ({held or 'patch-token mean alone'}); "
                f"`{command} --layers all --overwrite` rebuilds it with layers as this version pools them")
    return None


def check_layer_pooling(store: "EmbeddingStore", command: str) -> None:
    if problem := layer_pooling_problem(store, command):
        raise StaleStore(f"{store.path} {problem}")


def _create(path: Path | str, fingerprint: dict, keys: list[str], dim: int, dtype: str, chunk_rows: int,
            layer_dims: dict[int, int]) -> None:
    n = len(keys)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("embeddings", shape=(n, dim), dtype=dtype, chunks=(chunk_rows, dim), fill_value=np.nan)
    for layer, width in layer_dims.items():
        group.create_array(layer_array(layer), shape=(n, width), dtype=dtype, chunks=(chunk_rows, width), fill_value=np.nan)
    group.create_array("keys", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.array(keys, dtype=str)
    group.create_array("status", shape=(n,), dtype="uint8", chunks=(chunk_rows,), fill_value=PENDING)
    group.create_array("reasons", shape=(n,), dtype=str, chunks=(chunk_rows,), fill_value="")
    add_stamps(group, n, chunk_rows)
    n_chunks = -(-n // chunk_rows)
    group.create_array("chunk_done", shape=(n_chunks,), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs.update(
        {"format": STORE_FORMAT, "chunk_rows": chunk_rows, "fingerprint": fingerprint,
         "fingerprint_id": fingerprint_id(fingerprint), **({"layer_pooling": LAYER_POOLING} if layer_dims else {})}
    )


def add_stamps(group, n: int, chunk_rows: int) -> None:
    group.create_array("image_stamps", shape=(n, STAMP_WIDTH), dtype="int64", chunks=(chunk_rows, STAMP_WIDTH), fill_value=0)


def open_for_writing(
    path: Path | str, fingerprint: dict, keys: list[str], dim: int, dtype: str = "float16",
    chunk_rows: int = DEFAULT_CHUNK_ROWS, overwrite: bool = False, layer_dims: dict[int, int] | None = None,
) -> EmbeddingStore:
    """Create the store once (atomically: built aside, then renamed) or reopen it to append.

    Several shard processes may call this at once: exactly one rename wins, the others reopen the
    winner's store. Reopening checks the fingerprint; a store built differently is refused.
    `chunk_rows` applies only to a new store; an existing one keeps its own. `layer_dims` (layer ->
    width, the fingerprint's `layers`) adds one array per layer; an existing store whose fingerprint
    matches but for its layers is extended with the ones it lacks (`EmbeddingStore.add_layers`) and
    keeps those it has: the returned store's `layer_dims` are what every row is written with.
    """
    layer_dims = layer_dims or {}
    if dtype not in ("float16", "float32"):
        raise ValueError(f"store dtype must be float16 or float32, got {dtype!r}")
    if is_url(path):
        _create_remote(path, fingerprint, keys, dim, dtype, chunk_rows, overwrite, layer_dims)
    else:
        _create_local(path, fingerprint, keys, dim, dtype, chunk_rows, overwrite, layer_dims)
    store = EmbeddingStore(path, mode="r+")
    different = [d for d in fingerprint_difference(store.fingerprint, fingerprint) if not d.startswith("layers:")]
    if different:
        raise FingerprintMismatch(
            f"{path} was built differently ({'; '.join(different)}); pass --overwrite to rebuild it"
        )
    if new := {n: width for n, width in layer_dims.items() if n not in store.layer_dims}:
        store.add_layers(new)
    if "image_stamps" not in store.group:  # a store from before stamps: rows written from now on get them
        add_stamps(store.group, store.n_rows, store.chunk_rows)
    return store


def _create_local(path: Path, fingerprint: dict, keys: list[str], dim: int, dtype: str, chunk_rows: int,
                  overwrite: bool, layer_dims: dict[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and path.exists():
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        os.rename(path, trash)
        shutil.rmtree(trash)
    remove_stale(path.parent, f".{path.name}.tmp-")  # stores half-created by killed runs
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
        _create(tmp, fingerprint, keys, dim, dtype, chunk_rows, layer_dims)
        try:
            os.rename(tmp, path)
        except OSError:  # another shard created it first
            shutil.rmtree(tmp)


def _create_remote(url: str, fingerprint: dict, keys: list[str], dim: int, dtype: str, chunk_rows: int,
                   overwrite: bool, layer_dims: dict[int, int]) -> None:
    fs, where = fsspec.core.url_to_fs(url)
    if overwrite and fs.exists(where):
        fs.rm(where, recursive=True)
    if not fs.exists(where):
        name = where.rstrip("/").rsplit("/", 1)[-1]
        tmp = f"{url.rsplit('/', 1)[0]}/.{name}.tmp-{uuid.uuid4().hex}"
        _create(tmp, fingerprint, keys, dim, dtype, chunk_rows, layer_dims)
        fs.mv(fsspec.core.url_to_fs(tmp)[1], where, recursive=True)


@dataclass
class CachedEmbeddings:
    embeddings: np.ndarray  # (N, D) float32, NaN where not valid
    valid: np.ndarray  # (N,) bool: computed from a readable image
    manifest: Manifest
    fingerprint: dict
    fingerprint_id: str
    path: Path | str | None = None  # the store, for `select_layers`
    command: str = ""  # the `iqa extract` that makes or repairs the store, for messages
    stages: tuple[tuple[int, int], ...] | None = None  # after `select_layers`: (layer, width) of each, in order

    @property
    def targets(self) -> np.ndarray:
        return self.manifest.targets

    def select_layers(self, layers: tuple[int, ...]) -> "CachedEmbeddings":
        """The same rows with the named stored layers, concatenated in order, as the embeddings."""
        arrays = read_layers(EmbeddingStore(self.path), layers, self.command)
        return replace(self, embeddings=np.concatenate(arrays, axis=1),
                       stages=tuple((n, a.shape[1]) for n, a in zip(layers, arrays)))


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
    check_layer_pooling(store, command)
    status, done, out = store.status(), store.done_chunks(), []
    for n in layers:
        if (unfinished := done & ~store.layer_done_chunks(n)).any():
            raise IncompleteStore(f"{store.path} is still adding layer {n} ({int(unfinished.sum())} of {store.n_chunks} "
                                  f"chunks to go); `{command}` finishes it")
        values, damaged = check_layer(store, n, status, None)
        if damaged:
            raise DamagedStore(f"{store.path} is damaged: {describe_chunks(store, damaged)}; `{command}` recomputes those chunks")
        out.append(values.astype(np.float32))
    return out


class IncompleteStore(ValueError):
    """Rows of the store are not computed yet."""


class StaleStore(ValueError):
    """Images changed since their rows were computed."""


class DamagedStore(ValueError):
    """Chunks recorded as done do not hold what a finished chunk holds."""


def open_store(path: Path | str, command: str) -> EmbeddingStore:
    try:
        return EmbeddingStore(path)
    except (ValueError, OSError, KeyError) as error:
        if "not an iqa embedding store" in str(error):
            raise
        raise DamagedStore(f"{path} is damaged, its metadata unreadable ({error}); `{command} --overwrite` rebuilds it") from None


@dataclass
class CheckedRows:
    """A store's arrays as read, with what a finished chunk should hold but does not."""

    embeddings: np.ndarray
    status: np.ndarray
    damaged: dict[int, str]  # chunk -> what is wrong in it
    keys_wrong: bool

    def describe(self, store: "EmbeddingStore") -> str:
        return describe_chunks(store, self.damaged)


def describe_chunks(store: "EmbeddingStore", damaged: dict[int, str]) -> str:
    parts = [f"chunk {c} (rows {store.rows_of_chunk(c).start}-{store.rows_of_chunk(c).stop - 1}): {why}"
             for c, why in sorted(damaged.items())[:5]]
    more = len(damaged) - 5
    return "; ".join(parts) + (f"; and {more} more chunks" if more > 0 else "")


def _read(array, store: "EmbeddingStore", fill) -> tuple[np.ndarray, set[int]]:
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


def read_checked(store: "EmbeddingStore", manifest_paths: list[str] | None, layers: tuple[int, ...] = ()) -> CheckedRows:
    """Read the arrays a run needs anyway and check each done chunk: every row has a status, done
    rows hold finite numbers, the keys are the manifest's. Costs one pass over data already in memory.
    `layers` are checked too (`check_layer`), their damage named with the layer."""
    embeddings, broken_e = _read(store.embeddings, store, np.nan)
    status, broken_s = _read(store.group["status"], store, PENDING)
    try:
        keys_wrong = manifest_paths is not None and store.keys() != list(manifest_paths)
    except Exception:  # the keys chunk no longer decodes
        keys_wrong = manifest_paths is not None
    damaged = _damage(store, embeddings, broken_e | broken_s, status, store.done_chunks(), manifest_paths)
    for layer in layers:
        for chunk, why in check_layer(store, layer, status, manifest_paths)[1].items():
            damaged[chunk] = f"{damaged[chunk]}; {why}" if chunk in damaged else why
    if keys_wrong:
        damaged.setdefault(0, "keys do not match the manifest")
    return CheckedRows(embeddings, status, damaged, keys_wrong)


def check_layer(store: "EmbeddingStore", layer: int, status: np.ndarray,
                manifest_paths: list[str] | None) -> tuple[np.ndarray, dict[int, str]]:
    """One layer's array as read, and its damage in the chunks it should be written in (a chunk file
    missing or unreadable, done rows without numbers), each named `layer<n>: ...`."""
    values, broken = _read(store.group[layer_array(layer)], store, np.nan)
    damage = _damage(store, values, broken, status, store.layer_done_chunks(layer), manifest_paths)
    return values, {chunk: f"{layer_array(layer)}: {why}" for chunk, why in damage.items()}


def _damage(store: "EmbeddingStore", values: np.ndarray, broken: set[int], status: np.ndarray, done: np.ndarray,
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


def repair_store(store: "EmbeddingStore", manifest_paths: list[str]) -> dict[int, str]:
    """Mark damaged done chunks undone (the next extraction recomputes exactly those) and rewrite
    the keys from the manifest; returns what was damaged. Damage in a layer array recomputes its
    chunk whole, as damaged embeddings do."""
    rows = read_checked(store, manifest_paths, tuple(store.layer_dims))
    if rows.keys_wrong:
        store.group["keys"][:] = np.array(manifest_paths, dtype=str)
        if rows.damaged.get(0) == "keys do not match the manifest":
            del rows.damaged[0]
            rows.damaged[-1] = "keys rewritten from the manifest"
    for chunk in rows.damaged:
        if chunk >= 0:
            store.group["chunk_done"][chunk] = 0
    return rows.damaged


@dataclass
class StoreInfo:
    path: Path
    dataset: str
    backbone: str
    tag: str | None
    rows: int
    dim: int
    dtype: str
    chunks_done: int
    chunks_total: int
    invalid: list[tuple[str, str]]  # (image key, reason)
    fingerprint_id: str


def describe_store(path: Path) -> StoreInfo:
    """A store's summary; DamagedStore where its metadata or a chunk it reads no longer decodes."""
    store = open_store(path, "iqa extract")
    try:
        chunks_done, invalid = int(store.done_chunks().sum()), store.invalid_rows()
    except Exception as error:  # zarr/numcodecs raise codec-specific errors for a garbled chunk file
        raise DamagedStore(f"{path} is damaged ({type(error).__name__}); `iqa cache verify` names what is wrong") from None
    backbone, _, tag = path.name.removesuffix(".zarr").partition("@")
    return StoreInfo(
        path=path, dataset=path.parent.name, backbone=backbone, tag=tag or None,
        rows=store.n_rows, dim=store.dim, dtype=str(store.embeddings.dtype),
        chunks_done=chunks_done, chunks_total=store.n_chunks,
        invalid=invalid, fingerprint_id=fingerprint_id(store.fingerprint),
    )


def store_dirs(cache: Path) -> list[Path]:
    """Every store folder under a cache (temporaries, dot-names, left out)."""
    return [p for p in sorted(cache.glob("*/*.zarr")) if not p.name.startswith(".")]


def list_stores(cache: Path) -> list[StoreInfo]:
    return [describe_store(p) for p in store_dirs(cache)]


def verify_store(path: Path, rehash: bool = False) -> list[str]:
    """Problems that make a store unusable or unfinished; empty when it is complete and sound.
    `rehash` hashes every image file again instead of trusting an unchanged stat.

    Invalid rows (unreadable images, recorded with their reason) are not problems of the store.
    """
    try:
        store = EmbeddingStore(path)
    except (OSError, ValueError, KeyError) as err:
        return [f"cannot open as an embedding store: {err}"]
    problems = []
    manifest_file = manifest_path(path.parent.parent, path.parent.name)
    if not manifest_file.exists():
        problems.append(f"no manifest at {manifest_file}")
    elif manifest_checksum(path.parent.parent, path.parent.name) != store.fingerprint.get("manifest_sha256"):
        problems.append("stale: the manifest changed since extraction")
    done = store.done_chunks()
    if not done.all():
        problems.append(f"incomplete: {int((~done).sum())} of {store.n_chunks} chunks not written")
    if todo := store.extension_todo():
        problems.append(f"incomplete: layers {store.extending} being added, {len(todo)} of {store.n_chunks} chunks to go; "
                        f"`iqa extract` on this store finishes them")
    try:
        paths = read_manifest(path.parent.parent, path.parent.name).paths
    except (OSError, ValueError, KeyError):  # a missing or broken manifest: no keys to compare against
        paths = None
    rows = read_checked(store, paths, tuple(store.layer_dims))
    if rows.damaged:
        problems.append(f"damaged: {rows.describe(store)}; `iqa extract` on this store recomputes those chunks")
    if stale_layers := layer_pooling_problem(store, "iqa extract"):
        problems.append(f"stale: {stale_layers}")
    if paths is not None and (changes := store.changed_images(read_manifest(path.parent.parent, path.parent.name), rehash)):
        problems.append(f"stale: {describe_changes(changes, paths)}; `iqa extract` on this store recomputes their chunks")
    return problems


def is_h5_export(path: Path) -> bool:
    """Whether `path` is an HDF5 file `export_h5` wrote: it carries the store's fingerprint attributes."""
    try:
        with h5py.File(path, "r") as f:
            return {"fingerprint", "fingerprint_id"} <= set(f.attrs)
    except (OSError, ValueError):  # not HDF5 at all
        return False


def export_h5(store_dir: Path, path: Path, allow_partial: bool = False) -> Path:
    """The store as one HDF5 file (same arrays and names, the `layer<n>` arrays included, fingerprint as
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
        for n, width in store.layer_dims.items():
            f.create_dataset(layer_array(n), data=store.group[layer_array(n)][:], chunks=(rows_per_chunk, width))
        f.create_dataset("keys", data=np.array(store.keys(), dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("status", data=store.status())
        reasons = store.group["reasons"][:].astype(object)
        f.create_dataset("reasons", data=reasons, dtype=h5py.string_dtype())
        f.attrs["fingerprint"] = json.dumps(store.fingerprint, sort_keys=True)
        f.attrs["fingerprint_id"] = fingerprint_id(store.fingerprint)
    return path
