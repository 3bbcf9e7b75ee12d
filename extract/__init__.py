"""Embedding extraction: backbones run once per dataset, pooled embeddings stored in the cache."""
