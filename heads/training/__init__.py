"""The training core: one run's config and key, loss, metrics, epoch selection, the stacked trainer, and grids
of runs (local or on Ray). Fine-tuning trains its one head through the same core."""
