"""The manifest: one row per image, the contract between `iqa data` and every later stage.

A manifest is written once by a dataset adapter to `<cache>/<dataset>/manifest.json` and read
by the extractor and the trainers. Targets are always in [0, 1] with higher meaning better, so
every later stage can ignore how each dataset happened to publish its scores.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iqa.cache.atomic import atomic_path
from iqa.cache.location import dataset_dir

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    dataset: str
    image_root: str  # absolute folder that `paths` are relative to (stored relative to the cache when inside it)
    paths: list[str]  # relative image paths, unique, the row order of every embedding store
    scores: np.ndarray  # raw score as released
    targets: np.ndarray  # in [0, 1], higher is better
    score_scale: str  # how raw scores became targets, e.g. "MOS 1-5, target = y/5"
    groups: list[str] | None = None  # content group (e.g. KADID-10k reference image)
    extras: dict[str, list] = field(default_factory=dict)  # adapter-specific columns
    sources: dict[str, str] = field(default_factory=dict)  # label file name -> sha256

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.targets = np.asarray(self.targets, dtype=np.float64)
        n = len(self.paths)
        columns = {"scores": len(self.scores), "targets": len(self.targets)}
        if self.groups is not None:
            columns["groups"] = len(self.groups)
        columns.update({f"extras[{k}]": len(v) for k, v in self.extras.items()})
        wrong = {k: v for k, v in columns.items() if v != n}
        if wrong:
            raise ValueError(f"manifest columns must all have {n} rows, got {wrong}")

    def __len__(self) -> int:
        return len(self.paths)

    def to_json(self, stored_root: str | None = None) -> str:
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "dataset": self.dataset,
                "image_root": self.image_root if stored_root is None else stored_root,
                "score_scale": self.score_scale,
                "sources": self.sources,
                "paths": self.paths,
                "scores": self.scores.tolist(),
                "targets": self.targets.tolist(),
                "groups": self.groups,
                "extras": self.extras,
            },
            indent=None,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        raw = json.loads(text)
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format {raw.get('format')!r}")
        return cls(
            dataset=raw["dataset"],
            image_root=raw["image_root"],
            paths=raw["paths"],
            scores=np.array(raw["scores"]),
            targets=np.array(raw["targets"]),
            score_scale=raw["score_scale"],
            groups=raw["groups"],
            extras=raw["extras"],
            sources=raw["sources"],
        )


def manifest_path(cache: Path, dataset: str) -> Path:
    return dataset_dir(cache, dataset) / MANIFEST_FILE


def write_manifest(manifest: Manifest, cache: Path) -> Path:
    """Write atomically: a crash or a failed prepare leaves any earlier manifest intact."""
    target = manifest_path(cache, manifest.dataset)
    text = manifest.to_json(stored_root(manifest.image_root, Path(cache), target))
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target


def stored_root(image_root: str, cache: Path, target: Path) -> str:
    """How the manifest spells its image folder: relative to the cache where the images live inside it, so a
    copied or moved cache (`cp -a`) finds its own images and keeps its stores; absolute otherwise. A manifest
    already on disk that spells the same folder absolutely keeps doing so: its stores' fingerprints hold its bytes."""
    root, cache = Path(image_root), Path(cache).resolve()
    if not root.is_relative_to(cache):
        return image_root
    try:
        if json.loads(target.read_text())["image_root"] == image_root:
            return image_root
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: written anew
        pass
    return root.relative_to(cache).as_posix()


def read_manifest(cache: Path, dataset: str) -> Manifest:
    path = manifest_path(cache, dataset)
    if not path.exists():
        raise FileNotFoundError(
            f"no manifest for dataset {dataset!r} at {path}; run `iqa data prepare {dataset} --root DIR` first"
        )
    try:
        manifest = Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # a truncated or hand-edited file
        raise ValueError(f"{path} is damaged ({type(error).__name__}: {error}); "
                         f"run `iqa data prepare {dataset} --root DIR` again to rewrite it") from None
    if not len(manifest):
        raise ValueError(f"{path} lists no images; run `iqa data prepare {dataset} --root DIR` again to rewrite it")
    if not Path(manifest.image_root).is_absolute():  # images inside the cache: wherever the cache now is
        manifest.image_root = str(Path(cache).resolve() / manifest.image_root)
    return manifest


def manifest_checksum(cache: Path, dataset: str) -> str:
    """sha256 of the manifest file: embedding stores record it to know when they are stale."""
    return file_sha256(manifest_path(cache, dataset))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
