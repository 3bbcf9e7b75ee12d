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
- `map<n>` (N, S*S*C_n), only in stores extracted with `iqa extract --layers ... --spatial S` (the
  fingerprint's `spatial` is S): for every stored layer, its map [C_n, H, W] average-pooled to S x S
  (adaptive, as torch's adaptive_avg_pool2d), the positions row-major and each position's C_n channels
  together: row i reshapes to [S*S, C_n]. A token model's map is its patch grid (prefix tokens left
  out). Float16 by default: Swin-B's four stages at S = 7 are 94,080 numbers a row, KonIQ-10k's
  10,073 rows 1.9 GB.
- `extension_done` (N_chunks,) uint8, only while layers (or maps) are being added to a finished store
  (the attribute `extending` names them: a layer by its number, a map by its array's name): set per chunk once those layers' rows are written (the other
  arrays of a done chunk are left as they are). When every chunk has it, the attribute and the
  array go: the layers are then the store's like any other.
- attributes: `fingerprint` (what produced the numbers), `fingerprint_id`, `chunk_rows`.

Writers only ever write whole chunk-aligned row blocks (Zarr v3 loses rows when two writers
share a chunk), and Zarr's local store writes each chunk file atomically, so any number of
processes may fill disjoint chunks of one store and a killed one leaves no half-written chunk.

A store may also live under an fsspec URL (Zarr's FsspecStore; see cache/location.py): the same
fingerprint and resume rules apply. Object stores put each chunk object whole; they have no
atomic rename, so there a new store is built aside and moved by one process (the Ray driver).

This module is the store itself (its layout, fingerprint and the class that reads and writes it); around it:
`create` makes or reopens one for writing, `integrity` checks and repairs its chunks, `load` reads one for
training, `verify` says what is wrong with one, `listing` lists a cache's, `export_h5` writes one as HDF5.
"""

import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import zarr

from iqa.cache.location import backbone_label, dataset_dir, is_url, plain_name
from iqa.errors import SettingError
from iqa.cache.manifest import Manifest
from iqa.cache.stamps import WIDTH as STAMP_WIDTH
from iqa.cache.stamps import changed_images

STORE_FORMAT = 1
DEFAULT_CHUNK_ROWS = 256
PENDING, DONE, INVALID = 0, 1, 2


class FingerprintMismatch(ValueError):
    """The store was built by something else; the message names the differing fields."""


class IncompleteStore(ValueError):
    """Rows of the store are not computed yet."""


class StaleStore(ValueError):
    """Images changed since their rows were computed."""


class DamagedStore(ValueError):
    """Chunks recorded as done do not hold what a finished chunk holds."""


def store_path(root: Path | str, dataset: str, backbone: str, tag: str | None = None) -> Path | str:
    """The store's location under a cache (or store root URL): a Path, or a URL string."""
    name = backbone_label(plain_name(backbone, "backbone"), None if tag is None else plain_name(tag, "tag"))
    return f"{dataset_dir(root, dataset)}/{name}.zarr" if is_url(root) else dataset_dir(root, dataset) / f"{name}.zarr"


def extract_command(backbone: str, dataset: str, tag: str | None) -> str:
    """The `iqa extract` command that makes (or resumes) a store: the untrained models' tags are
    the weights that make them (`--tag tiny` is refused: it would embed with the pretrained weights)."""
    from iqa.extract.registry import WEIGHTS  # the backbone table (PIL, scipy): only when a command is named

    model = f" --weights {tag}" if tag in WEIGHTS[1:] else f" --tag {tag}" if tag else ""
    return f"iqa extract --backbone {backbone} --dataset {dataset}{model}"


def store_exists(path: Path | str) -> bool:
    if is_url(path):
        fs, where = fsspec.core.url_to_fs(path)
        return fs.exists(where)
    return Path(path).exists()


def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


# Added to a store in place: which layers (and maps) a store holds changes no number a run reads
GROWN_FIELDS = ("layers", "spatial")


def embedding_fingerprint_id(fingerprint: dict) -> str:
    """The id results are keyed on: the fingerprint without the fields a store grows (`layers`, `spatial`).
    Layers and maps are added to a store in place, and a run on them names its own in its config, so
    adding them keeps every finished run's key."""
    return fingerprint_id({k: v for k, v in fingerprint.items() if k not in GROWN_FIELDS})


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
        self.map_side: int | None = self.fingerprint.get("spatial")  # every stored layer has its map where set
        self.map_dims: dict[int, int] = {n: self.group[map_array(n)].shape[1] for n in self.layer_dims} if self.map_side else {}
        # layers (by number) and maps (by array name) being added (add_layers)
        self.extending: list[int | str] = list(self.group.attrs.get("extending", []))
        self.n_rows, self.dim = self.embeddings.shape
        self.n_chunks = -(-self.n_rows // self.chunk_rows)

    def rows_of_chunk(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows))

    def done_chunks(self) -> np.ndarray:
        return self.group["chunk_done"][:].astype(bool)

    @property
    def arrays(self) -> dict[str, int]:
        """The row-aligned arrays beside `embeddings` (name -> width) in the order a written row holds them:
        each layer's vector, then each layer's map."""
        return row_arrays(self.layer_dims, self.map_dims)

    def _extending_arrays(self) -> set[str]:
        return {layer_array(e) if isinstance(e, int) else e for e in self.extending}

    def array_done_chunks(self, name: str) -> np.ndarray:
        """The chunks whose rows of array `name` are written: the done chunks, and, while the array is
        being added, only those the extension has reached."""
        done = self.done_chunks()
        return done & self.group["extension_done"][:].astype(bool) if name in self._extending_arrays() else done

    def extension_todo(self) -> list[int]:
        """Done chunks still without the layers being added: only those layers are computed for them."""
        if not self.extending:
            return []
        return np.flatnonzero(self.done_chunks() & ~self.group["extension_done"][:].astype(bool)).tolist()

    def add_layers(self, layer_dims: dict[int, int], map_dims: dict[int, int] | None = None, side: int | None = None) -> None:
        """Extend the store in place with new layer arrays (layer -> width) and maps (layer -> S*S*C at
        side S); the fingerprint then lists the union (and `spatial` S). Done chunks keep their rows, the
        new arrays are filled by `write_layers`.

        Crash-safe in this order: arrays first (a leftover of a killed call is recreated here), then
        one metadata write that names them. One extension at a time."""
        if self.extending:
            raise FingerprintMismatch(
                f"{self.path} is still adding layers {self.extending}; run the same `iqa extract` without "
                f"new layers to finish that, then add {list(layer_dims)}")
        check_layer_pooling(self, "iqa extract ...")  # new layers beside old-rule ones would mix two rules
        map_dims = map_dims or {}
        create_row_arrays(self.group, row_arrays(layer_dims, map_dims), self.n_rows, self.chunk_rows, self.embeddings.dtype, overwrite=True)
        self.group.create_array("extension_done", shape=(self.n_chunks,), dtype="uint8", chunks=(1,), fill_value=0,
                                overwrite=True)
        fingerprint = {**self.fingerprint, "layers": list(self.layer_dims) + list(layer_dims),
                       **({"spatial": side} if map_dims else {})}
        extending = list(layer_dims) + [map_array(n) for n in map_dims]
        self.group.attrs.update({"fingerprint": fingerprint, "fingerprint_id": fingerprint_id(fingerprint),
                                 "extending": extending, "layer_pooling": LAYER_POOLING})
        self.fingerprint, self.extending = fingerprint, extending
        self.layer_dims = {**self.layer_dims, **layer_dims}
        self.map_side, self.map_dims = fingerprint.get("spatial"), {**self.map_dims, **map_dims}

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

    def undo_chunks_of(self, rows, among: set[int] | None = None) -> list[int]:
        """Mark the chunks holding `rows` not done (those `among` a shard's own, where given), so the next
        extraction recomputes them."""
        chunks = sorted({int(row) // self.chunk_rows for row in rows} & (among if among is not None else set(range(self.n_chunks))))
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
        width = self.row_width  # the default embedding, then each layer's vector and map
        if embeddings.shape != (len(rows), width) or len(reasons) != len(rows):
            raise ValueError(f"chunk {chunk} needs {len(rows)} rows of {width}, got {embeddings.shape}")
        block = np.where(bad[:, None], np.nan, embeddings)
        self.embeddings[rows.start : rows.stop] = block[:, : self.dim].astype(self.embeddings.dtype)
        self._write_arrays(rows, block, self.arrays)
        self.group["status"][rows.start : rows.stop] = np.where(bad, INVALID, DONE).astype(np.uint8)
        self.group["reasons"][rows.start : rows.stop] = np.array(reasons, dtype=str)
        if stamps is not None:
            kept = self.group["image_stamps"]  # an older store keeps the first 3 columns
            kept[rows.start : rows.stop] = np.asarray(stamps, dtype=np.int64)[:, : kept.shape[1]]
        self.group["chunk_done"][chunk] = 1  # last: only now is this block done work
        if self.extending:
            self.group["extension_done"][chunk] = 1

    @property
    def row_width(self) -> int:
        """A whole row as `write_block` takes it: the default embedding, then every array of `arrays`."""
        return self.dim + sum(self.arrays.values())

    def _write_arrays(self, rows: range, block: np.ndarray, names) -> None:
        """The `names` among `arrays` from whole rows `block` (their columns in `arrays`' order)."""
        start = self.dim
        for name, width in self.arrays.items():
            if name in names:
                self.group[name][rows.start : rows.stop] = block[:, start : start + width].astype(self.embeddings.dtype)
            start += width

    def write_layers(self, chunk: int, embeddings: np.ndarray) -> None:
        """The layers being added, for one done chunk; `embeddings` are whole rows as `write_block` takes
        them. Their default embedding is checked against the stored one first: layers computed by a
        model that does not give the stored numbers would not belong to them."""
        rows = self.rows_of_chunk(chunk)
        width = self.row_width
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
        self._write_arrays(rows, np.where(~done[:, None], np.nan, embeddings), self._extending_arrays())
        try:
            self.group["extension_done"][chunk] = 1  # last, as chunk_done in write_block
        except (KeyError, FileNotFoundError):  # a concurrent extraction finished the extension: every chunk holds the layers
            pass


# A recomputed default embedding may differ from the stored one by float16 rounding (~5e-4) and by
# bf16 autocast in other batch shapes (~3e-3); a different model or image is far beyond this.
LAYER_CHECK_TOLERANCE = 2e-2


def layer_array(layer: int) -> str:
    return f"layer{layer}"


def map_array(layer: int) -> str:
    return f"map{layer}"


def row_arrays(layer_dims: dict[int, int], map_dims: dict[int, int]) -> dict[str, int]:
    """Array name -> width for layers' vectors (layer -> width) then their maps (layer -> S*S*C), as rows hold them."""
    return {layer_array(n): w for n, w in layer_dims.items()} | {map_array(n): w for n, w in map_dims.items()}


def check_map_side(side) -> int:
    """`spatial`, the side of the stored maps: a positive whole number (SMART-IQA's 7)."""
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise SettingError(f"`spatial` is the maps' side, a positive whole number (SMART-IQA's 7); got {side!r}")
    return side


def create_row_arrays(group, widths: dict[str, int], n_rows: int, chunk_rows: int, dtype, overwrite: bool = False) -> None:
    """Row-aligned arrays (name -> width) of NaN, chunked as the embeddings are."""
    for name, width in widths.items():
        group.create_array(name, shape=(n_rows, width), dtype=dtype, chunks=(chunk_rows, width), fill_value=np.nan,
                           overwrite=overwrite)


# What a `layer<n>` row holds (extract/backbones.pool_layer, extract/timm_tower.TimmTap): kept in the store's
# attributes beside its layer arrays and in the recipe of runs on layers, so layers pooled by another rule
# are refused, not read as these, and runs on them are keyed apart.
LAYER_POOLING = "stage maps: global average; tokens: patch-token mean, then the class token where the model has one"
# What a `map<n>` row holds (extract/backbones.layer_map): in the recipe of runs on maps.
MAP_POOLING = "stage maps, or token models' patch grids after their final norm: adaptive average to S x S, positions row-major"


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


def open_store(path: Path | str, command: str) -> EmbeddingStore:
    try:
        return EmbeddingStore(path)
    except (ValueError, OSError, KeyError) as error:
        if "not an iqa embedding store" in str(error):
            raise
        raise DamagedStore(f"{path} is damaged, its metadata unreadable ({error}); `{command} --overwrite` rebuilds it") from None
