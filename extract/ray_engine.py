"""`iqa extract --engine ray`: the local engine's store, filled by a Ray cluster.

Ray Data runs the pipeline. Its items are the store's unfinished chunks, each carrying its row
indices and image paths (rows of finished chunks are never read); CPU tasks decode a chunk into
one block of model inputs; an actor pool embeds (one GPU share per actor when the cluster has GPUs,
else CPU actors), and the driver writes each whole chunk with `EmbeddingStore.write_block`. The
driver is the only writer, so the store's rules hold unchanged: a chunk is marked done only after
its block is written; an actor that dies is restarted by Ray and its chunk retried (Ray Data's
defaults for actor pools: restart and retry without limit; tasks are retried too); a killed
driver loses only chunks in flight, which the next run computes. Actors embed through the same
`Embedder`, in the same batches of a chunk as the local loop, so the numbers are the local ones.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from iqa.extract.backbones import load_backbone, weights_sha256
from iqa.extract.registry import BackboneSpec, get_spec
from iqa.extract.run import (
    COMPUTE_DTYPES, Embedder, ExtractRequest, ExtractSummary, ImageRows, compute_dtype_for, default_batch_size, open_extraction,
)
from iqa.errors import SettingError

FAIL_ONCE_ENV = "IQA_RAY_FAIL_ONCE"  # fault injection for tests: a folder of chunk-<i> marker files


def connect(address: str | None = None, **init_options):
    """Join the cluster at `address` ("auto" for the running one), or start a local one; returns ray."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the Ray engine needs Ray: pip install 'iqa[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=address, **init_options)
    return ray


def decode_chunk(item: dict, spec: BackboneSpec, image_root: str) -> dict:
    """A CPU task: one chunk's images -> its stacked model inputs and per-row reasons (JSON); `spec`
    at the loaded checkpoint's geometry (resolution, resample, crop), as the driver found it."""
    images = ImageRows(Path(image_root), list(item["paths"]), spec)
    decoded = [images[i] for i in range(len(images))]
    return {
        "chunk": item["chunk"],
        "inputs": torch.stack([inputs for _, inputs, _, _ in decoded]).numpy(),
        "reasons": json.dumps([reason for _, _, reason, _ in decoded]),
        "stamps": torch.stack([stamp for _, _, _, stamp in decoded]).numpy(),
    }


class EmbedChunks:
    """An actor holding one copy of the backbone; refuses weights other than the driver's fingerprint."""

    def __init__(self, backbone: str, source: str | None, weights: str, resolution: int | None,
                 preprocess: str, device: str, compute_dtype: str, checksum: str, dim: int, batch_size: int):
        model = load_backbone(get_spec(backbone, weights), source=source, weights=weights,
                              resolution=resolution, preprocess=preprocess)
        if weights_sha256(model) != checksum:
            raise RuntimeError(f"this worker loaded other {backbone} weights than the driver fingerprinted")
        self.embedder = Embedder(model.spec, model, device, COMPUTE_DTYPES[compute_dtype])
        self.dim, self.batch_size = dim, batch_size

    def __call__(self, item: dict) -> dict:
        fail_if_asked(int(item["chunk"]))
        reasons = json.loads(item["reasons"])
        inputs = torch.from_numpy(np.array(item["inputs"]))  # a writable copy
        embeddings = self.embedder.chunk(inputs, reasons, self.dim, self.batch_size)
        return {"chunk": item["chunk"], "embeddings": embeddings, "reasons": item["reasons"], "stamps": item["stamps"]}


def fail_if_asked(chunk: int) -> None:
    """Kill this worker process once for a chunk whose marker file exists (tests of Ray's retries)."""
    folder = os.environ.get(FAIL_ONCE_ENV)
    marker = Path(folder) / f"chunk-{chunk}" if folder else None
    if marker is not None and marker.exists():
        marker.unlink()
        os._exit(1)


def actor_pool(cluster: dict, gpus_per_actor: float) -> tuple[int, dict]:
    """(number of actors, resources of each): one per GPU share, else one per CPU.

    GPU actors leave the CPUs to the decode tasks; on a CPU-only cluster Ray fuses the decode into
    the CPU actors (same resources), so each actor decodes and embeds its chunk.
    """
    gpus = cluster.get("GPU", 0)
    if gpus:
        return max(1, int(gpus // gpus_per_actor)), {"num_gpus": gpus_per_actor}
    return max(1, int(cluster.get("CPU", 1))), {"num_cpus": 1}


def extract_with_ray(
    request: ExtractRequest, address: str | None = None, actors: int | None = None, gpus_per_actor: float = 1.0
) -> ExtractSummary:
    """Fill (or finish) the store `extract_dataset(request)` would fill, with Ray Data on the cluster at
    `address` (or a local one), with `actors` embedding actors (default: one per GPU share, else per CPU).

    The request's shard takes the chunks the local engine's shard takes, so several drivers (or both
    engines) can fill one store on a shared filesystem.
    """
    if request.adapter is not None:
        raise ValueError("tuned backbones (adapter runs) are extracted by the local engine")
    if request.layers is not None:
        raise SettingError("`layers` runs on the local engine: drop `engine` ray")
    ray = connect(address)
    pool_size, resources = actor_pool(ray.cluster_resources(), gpus_per_actor)
    device = "cuda" if "num_gpus" in resources else "cpu"
    compute_dtype = compute_dtype_for(device, request.dtype)
    # The driver fingerprints on its CPU at the actors' compute dtype; it never embeds a real image.
    job = open_extraction(request, "cpu", compute_dtype)
    store = job.store
    if store.layer_dims:  # the actors compute the default embedding only
        raise ValueError(f"{store.path} holds layers {list(store.layer_dims)}; it is filled by the local engine: drop `engine` ray")
    todo = job.todo()
    items = [
        {"chunk": c, "rows": list(store.rows_of_chunk(c)), "paths": [job.paths[r] for r in store.rows_of_chunk(c)]}
        for c in todo
    ]
    start = time.perf_counter()
    rows_computed, chunks_written = 0, 0
    if items:
        data = ray.data.from_items(items, override_num_blocks=len(items))  # one block per chunk
        r = request
        data = data.map(decode_chunk, fn_kwargs=dict(spec=job.spec, image_root=str(job.image_root)), num_cpus=1)
        data = data.map(
            EmbedChunks,
            fn_constructor_kwargs=dict(
                backbone=r.backbone, source=r.source, weights=r.weights,
                resolution=r.resolution, preprocess=r.preprocess, device=device,
                compute_dtype=str(compute_dtype).removeprefix("torch."), checksum=job.fingerprint["weights_sha256"],
                dim=job.dim, batch_size=r.batch_size or default_batch_size(device),
            ),
            compute=ray.data.ActorPoolStrategy(size=actors or pool_size),
            **resources,
        )
        with tqdm(total=sum(len(i["rows"]) for i in items), unit="img", desc=f"{r.dataset} (ray)", disable=not r.progress) as bar:
            for done in data.iter_rows():
                reasons = json.loads(done["reasons"])
                store.write_block(int(done["chunk"]), np.asarray(done["embeddings"]), reasons, np.asarray(done["stamps"]))
                rows_computed += len(reasons)
                chunks_written += 1
                bar.update(len(reasons))
    return job.summary(rows_computed, chunks_written, time.perf_counter() - start)
