"""The `iqa` command. Each command is a few lines over library functions that tests call directly."""

import errno
import json
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from iqa.cache.location import cache_root
from iqa.cache.manifest import read_manifest
from iqa.data.prepare import dataset_summary, prepare_dataset
from iqa.data.readers import DatasetError
from iqa.data.splits import PAPER_SEEDS

app = typer.Typer(help="No-reference IQA on foundation backbones: extract once, train heads fast.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets (one manifest per dataset).", no_args_is_help=True)
app.add_typer(data_app, name="data")

CacheOption = Annotated[
    Optional[Path], typer.Option("--cache", help="Cache directory [default: $IQA_CACHE or ./iqa-cache].")
]
StoresOption = Annotated[
    Optional[str], typer.Option("--stores", help="Embedding stores under this folder or fsspec URL (s3://...) "
                                                 "[default: the cache; manifests stay in the cache].")
]


def resolve_device(device: str) -> str:
    """`auto` is the GPU when torch sees one, else the CPU. Other device names pass as given: with
    `--engine ray` the device is the workers', which the driver may not have."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        fail(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


LossOption = Annotated[str, typer.Option(help="mse+margin (the paper's), mse, or l1 (SMART-IQA's).")]
OptimizerOption = Annotated[str, typer.Option(help="adam (the paper's) or adamw (SMART-IQA's).")]
WeightDecayOption = Annotated[float, typer.Option(help="Weight decay (decoupled with adamw).")]
L2normOption = Annotated[bool, typer.Option(
    "--l2norm", help="Heads see unit-length embeddings (CLIP/SigLIP's normalised image_embeds); stores keep the raw vector.")]
DeviceOption = Annotated[
    str, typer.Option("--device", callback=resolve_device, help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N.")
]


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr and a non-zero exit, instead of a traceback."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def parse_seeds(seeds: str) -> list[int]:
    try:
        values = [int(s) for s in seeds.split(",")]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    if len(set(values)) != len(values):
        fail(f"--seeds lists a seed twice ({seeds}); each seed is one run")
    return values


def check_device(device: str, engine: str = "local") -> None:
    """A CUDA device on a machine without one ends the command before anything is loaded or removed
    (with --engine ray the device is the workers', which this machine may lack)."""
    if engine == "local" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")


def message(error: Exception) -> str:
    """An exception as one line: a KeyError's repr quotes are dropped, every other message kept whole."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def cannot_write(where, error: OSError) -> None:
    """A write that failed (read-only place, a file where a folder must be, a full disk) as one line."""
    fix = "free some space" if error.errno == errno.ENOSPC else "choose a writable place"
    fail(f"cannot write under {where}: {error.strerror or error}{f' ({error.filename})' if error.filename else ''}; {fix}")


def cache_dir(cache: Path | None) -> Path:
    """The chosen cache folder; a file in its place is refused here, before anything reads or writes under it."""
    root = cache_root(cache)
    if root.is_file():
        fail(f"the cache {root} is a file; give --cache a folder")
    return root


def check_engine(engine: str) -> None:
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")


def existing_db(db: Path | None, root: Path) -> Path:
    """The results database named, else the cache's; a missing one ends the command in one line."""
    from iqa.cache.results import default_db

    path = db or default_db(root)
    if not path.exists():
        fail(f"no results database at {path}; train with `iqa head --cached` first")
    return path


def existing_runs(path: Path) -> list[dict]:
    """The runs of an existing results database; an unreadable one ends the command in one line."""
    import sqlite3

    from iqa.cache.results import ResultsDB

    try:
        return ResultsDB(path, read_only=True).runs()
    except (ValueError, sqlite3.DatabaseError) as error:
        fail(str(error) if isinstance(error, ValueError) else f"{path} is not a usable results database ({error}); "
             "move it away to start a new one")


@app.callback()
def main() -> None:
    """No-reference IQA on foundation backbones: extract once, train heads fast."""


# ---- datasets ----


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="koniq10k, clive, kadid10k, flive, spaq, agiqa1k, agiqa3k, agiqa3k-align or csv.")],
    root: Annotated[Path, typer.Option("--root", help="Folder holding the dataset as released.")],
    cache: CacheOption = None,
    images: Annotated[Optional[str], typer.Option(help="Image folder under --root, if not the release's.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="csv: label file (relative to --root or absolute).")] = None,
    image_col: Annotated[Optional[str], typer.Option(help="csv: column of image paths.")] = None,
    score_col: Annotated[Optional[str], typer.Option(help="csv: column of scores.")] = None,
    score_range: Annotated[Optional[str], typer.Option(help="csv: the score scale as LO,HI, e.g. 0,100.")] = None,
    lower_better: Annotated[bool, typer.Option(help="csv: lower scores are better (e.g. DMOS).")] = False,
    group_col: Annotated[Optional[str], typer.Option(help="csv: column of content groups.")] = None,
    save_as: Annotated[Optional[str], typer.Option("--name", help="csv: dataset name in the cache [default: csv].")] = None,
) -> None:
    """Read a dataset's label files as released and write its manifest into the cache."""
    given = dict(images=images, labels=labels, image_col=image_col, score_col=score_col, score_range=score_range,
                 lower_better=lower_better or None, group_col=group_col, name=save_as)
    options = {option: value for option, value in given.items() if value is not None}
    try:
        manifest, path, warnings = prepare_dataset(name, root, cache_dir(cache), **options)
    except DatasetError as e:
        fail(str(e))
    except OSError as e:
        cannot_write(cache_dir(cache), e)
    for warning in warnings:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"{manifest.dataset}: {len(manifest):,} images, {manifest.score_scale} -> {path}")


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(help="Dataset name in the cache.")],
    cache: CacheOption = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds.")] = ",".join(map(str, PAPER_SEEDS)),
    split_by: Annotated[str, typer.Option(help="random, group (content groups kept on one side) or official (the published split).")] = "random",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Counts, score range and the train/test split of each seed."""
    from iqa.data.splits import SPLIT_RULES

    seed_list = parse_seeds(seeds)
    if split_by not in SPLIT_RULES:
        fail(f"--split-by must be {', '.join(SPLIT_RULES)}, got {split_by!r}")
    try:
        summary = dataset_summary(read_manifest(cache_dir(cache), name), seed_list, split_by)
    except (FileNotFoundError, ValueError) as e:  # DatasetError, a damaged manifest
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    groups = f", {summary['groups']:,} content groups" if summary["groups"] is not None else ""
    typer.echo(f"{summary['dataset']}: {summary['count']:,} images in {summary['image_root']}{groups}")
    typer.echo(f"scale: {summary['score_scale']}")
    typer.echo(f"scores {summary['score_min']:g} .. {summary['score_max']:g}, "
               f"targets {summary['target_min']:.4f} .. {summary['target_max']:.4f} (mean {summary['target_mean']:.4f})")
    for seed, sizes in summary["splits"].items():
        typer.echo(f"split ({split_by}) seed {seed}: {sizes['train']:,} train / {sizes['test']:,} test")


# ---- demo set ----
@data_app.command("make-demo")
def make_demo_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: <cache>/demo-src].")] = None,
    cache: CacheOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild and replace an existing folder.")] = False,
) -> None:
    """Build the offline demo set: scikit-image's photos, 7 distortions x 5 levels, SSIM-based scores."""
    from iqa.data.demo import DEMO_DIR, make_demo  # here, not at the top: scikit-image is slow to import

    build_data_set(make_demo, out if out is not None else cache_dir(cache) / DEMO_DIR, force, "demo set")


def build_data_set(make, out: Path, force: bool, what: str) -> None:
    """`make(out, force=...)` (a demo or grid set builder), its refusals and write failures as one line."""
    try:
        labels = make(out, force=force)
    except FileExistsError as e:
        fail(str(e).replace("force=True (--force)", "--force"))
    except OSError as e:
        cannot_write(out, e)
    typer.echo(f"{what}: {labels}")


# ---- extraction and the cache ----
cache_app = typer.Typer(help="Inspect, verify and export embedding stores.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command()
def extract(
    backbone: Annotated[str, typer.Option("--backbone", help="Registry key, e.g. siglip2, dinov3, resnet152.")],
    dataset: Annotated[str, typer.Option("--dataset", help="A prepared dataset (see `iqa data`).")],
    model: Annotated[Optional[str], typer.Option("--model", help="Weights: HF id or local directory.")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Full-size architecture, random weights.")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny random model of the same class.")] = False,
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", min=1, help="Input side [default: the checkpoint's own, or the registry's for rotary models].")] = None,
    preprocess: Annotated[str, typer.Option(
        "--preprocess", help="square (whole image, the paper's resize) or native (shortest side, centre crop).")] = "square",
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPUs and AVX512-BF16/AMX CPUs), float32, bfloat16, float16.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="[default: 4 on CPU, 32 on GPU]")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Decode worker processes.")] = 2,
    shard: Annotated[str, typer.Option("--shard", help="i/n: this process takes every n-th chunk from i.")] = "0/1",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Unreadable images warn instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild the store from scratch.")] = False,
    tag: Annotated[Optional[str], typer.Option("--tag", help="Store as <backbone>@<tag>.zarr.")] = None,
    store_dtype: Annotated[str, typer.Option("--store-dtype", help="float16 or float32.")] = "float16",
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="A fine-tuning run folder: embed with its tuned backbone (store tagged with the run).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray (Ray Data on a cluster; pip install 'iqa[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="ray: cluster address [default: a local one].")] = None,
    actors: Annotated[Optional[int], typer.Option(
        "--actors", min=1, help="ray: embedding actors [default: one per GPU share, else one per CPU].")] = None,
    gpus_per_actor: Annotated[float, typer.Option(
        "--gpus-per-actor", min=0.01, help="ray: GPU share of each actor (0.5 puts two on a GPU).")] = 1.0,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Also store each block's/stage's pooled vector: all, or a list like 4,3 (from 1).")] = None,
    stores: StoresOption = None,
    cache: CacheOption = None,
) -> None:
    """Run a backbone over every image of a dataset once; resumable, shardable."""
    from iqa.cache.location import store_root
    from iqa.cache.store import FingerprintMismatch
    from iqa.extract.backbones import BackboneLoadError
    from iqa.extract.run import ExtractRequest, extract_dataset

    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit()):
        fail(f"--shard must look like i/n (e.g. 0/4), got {shard!r}")
    check_engine(engine)
    check_device(device, engine)
    if engine == "local" and (actors is not None or gpus_per_actor != 1.0):
        fail("--actors and --gpus-per-actor are for --engine ray")
    try:
        request = ExtractRequest(
            cache_dir(cache), dataset, backbone, source=model, random_init=random_init, tiny=tiny, adapter=adapter,
            tag=tag, dtype=dtype, store_dtype=store_dtype, stores=store_root(stores) if stores else None,
            overwrite=overwrite, batch_size=batch_size, shard=(int(index), int(count)), skip_bad=skip_bad,
            resolution=resolution, preprocess=preprocess, layers=layers,
        )
        if engine == "ray":
            from iqa.extract.ray_engine import extract_with_ray

            summary = extract_with_ray(request, address=address, actors=actors, gpus_per_actor=gpus_per_actor)
        else:
            summary = extract_dataset(request, device=device, num_workers=workers)
    except (BackboneLoadError, FingerprintMismatch, FileNotFoundError, ImportError, KeyError, ValueError) as err:
        fail(message(err))
    except OSError as err:  # a full disk or a read-only store: the chunks written so far are kept
        cannot_write(stores or cache_dir(cache), err)
    if summary.changed:
        typer.echo(f"warning: {summary.store}: {summary.changed}: their chunks recomputed", err=True)
    for chunk, why in summary.repaired.items():
        typer.echo(f"warning: {summary.store}: damaged {'keys' if chunk < 0 else f'chunk {chunk}'} ({why}): repaired", err=True)
    typer.echo(
        f"{summary.store}: {summary.rows_computed} images in {summary.seconds:.1f} s ({summary.images_per_s:.1f}/s), "
        f"{summary.chunks_missing} chunks still missing, {len(summary.invalid)} unreadable"
    )
    for key, reason in summary.invalid:
        typer.echo(f"  unreadable: {key}: {reason}", err=True)
    if summary.invalid and not summary.ok:
        fail(f"{len(summary.invalid)} images could not be read (listed above); pass --skip-bad to accept that")


@cache_app.command("ls")
def cache_ls(cache: CacheOption = None) -> None:
    """Every store in the cache: rows, dimension, progress, unreadable images, fingerprint."""
    from iqa.cache.store import DamagedStore, describe_store, store_dirs

    damaged = []
    for path in store_dirs(cache_dir(cache)):
        try:
            info = describe_store(path)
        except DamagedStore as error:
            damaged.append(str(error))
            continue
        typer.echo(
            f"{info.dataset}/{info.path.name}  {info.rows} x {info.dim} {info.dtype}  "
            f"chunks {info.chunks_done}/{info.chunks_total}  unreadable {len(info.invalid)}  {info.fingerprint_id}"
        )
    if damaged:
        fail(f"{len(damaged)} store(s) damaged: {damaged[0]}")


@cache_app.command("verify")
def cache_verify(
    cache: CacheOption = None,
    rehash: Annotated[bool, typer.Option("--rehash", help="Hash every image again (finds changes a file's stat hides; reads every image).")] = False,
) -> None:
    """Check every store (fingerprint vs manifest, completeness, NaN rows, changed images); non-zero exit on any problem."""
    from iqa.cache.store import describe_store, store_dirs, verify_store

    root = cache_dir(cache)
    if not root.is_dir():
        fail(f"no cache at {root}; give --cache the cache folder")
    stores = store_dirs(root)
    if not stores:
        fail(f"no embedding stores under {root}; `iqa extract --backbone B --dataset D --cache {root}` makes one")
    failed = 0
    for path in stores:
        problems = verify_store(path, rehash)
        failed += bool(problems)
        typer.echo(f"{path.parent.name}/{path.name}: {'; '.join(problems) or 'ok'}")
        if not problems:
            for key, reason in describe_store(path).invalid:
                typer.echo(f"  unreadable: {key}: {reason}")
    if failed:
        fail(f"{failed} of {len(stores)} stores incomplete or damaged")


@cache_app.command("export")
def cache_export(
    dataset: Annotated[str, typer.Option("--dataset")],
    backbone: Annotated[str, typer.Option("--backbone")],
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    format: Annotated[str, typer.Option("--format", help="h5 (HDF5 via h5py).")] = "h5",
    tag: Annotated[Optional[str], typer.Option("--tag")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Export an unfinished store (its missing rows NaN).")] = False,
    cache: CacheOption = None,
) -> None:
    """Write one store to another format for tools that do not read Zarr."""
    from iqa.cache.store import export_h5, store_path

    if format != "h5":
        fail(f"unknown export format {format!r}; only h5 is supported")
    try:
        path = store_path(cache_dir(cache), dataset, backbone, tag)
        if not path.exists():
            fail(f"no store at {path}")
        typer.echo(export_h5(path, out, allow_partial))
    except ValueError as error:  # NotOurs, DamagedStore, UnsafeName
        fail(str(error))
    except OSError as error:
        cannot_write(out, error)


# ---- heads ----
def _csv(values: list[str]) -> list[str]:
    """Options may be repeated or comma-separated: --dataset a,b --dataset c."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@app.command("head")
def head_command(
    backbone: Annotated[str, typer.Option(help="Backbone key whose cached embeddings to train on.")],
    cached: Annotated[bool, typer.Option("--cached", help="Train on cached embeddings (frozen backbone).")] = False,
    dataset: Annotated[list[str], typer.Option(help="Dataset(s), trained and tested on their own split.")] = [],
    train: Annotated[list[str], typer.Option(help="Cross-dataset: train on this set (pairs with --test).")] = [],
    test: Annotated[list[str], typer.Option(help="Cross-dataset: test on all of this set (several after one --train: one run each).")] = [],
    act: Annotated[str, typer.Option(help="Named heads: baseline, sig, gated; probes ridge, knn (comma-separated).")] = "baseline",
    act_pair: Annotated[list[str], typer.Option(help="Extra head as an act1,act2 pair, e.g. sigmoid,gelu.")] = [],
    mask_k: Annotated[str, typer.Option(help="Top-k percentile feature masking levels, e.g. 100,90,70.")] = "100",
    dropout: Annotated[Optional[str], typer.Option(help="Dropout placement: input or layers (with --keep).")] = None,
    keep: Annotated[str, typer.Option(help="Dropout keep probabilities (rate = 1 - keep).")] = "1.0",
    seeds: Annotated[str, typer.Option(help="Seeds: split, init, data order, dropout.")] = "8,19,25",
    split_by: Annotated[str, typer.Option(help="random, group (content groups held out whole) or official (the published split; with --select val its validation set selects).")] = "random",
    epochs: int = 30,
    lr: float = 1e-4,
    micro_batch: Annotated[int, typer.Option(help="Rows of the batch of 12 the loss scores alone: 2 (the paper's "
                                                  "accumulation of six), or 12 (the whole batch ranked at once).")] = 2,
    loss: LossOption = "mse+margin",
    optimizer: OptimizerOption = "adam",
    weight_decay: WeightDecayOption = 0.0,
    standardize: Annotated[Optional[bool], typer.Option("--standardize/--no-standardize", help="Z-score features with each run's train rows [default: on for ridge/knn, off for MLP heads].")] = None,
    l2norm: L2normOption = False,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 autocast on GPUs, the paper's mixed precision; float32 on CPUs, where "
                                            "autocast is slower at batch 12), float32 or bfloat16.")] = "auto",
    stack_size: Annotated[Optional[int], typer.Option(help="Runs trained at once [default: 2 on CPU, 64 on GPU].")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Embedding store tag inside the cache.")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per run.")] = False,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray (each stack a Ray task).")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="ray: cluster address [default: a local one].")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Train on an unfinished store's finished rows "
                                                                       "(recorded with a partial fingerprint).")] = False,
    stores: StoresOption = None,
    cache: CacheOption = None,
    select: Annotated[str, typer.Option(help="Epoch kept: test (best test SRCC, the paper's, optimistic), val (best SRCC on a validation part of the training split) or last.")] = "test",
    val_fraction: Annotated[float, typer.Option(help="With --select val: the share of each seed's training rows held out.")] = 0.1,
    layer: Annotated[Optional[str], typer.Option(help="Train on one stored layer N (from 1), or all: a layer sweep.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Train on stored layers concatenated, e.g. 4,3 (the pairing study).")] = None,
    fuse: Annotated[Optional[str], typer.Option(help="With --layers: attention, a learned per-image weight per stage (SMART-IQA) instead of the concatenation.")] = None,
) -> None:
    """Train head grids on cached embeddings; finished runs in the results database are skipped."""
    from iqa.heads.training.grid import dataset_pairs, expand_grid, head_choices, head_dtype, run_grid
    from iqa.cache.results import ResultsDB, default_db
    from iqa.heads.report.tables import results_table

    if not cached:
        fail("only --cached (frozen-backbone heads) is available; fine-tuning has its own command")
    try:
        pairs = dataset_pairs(_csv(dataset), _csv(train), _csv(test))
    except ValueError as error:
        fail(str(error))
    check_engine(engine)
    check_device(device, engine)
    if epochs < 1:
        fail(f"--epochs must be at least 1, got {epochs}")
    if stack_size is not None and stack_size < 1:
        fail(f"--stack-size must be at least 1, got {stack_size}")
    if dropout is None and _csv([keep]) != ["1.0"]:
        fail("--keep sets dropout's keep probability: give --dropout input or --dropout layers with it")
    if not _csv([act]) and not act_pair:
        fail("--act names no head; give baseline, sig, gated or --act-pair")
    try:
        pair_acts = [tuple(_csv([p])) for p in act_pair]
        if any(len(p) != 2 for p in pair_acts):
            fail("--act-pair takes two activations, e.g. sigmoid,gelu")
        heads = head_choices(_csv([act]) if act else [], pair_acts)
        from iqa.cache.location import store_root
        from iqa.cache.store import load_cached, stored_layers
        from iqa.heads.training.grid import layer_choices

        root, where = cache_dir(cache), store_root(stores) if stores else None
        held = stored_layers(root, pairs[0][0], backbone, tag, where) if layer == "all" else []
        configs = expand_grid(
            pairs, backbone, heads, parse_seeds(seeds), [float(k) for k in _csv([mask_k])],
            dropout, [float(p) for p in _csv([keep])], epochs=epochs, lr=lr, micro_batch=micro_batch, tag=tag, split_by=split_by,
            loss=loss, optimizer=optimizer, weight_decay=weight_decay, standardize=standardize, l2norm=l2norm,
            select=select, val_fraction=val_fraction, layer_sets=layer_choices(layer, layers, held),
            compute_dtype=head_dtype(dtype, device), fuse=fuse,
        )
        from iqa.heads.training.selection import check_rule

        check_rule(select)
        run_stacks = None
        if engine == "ray":
            from iqa.heads.training.ray_grid import train_on_ray

            run_stacks = train_on_ray(address, num_gpus=1.0 if device.startswith("cuda") else 0.0)
        records = run_grid(configs, lambda name: load_cached(root, name, backbone, tag, where, allow_partial), ResultsDB(db or default_db(root)),
                           device, stack_size, engine=run_stacks)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as error:
        fail(message(error))
    except OSError as error:  # a full disk: ResultsSpilled says where the finished runs went
        fail(error.strerror or str(error))
    undefined = [r for r in records if r["best_srcc"] is None or r["best_srcc"] != r["best_srcc"]]
    if undefined:  # NaN: constant targets or predictions on the test rows, where rank correlation means nothing
        typer.secho(f"warning: {len(undefined)} of {len(records)} runs have no defined SRCC (constant scores or "
                    "predictions on their test rows); their numbers are NaN", err=True, fg=typer.colors.YELLOW)
    if json_lines:
        fields = ("train_dataset", "test_dataset", "backbone", "head", "act1", "act2", "mask_k", "dropout", "keep",
                  "seed", "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")
        for record in records:
            typer.echo(json.dumps({**{k: record[k] for k in fields}, "layers": record.get("layers"), "fuse": record.get("fuse")}))
    else:
        typer.echo(results_table(records, layout="variants"), nl=False)


@app.command("results")
def results_command(
    format: Annotated[str, typer.Option("--format", help="md, csv or latex.")] = "md",
    layout: Annotated[str, typer.Option(help="backbones, variants, masking, dropout, cross, activations or regimes (Table S1).")] = "backbones",
    which: Annotated[str, typer.Option(help="best (best epoch per run, the paper's) or last epoch.")] = "best",
    regime: Annotated[Optional[str], typer.Option(help="Only runs of this regime: frozen, lora or full.")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Every table of the paper, published beside measured (md, csv or html).")] = False,
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    cache: CacheOption = None,
    list_runs: Annotated[bool, typer.Option("--runs", help="List runs: key, config, metrics, kept weights.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --runs: one JSON object per run.")] = False,
) -> None:
    """Mean ± std over seeds, laid out like the paper's tables."""
    from iqa.heads.report.paper import compare, render
    from iqa.heads.report.tables import results_table

    path = existing_db(db, cache_dir(cache))
    runs = [r for r in existing_runs(path) if regime is None or r["regime"] == regime]
    if list_runs:
        from iqa.heads.report.run_listing import run_listing

        typer.echo(run_listing(runs, path, json_out), nl=False)
        return
    try:
        table = render(compare(runs), format) if paper else results_table(runs, layout=layout, fmt=format, which=which)
        typer.echo(table, nl=False)
    except ValueError as error:
        fail(str(error))


@app.command("export")
def export_command(
    run_key: Annotated[str, typer.Argument(help="A run key, or a prefix of one that is unique (`iqa results --runs`).")],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the model.")],
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    cache: CacheOption = None,
) -> None:
    """Write a finished run as a self-contained model folder: config.json, weights, model card."""
    from iqa.heads.saved.export import export_run, find_run

    root = cache_dir(cache)
    path = existing_db(db, root)
    try:
        folder = export_run(root, path, find_run(existing_runs(path), run_key), out)
    except (LookupError, ValueError, FileExistsError) as error:
        fail(str(error))
    except OSError as error:  # a full disk or an unwritable place: no half model is left
        cannot_write(out, error)
    typer.echo(f"model written to {folder}")


@app.command("score")
def score_command(
    model: Annotated[Path, typer.Argument(help="A model folder from `iqa export`.")],
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files and folders (walked for images).")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Score a prepared dataset, from its embedding store when that matches the model.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write path,score,mos rows to this CSV file.")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Exit 0 even if some images are unreadable.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass [default: 4 on CPU, 32 on GPU].")] = None,
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes.")] = 2,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="Base backbone weights (HF id or folder) if not where training found them; checked by checksum.")] = None,
    cache: CacheOption = None,
) -> None:
    """Score images with exactly the preprocessing the model was trained on."""
    import json

    from iqa.cache.atomic import NotOurs, replaceable_file
    from iqa.extract.backbones import BackboneLoadError
    from iqa.heads.saved.model import image_files, is_scores_file, load_model, score_dataset, score_files, write_scores

    if bool(images) == bool(dataset):
        fail("give image files or folders, or --dataset D (one of the two)")
    try:
        if out is not None:  # refused before the model is loaded and the images scored
            replaceable_file(out, is_scores_file, "--out")
    except NotOurs as error:
        fail(str(error))
    try:
        loaded = load_model(model, device, base)
        if dataset:
            scored, source = score_dataset(loaded, cache_dir(cache), dataset, batch_size, workers, progress=out is not None)
            typer.echo(f"{dataset}: scored from its {'embedding store' if source == 'store' else 'images'}", err=True)
        else:
            scored = score_files(loaded, image_files(images), batch_size, workers, progress=out is not None)
    except (BackboneLoadError, FileNotFoundError, ValueError) as error:  # ModelFolderError is a ValueError
        fail(message(error))
    good = [s for s in scored if not s.reason]
    if out is not None:
        try:
            write_scores(scored, out)
        except ValueError as error:  # NotOurs
            fail(str(error))
        except OSError as error:  # a full disk: the previous file stays as it was
            cannot_write(out, error)
    else:
        for s in good:
            typer.echo(json.dumps({"path": s.path, "score": s.score, "mos": s.mos}) if json_lines else f"{s.path}\t{s.score:.4f}\t{s.mos:.4f}")
    bad = [s for s in scored if s.reason]
    for s in bad:
        typer.secho(f"unreadable: {s.path}: {s.reason}", err=True)
    if bad and not skip_bad:
        fail(f"{len(bad)} of {len(scored)} images could not be scored (listed above); --skip-bad to accept")


# ---- demo ----
@app.command()
def demo(
    seeds: Annotated[str, typer.Option(help="Seeds of the content-held-out splits.")] = ",".join(map(str, PAPER_SEEDS)),
    epochs: int = 30,
    device: DeviceOption = "auto",
    no_tsne: Annotated[bool, typer.Option("--no-tsne", help="Leave t-SNE out of the report (it retrains runs).")] = False,
    cache: CacheOption = None,
) -> None:
    """Offline end to end: build the demo set, extract nss and a random ViT control, train the heads, report."""
    from iqa.demo import run_demo

    root = cache_dir(cache)
    typer.echo(f"iqa demo: everything goes under {root}")
    try:
        result = run_demo(root, tuple(parse_seeds(seeds)), epochs=epochs, device=device, tsne=not no_tsne)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # FingerprintMismatch: a store of other images
        fail(message(error))
    except OSError as error:
        cannot_write(root, error)
    typer.echo(result.table, nl=False)
    typer.echo(f"results database: {result.db} (`iqa results --cache {root}` lays it out again)")
    typer.echo(f"report: {result.report / 'index.html'} (`iqa report --cache {root}` writes it again)")
    image, score = result.sample
    typer.echo(f"best NSS model exported to {result.model}; `iqa score {result.model} {image}` gives {score:.4f}")


# ---- report ----
@app.command("report")
def report_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder [default: <cache>/report].")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Backbones to profile, e.g. siglip2,clip [default: those in the runs].")] = None,
    no_tsne: Annotated[bool, typer.Option("--no-tsne", help="Skip t-SNE (it retrains each shown run).")] = False,
    paper: Annotated[bool, typer.Option("--paper", help="Add paper.html: the published numbers beside the measured.")] = False,
    explain: Annotated[Optional[str], typer.Option("--explain", help="Exported model folders, comma-separated: add explanations.html (maps and their measures).")] = None,
    explain_set: Annotated[Optional[Path], typer.Option("--explain-set", help="--explain: the grid set measured on [default: <cache>/gridpg, built once].")] = None,
    device: DeviceOption = "auto",
    cache: CacheOption = None,
) -> None:
    """Tables, figures, compute profile and index.html from the results database."""
    from iqa.cache.store import load_cached
    from iqa.heads.report.build import default_profile, write_report

    root = cache_dir(cache)
    results_db = existing_db(db, root)
    runs = existing_runs(results_db)
    backbones = _csv([profile]) if profile is not None else default_profile(runs)
    explained = _explained_models(explain, explain_set, root, device) if explain else None
    try:
        summary = write_report(runs, out or root / "report", partial(load_cached, root), backbones, device, tsne=not no_tsne,
                               paper=paper, explanations=explained, results_db=results_db)
    except ValueError as error:
        fail(str(error))
    except OSError as error:
        cannot_write(out or root / "report", error)
    for note in summary.notes:
        typer.echo(f"  left out: {note}")
    for line in summary.paper:
        typer.echo(f"  beside the paper: {line}")
    typer.echo(f"{len(summary.tables)} table files, {len(summary.figures)} figure files -> {summary.out / 'index.html'}")


def _explained_models(explain: str, grid_set: Path | None, cache: Path, device: str):
    """`--explain`'s model folders loaded (a bad one is one error line, before any report is built)."""
    from iqa.extract.backbones import BackboneLoadError
    from iqa.heads.report.explanations import load_explained
    from iqa.heads.saved.model import ModelFolderError

    check_device(device)
    try:
        return load_explained([Path(f) for f in _csv([explain])], cache, grid_set, device)
    except (ModelFolderError, BackboneLoadError, FileNotFoundError, KeyError, ValueError) as err:
        fail(message(err))


# ---- fine-tuning ----
@app.command("finetune")
def finetune_command(
    backbone: Annotated[str, typer.Option(help="Registry key, e.g. siglip2, dinov3, resnet152.")],
    dataset: Annotated[str, typer.Option(help="A prepared dataset (see `iqa data`).")],
    head: Annotated[str, typer.Option(help="baseline, sig, gated, or an activation pair act1+act2 (e.g. sigmoid+gelu).")] = "sig",
    mode: Annotated[str, typer.Option(help="lora, full (every weight) or frozen (head only, live features).")] = "lora",
    seed: Annotated[int, typer.Option(help="Split, head init, LoRA init and data order.")] = 8,
    epochs: int = 30,
    batch_size: Annotated[int, typer.Option(help="Physical batch (a multiple of 2).")] = 2,
    accumulate: Annotated[int, typer.Option(help="Physical batches per optimiser step.")] = 6,
    micro_batch: Annotated[int, typer.Option(help="Rows the loss scores alone: 2 (the paper's), or the physical batch "
                                                  "(the whole batch ranked at once).")] = 2,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 2 x rank).")] = 4,
    lr: Annotated[float, typer.Option(help="Head (and LoRA adapter) learning rate.")] = 1e-4,
    backbone_lr: Annotated[float, typer.Option(help="Backbone learning rate in full mode.")] = 5e-6,
    loss: LossOption = "mse+margin",
    optimizer: OptimizerOption = "adam",
    weight_decay: WeightDecayOption = 0.0,
    l2norm: L2normOption = False,
    select: Annotated[str, typer.Option(help="Epoch kept: test (best test SRCC, the paper's, optimistic) or last.")] = "test",
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 autocast on GPUs and AVX512-BF16/AMX CPUs), float32, bfloat16, float16 (grad scaler).")] = "auto",
    model: Annotated[Optional[str], typer.Option("--model", help="Base weights: HF id or local directory.")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny random model of the same class.")] = False,
    random_init: Annotated[bool, typer.Option("--random-init", help="Full-size architecture, random weights.")] = False,
    split_by: Annotated[str, typer.Option(help="random, or group (content groups kept on one side).")] = "random",
    run_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint folder [default: <cache>/runs/<dataset>/...].")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Decode worker processes.")] = 2,
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    cache: CacheOption = None,
) -> None:
    """Tune a backbone and a head end to end on images; resumes from the run folder's last checkpoint."""
    from iqa.extract.backbones import BackboneLoadError
    from iqa.heads.finetune.loop import finetune, finetune_config
    from iqa.cache.results import ResultsDB

    check_device(device)
    root = cache_dir(cache)
    try:
        config = finetune_config(dataset, backbone, head, mode, seed, epochs, batch_size, accumulate, lora_rank, lr,
                                 backbone_lr, split_by, tiny, random_init, loss, optimizer, weight_decay, l2norm,
                                 select, micro_batch)
        run = finetune(root, config, device, dtype, model, run_dir, ResultsDB(db) if db else None, workers)
    except (BackboneLoadError, FileNotFoundError, KeyError, ValueError) as err:
        fail(message(err))
    except OSError as err:  # a full disk: the last checkpoint written is kept, and a rerun resumes from it
        cannot_write(run_dir or root, err)
    r = run.result
    if r.status == "diverged":
        fail(f"{run.run_dir}: diverged in epoch {r.diverged_epoch}; its last good checkpoint is kept and the run is recorded")
    typer.echo(f"{run.run_dir}: best SRCC {r.best_srcc:.4f} PLCC {r.best_plcc:.4f} (epoch {r.best_epoch}), "
               f"last SRCC {r.last_srcc:.4f} PLCC {r.last_plcc:.4f}")


# ---- explanations ----
@app.command("explain")
def explain_command(
    inputs: Annotated[list[Path], typer.Argument(help="MODEL (an `iqa export` folder; not with --backbone), then image files and folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for one page (.png) and the raw maps (.npy) per image.")] = None,
    method: Annotated[str, typer.Option("--method", help="gradcam (on the backbone's spatial features) or ig (Integrated Gradients).")] = "gradcam",
    target: Annotated[str, typer.Option("--target", help="high: what raises the score; low: what lowers it.")] = "high",
    compare: Annotated[Optional[str], typer.Option("--compare", help="More model folders, comma-separated, side by side.")] = None,
    bands: Annotated[Optional[str], typer.Option("--bands", help="Feature-band maps, percent from the top of |embedding|: 0-1,1-10,...")] = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="Explain a bare backbone's feature bands (no model).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="--backbone weights: HF id or local directory.")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="--backbone: full-size architecture, random weights.")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="--backbone: tiny random model of the same class.")] = False,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Measure the maps: distortion pointing game and deletion AUC.")] = False,
    grid_set: Annotated[Optional[Path], typer.Option("--set", help="--evaluate: a grid set [default: <cache>/gridpg, built once].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="--evaluate: one JSON object.")] = False,
    device: DeviceOption = "auto",
    cache: CacheOption = None,
) -> None:
    """Attribution maps of predicted quality (Grad-CAM or IG), per image, for one or more models."""
    from iqa.extract.backbones import BackboneLoadError
    from iqa.heads.explain.attribution import METHODS, TARGETS, parse_bands
    from iqa.heads.explain.maps import backbone_subject, explain_files, model_subject
    from iqa.heads.saved.model import ModelFolderError, image_files

    if method not in METHODS or target not in TARGETS:
        fail(f"--method must be one of {', '.join(METHODS)} and --target one of {', '.join(TARGETS)}")
    if backbone is None and (model or random_init or tiny):
        fail("--model, --random-init and --tiny choose the weights of --backbone; a model folder brings its own")
    if backbone is not None and (compare or not bands or evaluate):
        fail("--backbone explains feature bands: give --bands (e.g. 0-1,1-10,10-20), no --compare, no --evaluate")
    if evaluate:
        return _evaluate_explanations(inputs, method, grid_set, json_out, device, cache)
    if out is None:
        fail("--out DIR is needed: the folder for the pages and maps")
    try:
        band_list = parse_bands(bands) if bands else None
        if backbone is not None:
            subjects, images = [backbone_subject(backbone, model, random_init, tiny, device)], inputs
        else:
            folders = [inputs[0], *map(Path, _csv([compare] if compare else []))]
            subjects, images = [model_subject(f, device) for f in folders], inputs[1:]
        paths = image_files(images)
        if not paths:
            fail("no images given: name image files or folders after the model")
        done = explain_files(subjects, paths, out, method, target, band_list)
    except (ModelFolderError, BackboneLoadError, FileExistsError, KeyError, ValueError) as err:
        fail(message(err))
    except OSError as err:
        cannot_write(out, err)
    for item in done:
        typer.echo(f"{item.path}\t{item.page}" if not item.reason else f"unreadable: {item.path}: {item.reason}",
                   err=bool(item.reason))
    bad = [item for item in done if item.reason]
    if bad:
        fail(f"{len(bad)} of {len(done)} images could not be explained (listed above)")


def _evaluate_explanations(inputs: list[Path], method: str, grid_set: Path | None, json_out: bool, device: str,
                           cache: Path | None) -> None:
    from iqa.data.gridpg import grid_set_or_default
    from iqa.heads.explain.maps import model_subject
    from iqa.heads.explain.evaluate import evaluate
    from iqa.heads.saved.model import ModelFolderError

    if len(inputs) != 1:
        fail("--evaluate takes one MODEL folder and no images (the grid set is the images)")
    try:
        subject = model_subject(inputs[0], device)
        result = evaluate(subject, grid_set_or_default(cache_dir(cache), grid_set), method)
    except (ModelFolderError, FileNotFoundError, KeyError, ValueError) as err:
        fail(message(err))
    if json_out:
        typer.echo(json.dumps(result.as_dict()))
    else:
        typer.echo(f"{inputs[0]}: pointing game {result.pointing_game:.3f} (chance 0.25) over {result.grids} grids; "
                   f"deletion AUC {result.deletion_auc:.4f} (random order {result.deletion_auc_random:.4f}; lower is more faithful)")


@data_app.command("make-gridpg")
def make_gridpg_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: <cache>/gridpg].")] = None,
    cache: CacheOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild and replace an existing folder.")] = False,
) -> None:
    """Build the distortion pointing-game set: 2x2 grids of demo photos, exactly one cell distorted."""
    from iqa.data.gridpg import GRIDPG_DIR, make_gridpg

    build_data_set(make_gridpg, out if out is not None else cache_dir(cache) / GRIDPG_DIR, force, "grid set")


if __name__ == "__main__":
    app()
