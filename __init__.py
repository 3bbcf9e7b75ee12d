"""iqa: no-reference image quality assessment on foundation backbones.

Two stages: `iqa.extract` runs a backbone once over a dataset and stores pooled embeddings in
the Zarr cache (`iqa.cache`); `iqa.heads` trains the paper's MLP heads from that cache, many
at once, and the same head code serves end-to-end fine-tuning.
"""

__version__ = "0.1.0"


def load_model(folder, device: str = "cpu", source: str | None = None):
    """The model in an `iqa export` folder (backbone + head, a fine-tuned backbone's tuning applied) with
    `.score(images)` and `.embed(images)`; `source` is where to find the base weights if not where training found them."""
    from iqa.heads.saved.model import load_model as load  # imported on use: torch and the backbones are slow to import

    return load(folder, device, source)
