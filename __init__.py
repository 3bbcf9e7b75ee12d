"""iqa: no-reference image quality assessment on foundation backbones.

Two stages: `iqa.extract` runs a backbone once over a dataset and stores pooled embeddings in
the Zarr cache (`iqa.cache`); `iqa.heads` trains the paper's MLP heads from that cache, many
at once, and the same head code serves end-to-end fine-tuning.

The public names below import their modules on use, so `import iqa` stays cheap.
"""

__version__ = "0.1.0"  # the package's version: pyproject.toml reads it from here


def load_model(folder, device: str = "cpu", source: str | None = None):
    """The model in an `iqa export` folder (backbone + head, a fine-tuned backbone's tuning applied) with
    `.score(images)` and `.embed(images)`; `source` is where to find the base weights if not where training found them."""
    from iqa.heads.saved.model import load_model as load  # imported on use: torch and the backbones are slow to import

    return load(folder, device, source)


def list_backbones() -> list[str]:
    """The backbone keys `iqa extract --backbone` takes (extract/registry.py), in the registry's order."""
    from iqa.extract.registry import BACKBONES

    return list(BACKBONES)


def list_datasets() -> list[str]:
    """The dataset adapters `iqa data prepare` takes (data/adapters.py), `csv` for a label file of one's own."""
    from iqa.data.adapters import ADAPTERS

    return list(ADAPTERS)
