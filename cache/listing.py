"""The stores of a cache, each described in one record (`iqa list`)."""

from dataclasses import dataclass
from pathlib import Path

from iqa.cache.store import EmbeddingStore, fingerprint_id


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
    store = EmbeddingStore(path)
    backbone, _, tag = path.name.removesuffix(".zarr").partition("@")
    return StoreInfo(
        path=path, dataset=path.parent.name, backbone=backbone, tag=tag or None,
        rows=store.n_rows, dim=store.dim, dtype=str(store.embeddings.dtype),
        chunks_done=int(store.done_chunks().sum()), chunks_total=store.n_chunks,
        invalid=store.invalid_rows(), fingerprint_id=fingerprint_id(store.fingerprint),
    )


def store_dirs(cache: Path) -> list[Path]:
    """Every store folder under a cache (temporaries, dot-names, left out)."""
    return [p for p in sorted(cache.glob("*/*.zarr")) if not p.name.startswith(".")]


def list_stores(cache: Path) -> list[StoreInfo]:
    return [describe_store(p) for p in store_dirs(cache)]
