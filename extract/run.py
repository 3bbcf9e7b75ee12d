"""The extraction loop: every image of a prepared dataset through one backbone, into its store.

Decoding and resizing run in DataLoader worker processes while the main process runs the model.
Work is organised by store chunk: the batches of a chunk are gathered and written as one whole
row block, and only chunks not yet marked done are visited, so a killed run (SIGKILL included)
resumes where it stopped and ends with exactly the numbers an uninterrupted run gives (a chunk
is always split into the same batches). `shard=(i, n)` takes chunks i, i+n, i+2n, ... so n
processes can fill one store. Unreadable images never stop the run: their rows are marked
invalid with the reason.
"""

import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from iqa.cache.stamps import describe_changes
from iqa.cache.create import open_for_writing
from iqa.cache.integrity import repair_store
from iqa.cache.store import DEFAULT_CHUNK_ROWS, EmbeddingStore, check_map_side, fingerprint_id, store_path
from iqa.cache.manifest import manifest_checksum, read_manifest
from iqa.extract.backbones import PooledBackbone, checkpoint_tag, family_of, load_backbone, weights_sha256
from iqa.extract.preprocess import decode_image, normalise, recipe, resize_uint8
from iqa.extract.registry import WEIGHTS, BackboneSpec, check_weights, get_spec, weights_tag
from iqa.errors import SettingError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKAGES = ("torch", "transformers", "numpy", "pillow", "zarr")


class ImageRows(Dataset):
    """Row i of the manifest -> (i, input tensor, reason, stamp); the reason is "" for a readable image,
    the stamp (cache/stamps.py) what the file was when it was read."""

    def __init__(self, image_root: Path, paths: list[str], spec: BackboneSpec):
        self.image_root, self.paths, self.spec = image_root, paths, spec
        self.in_worker = family_of(spec).in_worker
        self.blank = torch.zeros(spec.dim) if self.in_worker else torch.zeros(3, spec.resolution, spec.resolution, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        image, reason, stamp = decode_image(self.image_root / self.paths[row])
        stamp = torch.from_numpy(stamp)
        if image is None:
            return row, self.blank, reason, stamp
        if not self.in_worker:
            spec = self.spec
            return row, resize_uint8(image, spec.resolution, spec.resample, spec.shortest_side()), "", stamp
        try:
            features = np.asarray(self.spec.features_in_worker(image), dtype=np.float32)
        except Exception as err:  # a feature definition failing on one image is that image's problem
            return row, self.blank, f"features failed: {type(err).__name__}: {err}", stamp
        return row, torch.from_numpy(features), "", stamp


@dataclass
class ExtractSummary:
    store: Path | str  # a URL string for a remote store
    rows: int  # rows in the store
    rows_computed: int  # rows this run computed
    chunks_written: int  # by this run
    chunks_missing: int  # store-wide, after this run (other shards' included)
    invalid: list[tuple[str, str]]  # store-wide (image key, reason)
    seconds: float
    fingerprint_id: str
    skip_bad: bool
    repaired: dict[int, str] = field(default_factory=dict)  # damaged chunks found and recomputed (-1: the keys)
    changed: str = ""  # images changed since extraction, whose chunks this run recomputed
    notes: list[str] = field(default_factory=list)  # what the user should know about how the model ran

    @property
    def ok(self) -> bool:
        """The exit status of `iqa extract`: unreadable images fail the run unless skipped."""
        return self.skip_bad or not self.invalid

    @property
    def images_per_s(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else 0.0


def native_bf16(device: str) -> bool:
    """Whether the device multiplies bf16 in hardware: GPUs, and CPUs with AVX512-BF16 or AMX.

    Elsewhere bf16 autocast is emulated and slower than float32, so `auto` stays in float32.
    """
    if device.startswith("cuda"):
        return True
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def compute_dtype_for(device: str, dtype: str) -> torch.dtype:
    """`auto` is bf16 autocast where the hardware has it (a ViT at 512 px runs ~1.7x faster on an
    AVX512-BF16 CPU, embeddings within 0.3% of float32), float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise SettingError(f"`dtype` must be auto, {', '.join(COMPUTE_DTYPES)}; got {dtype!r}")
    return COMPUTE_DTYPES[dtype]


def pooling_rule(spec: BackboneSpec) -> str:
    """The registry's pooling rule, with the tapped block where there is one (timm's index, from 0): the
    weights checksum covers the whole tower, so a store tapped elsewhere must differ here."""
    return spec.pooling if spec.tap_block is None else f"{spec.pooling}:block{spec.tap_block}"


def make_fingerprint(spec: BackboneSpec, model: PooledBackbone, weights: str, dim: int, compute_dtype: torch.dtype,
                     store_dtype: str, manifest_sha256: str, tuned: dict | None = None) -> dict:
    """What produced a store's numbers; `tuned` (the fine-tuning run applied, if any) only where there is one."""
    return {
        "backbone": spec.key,
        "model_id": model.source,
        "revision": model.revision,
        "weights_sha256": weights,
        "pooling": pooling_rule(spec),
        "dim": dim,
        "resolution": spec.resolution,
        "preprocess": spec.preprocess,
        "resample": spec.resample,
        "preprocessing": recipe(spec.resolution, spec.mean, spec.std, spec.resample, spec.shortest_side()),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "store_dtype": store_dtype,
        "manifest_sha256": manifest_sha256,
        "packages": {name: version(name) for name in PACKAGES},
        **({"tuned": tuned} if tuned else {}),
    }


def default_batch_size(device: str) -> int:
    """Images per forward pass: small on a CPU, where a large batch's activations fall out of cache
    (DINOv3-S at 512: batch 16 ran 17% slower per image than batch 4), large on a GPU."""
    return 4 if torch.device(device).type == "cpu" else 32


def chunk_batches(store: EmbeddingStore, chunks: list[int], batch_size: int) -> list[list[int]]:
    """Each chunk's rows in batches of at most batch_size; no batch spans two chunks."""
    batches = []
    for chunk in chunks:
        rows = list(store.rows_of_chunk(chunk))
        batches.extend(rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    return batches


class Embedder:
    """A backbone on its device at its compute dtype: decoded inputs -> float32 embeddings.

    Both engines (this module's loop and the Ray actors) embed through this class, in the same
    batches of a chunk, so they give the same numbers.
    """

    def __init__(self, spec: BackboneSpec, model: PooledBackbone, device: str, compute_dtype: torch.dtype):
        self.spec, self.device, self.compute_dtype = spec, device, compute_dtype
        self.in_worker = family_of(spec).in_worker
        self.model = model.to(device).eval()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if not self.in_worker:
            inputs = normalise(inputs, self.spec.mean, self.spec.std)
        with torch.inference_mode(), torch.autocast(
            device_type=torch.device(self.device).type, dtype=self.compute_dtype,
            enabled=self.compute_dtype != torch.float32,
        ):
            return self.model(inputs).float()

    def batch(self, inputs: torch.Tensor, reasons: list[str], dim: int) -> np.ndarray:
        """One batch; rows with a reason (unreadable images) come back as NaN and never reach the model."""
        readable = torch.tensor([not r for r in reasons])
        out = np.full((len(reasons), dim), np.nan, dtype=np.float32)
        if readable.all():  # the usual batch: no boolean-index copy, so pinned memory stays pinned
            out[:] = self(inputs).cpu().numpy()
        elif readable.any():
            out[readable.numpy()] = self(inputs[readable]).cpu().numpy()
        return out

    def chunk(self, inputs: torch.Tensor, reasons: list[str], dim: int, batch_size: int) -> np.ndarray:
        """A whole chunk's rows, cut into the batches `chunk_batches` gives the local loop."""
        starts = range(0, len(reasons), batch_size)
        return np.concatenate([self.batch(inputs[i : i + batch_size], reasons[i : i + batch_size], dim) for i in starts])


@dataclass(frozen=True)
class ExtractRequest:
    """One extraction job as either engine takes it: which store, filled by which model, and how.

    `weights` is pretrained (the registry's checkpoint, or `source`: a Hugging Face id or a local
    folder), random-init or tiny (random weights: extract/registry.py); `adapter` is a fine-tuning run folder
    whose tuned backbone is used (LoRA merged, or full weights). `tag` names the store
    `<backbone>@<tag>.zarr` (tiny, random-init and tuned models get one by default); `stores` puts
    stores under another path or an fsspec URL (manifests stay in `cache`). `dtype` is the compute
    dtype (`compute_dtype_for`), `store_dtype` the stored one. `shard=(i, n)` takes chunks i, i+n, ...;
    unreadable images fail the run unless `skip_bad`. `batch_size` defaults per device.
    """

    cache: Path
    dataset: str
    backbone: str
    source: str | None = None
    weights: str = "pretrained"
    adapter: Path | None = None
    tag: str | None = None
    dtype: str = "auto"
    store_dtype: str = "float16"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    stores: Path | str | None = None
    overwrite: bool = False
    batch_size: int | None = None
    shard: tuple[int, int] = (0, 1)
    skip_bad: bool = False
    progress: bool = True
    resolution: int | None = None
    preprocess: str = "square"
    layers: str | None = None  # "all" or "4,3": also store these blocks'/stages' pooled vectors (from 1)
    layer_pool: str = "tokens"  # timm towers: "head" pools each layer like the default embedding (extract/timm_tower.py)
    spatial: int | None = None  # with layers: also store each layer's map pooled to spatial x spatial (SMART-IQA's 7)

    def __post_init__(self):
        index, count = self.shard
        if not 0 <= index < count:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingError(f"`batch_size` must be at least 1, got {self.batch_size}")
        check_weights(self.weights)
        if self.tag in WEIGHTS[1:] and self.tag != weights_tag(self.weights):
            raise SettingError(f"`tag` {self.tag} is kept for {self.tag} weights (`weights` {self.tag}): a store "
                               "of that name must hold random features; choose another tag")
        if self.source is not None and self.weights != "pretrained":
            raise SettingError(f"`model` gives pretrained weights; `weights` {self.weights} builds random ones: give one")
        if self.spatial is not None:
            check_map_side(self.spatial)
            if self.layers is None:
                raise SettingError("`spatial` keeps the map of each stored layer: give `layers` with it, e.g. `layers` 4,3,2,1")

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.backbone, self.weights)


@dataclass
class Extraction:
    """Everything an engine needs once the store is open: what to decode, how to embed, where to write."""

    request: ExtractRequest
    image_root: Path
    paths: list[str]
    embedder: Embedder
    store: EmbeddingStore
    fingerprint: dict
    dim: int  # a row's width as the embedder returns it: the default embedding, then each stored layer
    spec: BackboneSpec  # at the loaded checkpoint's geometry
    repaired: dict[int, str] = field(default_factory=dict)
    changed: str = ""

    def todo(self) -> list[int]:
        """The request's shard's chunks not yet marked done, and done ones still without the layers
        being added to the store (`extending`)."""
        index, count = self.request.shard
        done, extending = self.store.done_chunks(), set(self.store.extension_todo())
        return [c for c in range(index, self.store.n_chunks, count) if not done[c] or c in extending]

    def write(self, chunk: int, rows: np.ndarray, reasons: list[str], stamps: np.ndarray, extending: set[int]) -> None:
        """A computed chunk into the store: whole, or, for a done chunk being extended, only its new layers."""
        if chunk in extending:
            self.store.write_layers(chunk, rows)
        else:
            self.store.write_block(chunk, rows, reasons, stamps)

    def summary(self, rows_computed: int, chunks_written: int, seconds: float) -> ExtractSummary:
        return ExtractSummary(
            store=self.store.path,
            rows=self.store.n_rows,
            rows_computed=rows_computed,
            chunks_written=chunks_written,
            chunks_missing=int((~self.store.done_chunks()).sum()),
            invalid=self.store.invalid_rows(),
            seconds=seconds,
            fingerprint_id=fingerprint_id(self.fingerprint),
            skip_bad=self.request.skip_bad,
            repaired=self.repaired,
            changed=self.changed,
            notes=resolution_notes(self.embedder.model, self.spec),
        )


def resolution_notes(model, spec: BackboneSpec) -> list[str]:
    """A checkpoint whose own config names another input side than the recipe iqa runs it at, said once."""
    side = getattr(model, "checkpoint_side", None)
    if side is None:
        return []
    return [f"{model.source}'s own config says {side} px; iqa runs {spec.key} at its recipe's {spec.resolution} px "
            f"(the same for a hub id and a local copy); to follow the checkpoint pass --resolution {side}"]


def open_extraction(request: ExtractRequest, device: str, compute_dtype: torch.dtype) -> Extraction:
    """Load the backbone on `device`, fingerprint it, and create or reopen its store (refusing a
    different fingerprint). A store that lacks asked-for layers gains them; one that holds layers
    keeps them: the model computes every layer the store holds, whichever the request names."""
    r = request
    if r.spatial is not None and not family_of(r.spec).layer_maps:
        raise SettingError(f"`spatial` stores the layer maps of transformers vision towers only; {r.spec.key} is not one")
    manifest = read_manifest(r.cache, r.dataset)
    model = load_backbone(r.spec, source=r.source, weights=r.weights, resolution=r.resolution, preprocess=r.preprocess)
    spec = model.spec
    tag, tuned = r.tag or weights_tag(r.weights) or checkpoint_tag(r.source), None
    if r.adapter is not None:
        from iqa.extract.tuning import apply_run, read_run, run_tag  # imports peft (~2 s): only with an adapter

        run = read_run(r.adapter)
        tag = r.tag or run_tag(run, r.dataset)  # siglip2@lora-r4-sig-s8.zarr: never the base model's store
        model, tuned = apply_run(model, spec, r.adapter, run)
    weights = weights_sha256(model)  # hashed on the CPU, before it moves
    embedder = Embedder(spec, model, device, compute_dtype)
    probe = ImageRows(Path(manifest.image_root), manifest.paths, spec).blank.unsqueeze(0)
    dim = embedder(probe).shape[1]
    if r.weights != "tiny" and dim != spec.dim:
        raise ValueError(f"{spec.key} gives {dim}-dimensional embeddings, the registry says {spec.dim}")
    layer_dims, map_channels = {}, {}
    if r.layers is not None:
        if r.adapter is not None:
            raise SettingError("`layers` is not available with `adapter` (a tuned backbone); extract its default embedding")
        if not family_of(spec).layer_taps:
            raise SettingError(f"`layers` works for transformers and timm backbones; {spec.key} has no layer taps")
        if r.layer_pool != "tokens":
            if not hasattr(model, "use_layer_pool"):
                raise SettingError(f"`layer_pool` {r.layer_pool} is for the timm tower (perception); {spec.key}'s "
                                   "layers are pooled by the store's rule")
            model.use_layer_pool(r.layer_pool)
        sizes = model.layer_sizes(normalise(probe, spec.mean, spec.std).to(device))
        layer_dims = {n: sizes[n - 1][0] for n in parse_layers(r.layers, len(sizes))}
        # every layer's map channels: a store with maps gives new layers maps too, asked for or not
        map_channels = {n: channels for n, (_, channels) in enumerate(sizes, start=1) if channels is not None}
    fingerprint = make_fingerprint(
        spec, model, weights, dim, compute_dtype, r.store_dtype, manifest_checksum(r.cache, r.dataset), tuned
    )
    if layer_dims:  # only where asked: stores without layers keep their fingerprint
        fingerprint["layers"] = list(layer_dims)
        if r.layer_pool != "tokens":  # likewise: stores pooled by the default rule keep theirs
            fingerprint["layer_pool"] = r.layer_pool
    if r.spatial is not None:  # likewise: stores without maps keep theirs
        fingerprint["spatial"] = r.spatial
    store = open_for_writing(
        store_path(r.cache if r.stores is None else r.stores, r.dataset, r.backbone, tag), fingerprint, manifest.paths,
        dim, dtype=r.store_dtype, chunk_rows=r.chunk_rows, overwrite=r.overwrite, layer_dims=layer_dims,
        map_side=r.spatial, map_channels=map_channels,
    )
    if getattr(model, "checkpoint_side", None):  # beside the fingerprint's side (the one run): the checkpoint's own
        store.group.attrs["checkpoint_resolution"] = model.checkpoint_side
    if store.layer_dims:  # the store's layers (a resumed or extended store's, in its order), and their maps
        model.use_layers(tuple(store.layer_dims), *([store.map_side] if store.map_side else []))
    index, count = r.shard
    own = set(range(index, store.n_chunks, count))  # the chunks this run computes: only these it repairs
    repaired = repair_store(store, manifest.paths, own)  # damaged done chunks become undone: this run recomputes them
    changes = {row: why for row, why in store.changed_images(manifest).items() if row // store.chunk_rows in own}
    store.undo_chunks_of(changes, own)  # and so do chunks whose images changed
    row_width = store.row_width
    return Extraction(r, Path(manifest.image_root), manifest.paths, embedder, store, store.fingerprint, row_width, spec,
                      repaired, describe_changes(changes, manifest.paths) if changes else "")


def parse_layers(text: str, count: int) -> list[int]:
    """`all` -> 1..count; `4,3` -> [4, 3] (order kept, duplicates dropped); layers count from 1."""
    if text.strip() == "all":
        return list(range(1, count + 1))
    try:
        layers = list(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise SettingError(f"`layers` must be all or a comma list of layer numbers like 4,3; got {text!r}") from None
    wrong = [n for n in layers if not 1 <= n <= count]
    if wrong:
        raise SettingError(f"`layers` {text}: this model has layers 1..{count} (counted from 1), not {wrong}")
    return layers


def extract_dataset(request: ExtractRequest, device: str = "cpu", num_workers: int = 2) -> ExtractSummary:
    """The local engine: fill (or finish) the request's store on `device`, decoding in `num_workers` processes."""
    job = open_extraction(request, device, compute_dtype_for(device, request.dtype))
    store = job.store
    extending = set(store.extension_todo())
    batches = chunk_batches(store, job.todo(), request.batch_size or default_batch_size(device))
    # The loader's base seed comes from a generator of its own: a draw from torch's global one would shift the
    # random weights another thread may be building at that moment (`seeded_init`), and with them its fingerprint.
    loader = DataLoader(
        ImageRows(job.image_root, job.paths, job.spec),
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),
        generator=torch.Generator(),
    )
    start = time.perf_counter()
    rows_computed, chunks_written = 0, 0
    block_rows: list[np.ndarray] = []
    block_reasons: list[str] = []
    block_stamps: list[torch.Tensor] = []
    with tqdm(total=sum(map(len, batches)), unit="img", desc=f"{request.dataset}/{request.backbone}",
              disable=not request.progress) as bar:  # closed on an error too, so a message starts its own line
        for rows, inputs, reasons, stamps in loader:
            block_rows.append(job.embedder.batch(inputs, list(reasons), job.dim))
            block_reasons.extend(reasons)
            block_stamps.append(stamps)
            chunk = int(rows[0]) // store.chunk_rows
            if len(block_reasons) == len(store.rows_of_chunk(chunk)):
                job.write(chunk, np.concatenate(block_rows), block_reasons, torch.cat(block_stamps).numpy(), extending)
                block_rows, block_reasons, block_stamps = [], [], []
                chunks_written += 1
            rows_computed += len(rows)
            bar.update(len(rows))
    store.finish_extension()
    return job.summary(rows_computed, chunks_written, time.perf_counter() - start)
