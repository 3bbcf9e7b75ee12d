"""The one table of dataset adapters: adding a dataset is adding one entry here.

An adapter is a module with `load(root, images=None, **options) -> Manifest`, which reads the
label files under `root` exactly as released, and `RELEASE_COUNT`, the number of images the
release has (None when there is none to compare with). An adapter whose release repeats some
names by mistake may list them in `KNOWN_DUPLICATES`: `prepare` keeps their first row and warns.
"""

from types import ModuleType

from iqa.data import agiqa1k, agiqa3k, agiqa3k_align, clive, custom_csv, flive, kadid10k, koniq10k, spaq

ADAPTERS: dict[str, ModuleType] = {
    "koniq10k": koniq10k,
    "clive": clive,
    "kadid10k": kadid10k,
    "flive": flive,
    "spaq": spaq,
    "agiqa1k": agiqa1k,
    "agiqa3k": agiqa3k,
    "agiqa3k-align": agiqa3k_align,
    "csv": custom_csv,
}
