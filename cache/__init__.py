"""The embedding cache: where prepared manifests and per-backbone Zarr stores live."""
