"""A tuned run's head features for the report's t-SNE (Figs. 4, S1, S2): kept beside its weights.

A cached run's features are recomputed by training it again on its stored embeddings
(heads/report/tsne.py); a tuned run cannot be retrained in a report, so the epoch it keeps leaves
`<database folder>/runs/<key>/features.npz`: its test rows, their targets, the pooled embeddings the
head read and the head's last hidden features, all from the evaluation pass of that epoch.
"""

from pathlib import Path

import numpy as np

from iqa.cache.atomic import atomic_path

FEATURES_FILE = "features.npz"


def save_features(kept: Path, rows: np.ndarray, targets: np.ndarray, features: dict[str, np.ndarray]) -> Path:
    """The kept epoch's test rows, their targets, embeddings and head features: `<kept>/features.npz`
    (`tuned_features` reads it back), for the report's t-SNE of tuned runs (Figs. 4, S1, S2)."""
    with atomic_path(kept / FEATURES_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, rows=rows, targets=targets, **features)
    return kept / FEATURES_FILE


def tuned_features(kept: Path) -> dict[str, np.ndarray] | None:
    """What `save_features` kept for a tuned run, or None where it kept nothing (a cached run, an older run)."""
    path = Path(kept) / FEATURES_FILE
    if not path.is_file():
        return None
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}
