"""The stores of a cache, each described in one record (`iqa list`)."""

from dataclasses import dataclass
from pathlib import Path

from iqa.cache.store import DamagedStore, fingerprint_id, open_store


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
    layers: list[int]  # stored layers (`iqa extract --layers`), in the store's order
    map_side: int | None  # their S x S maps' side (`--spatial`), None without maps


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
        layers=list(store.layer_dims), map_side=store.map_side,
    )


def store_dirs(cache: Path) -> list[Path]:
    """Every store folder under a cache (temporaries, dot-names, left out)."""
    return [p for p in sorted(cache.glob("*/*.zarr")) if not p.name.startswith(".")]


def list_stores(cache: Path) -> list[StoreInfo]:
    return [describe_store(p) for p in store_dirs(cache)]
