"""t-SNE of a head's last hidden features (Fig. 4, S1, S2), by training the run again from its config.

The results database keeps each run's config, not its weights. A frozen-backbone run is a function
of its config and the cached embeddings (the seed decides split, initialisation, data order and
dropout), and a member of a stack trains as if alone up to float rounding, so the run is trained
again alone and its best SRCC is reported beside the stored one: the figure says how close it came.
LoRA and full fine-tuning runs change the backbone, which the cache does not hold: they are skipped.
"""

import numpy as np
import torch

from iqa.heads.training.grid import Cached, as_read, run_rows, stack_inputs
from iqa.heads.training.config import RunConfig
from iqa.heads.training.trainer import train_stack_model

MAX_POINTS = 1000  # per side (train, test): t-SNE cost grows fast beyond that


def retrained_features(run: dict, train: Cached, test: Cached, device: str = "cpu") -> dict:
    """Train the run again; return its retrained best SRCC and the raw embeddings and head features of
    (at most MAX_POINTS of) its train and test rows, with their targets."""
    config = RunConfig.from_dict(run)
    if config.regime != "frozen":
        raise ValueError(f"a {config.regime} run changed its backbone; only frozen runs retrain from the cache")
    train, test = as_read(config, train, test)
    rows = run_rows(config, train, test)
    data, members = stack_inputs([config], [rows], train, test)
    model, (result,) = train_stack_model(data, members, device=device, **config.trainer_options())
    rng = np.random.default_rng(config.seed)
    out = {"retrained_srcc": result.best_srcc}
    model.eval()
    for side, pool, side_rows in (("train", train, rows[0]), ("test", test, rows[1])):
        side_rows = np.sort(rng.choice(side_rows, min(MAX_POINTS, len(side_rows)), replace=False))
        embeddings = pool.embeddings[side_rows]
        x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
        with torch.no_grad():
            out[side] = (embeddings, model.features(x[None])[0].cpu().numpy(), pool.manifest.targets[side_rows])
    return out


def tsne_2d(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (PCA init, perplexity 30 or less for small sets), reproducible for a seed.

    Exact gradients: at MAX_POINTS or fewer they were faster than Barnes-Hut here (400 points: 3.4 s vs 11 s).
    """
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("t-SNE needs scikit-learn, a dependency of iqa: pip install 'scikit-learn>=1.4'") from None
    perplexity = min(30.0, (len(points) - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", method="exact", random_state=seed)
    return tsne.fit_transform(np.asarray(points, dtype=np.float32))
