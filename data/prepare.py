"""`iqa data prepare` and `iqa data show` as library calls: run an adapter, check, write, summarise.

A manifest is written only after every check passed, and atomically, so a failed prepare
leaves an earlier manifest of the same dataset byte-identical.
"""

import inspect
import os
from collections import Counter
from pathlib import Path

import numpy as np

from iqa.data.adapters import ADAPTERS
from iqa.cache.location import UnsafeName, dataset_name
from iqa.cache.manifest import Manifest, read_manifest, write_manifest
from iqa.data.readers import DatasetError
from iqa.data.splits import SPLIT_RULES, SplitBy, split_indices
from iqa.errors import SettingError

SHOWN = 5  # how many offending names an error message lists


def _listing(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(repr(n) for n in names[:SHOWN]) + more


def _as_settings(options) -> str:
    """Adapter options as settings (errors.py: `image_col`, the flag --image-col on the command line)."""
    return ", ".join(f"`{option}`" for option in sorted(options)) or "no options"


def drop_known_duplicates(manifest: Manifest, known: frozenset[str]) -> tuple[Manifest, list[str]]:
    """Keep the first row of each name the release is known to repeat by mistake; warn about each."""
    rows_of: dict[str, list[int]] = {}
    for row, path in enumerate(manifest.paths):
        rows_of.setdefault(path, []).append(row)
    repeated = {path: rows for path, rows in rows_of.items() if path in known and len(rows) > 1}
    if not repeated:
        return manifest, []
    warnings = [
        f"{manifest.dataset}: {path!r} is listed {len(rows)} times in the release "
        f"(scores {', '.join(f'{manifest.scores[r]:g}' for r in rows)}); kept the first"
        for path, rows in repeated.items()
    ]
    dropped = {r for rows in repeated.values() for r in rows[1:]}
    keep = [r for r in range(len(manifest)) if r not in dropped]
    kept = Manifest(
        dataset=manifest.dataset,
        image_root=manifest.image_root,
        paths=[manifest.paths[r] for r in keep],
        scores=manifest.scores[keep],
        targets=manifest.targets[keep],
        score_scale=manifest.score_scale,
        groups=[manifest.groups[r] for r in keep] if manifest.groups is not None else None,
        extras={name: [column[r] for r in keep] for name, column in manifest.extras.items()},
        sources=manifest.sources,
    )
    return kept, warnings


def check_manifest(manifest: Manifest) -> None:
    """Raise DatasetError on an unsafe dataset name, NaN or out-of-range scores, paths outside the
    image folder, duplicate names (two spellings of one file too) or missing images."""
    paths, scores, targets = manifest.paths, manifest.scores, manifest.targets
    not_finite = np.flatnonzero(~np.isfinite(scores))
    if len(not_finite):
        raise DatasetError(f"{len(not_finite)} score(s) are NaN or empty: {_listing([paths[i] for i in not_finite])}")
    outside = np.flatnonzero((targets < 0) | (targets > 1))
    if len(outside):
        found = [f"{paths[i]}={scores[i]:g}" for i in outside]
        raise DatasetError(f"{len(outside)} score(s) outside the scale [{manifest.score_scale}]: {_listing(found)}")
    try:
        dataset_name(manifest.dataset, "dataset name")
    except UnsafeName as error:
        raise DatasetError(f"{error} (`name`)") from None
    escaping = [p for p in paths if os.path.isabs(p) or os.path.normpath(p).split(os.sep)[0] == ".."]
    if escaping:
        raise DatasetError(f"{len(escaping)} image path(s) lead outside the image folder: {_listing(escaping)}; "
                           "list images relative to it")
    duplicates = sorted(path for path, times in Counter(os.path.normpath(p) for p in paths).items() if times > 1)
    if duplicates:
        raise DatasetError(f"{len(duplicates)} image name(s) listed more than once: {_listing(duplicates)} "
                           "(two spellings of one file, e.g. ./a.png and a.png, count as one name)")
    root = manifest.image_root
    missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
    if missing:
        nowhere = "; if they sit in a sub-folder of the root, name it with `images` SUB" if len(missing) == len(paths) else ""
        raise DatasetError(f"{len(missing)} of {len(paths)} listed images are missing under {root}: {_listing(missing)}{nowhere}")


def count_warnings(manifest: Manifest, release_count: int | None) -> list[str]:
    if release_count is None or len(manifest) == release_count:
        return []
    difference = len(manifest) - release_count
    return [
        f"{manifest.dataset}: {len(manifest):,} images, the release has {release_count:,} "
        f"({abs(difference):,} {'more' if difference > 0 else 'fewer'})"
    ]


def prepare_dataset(name: str, root: Path, cache: Path, /, **adapter_options) -> tuple[Manifest, Path, list[str]]:
    """Read dataset `name` under `root`, check it, write its manifest; returns (manifest, path, warnings)."""
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[name]
    accepted = set(inspect.signature(adapter.load).parameters) - {"root"}
    unknown = sorted(set(adapter_options) - accepted)
    if unknown:
        raise DatasetError(f"{name} does not take {_as_settings(unknown)}; it takes {_as_settings(accepted)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root is not a folder: {root}")
    manifest = adapter.load(root.resolve(), **adapter_options)
    manifest, warnings = drop_known_duplicates(manifest, adapter.known_duplicates)
    check_manifest(manifest)
    warnings += count_warnings(manifest, adapter.release_count)
    return manifest, write_manifest(manifest, Path(cache)), warnings


def summarise_dataset(cache: Path, name: str, seeds: tuple[int, ...] | list[int], split_by: SplitBy = "random") -> dict:
    """`dataset_summary` of the dataset `name` prepared in `cache`; an unknown split rule is refused before anything is read."""
    if split_by not in SPLIT_RULES:
        raise SettingError(f"`split_by` must be {', '.join(SPLIT_RULES)}, got {split_by!r}")
    return dataset_summary(read_manifest(cache, name), seeds, split_by)


def dataset_summary(manifest: Manifest, seeds: tuple[int, ...] | list[int], split_by: SplitBy = "random") -> dict:
    """Counts, score and target ranges, and the train/test sizes of each seed's split."""
    if split_by == "group" and manifest.groups is None:
        raise DatasetError(f"{manifest.dataset} has no content groups; use `split_by` random")
    splits = {}
    for seed in seeds:
        train, test = split_indices(manifest.paths, seed, by=split_by, groups=manifest.groups,
                                    sets=manifest.extras.get("set"))
        splits[str(seed)] = {"train": len(train), "test": len(test)}
    return {
        "dataset": manifest.dataset,
        "count": len(manifest),
        "image_root": manifest.image_root,
        "score_scale": manifest.score_scale,
        "score_min": float(manifest.scores.min()),
        "score_max": float(manifest.scores.max()),
        "target_min": float(manifest.targets.min()),
        "target_max": float(manifest.targets.max()),
        "target_mean": float(manifest.targets.mean()),
        "groups": len(set(manifest.groups)) if manifest.groups is not None else None,
        "extras": sorted(manifest.extras),
        "sources": manifest.sources,
        "split_by": split_by,
        "splits": splits,
    }
