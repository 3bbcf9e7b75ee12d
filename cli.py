"""The `iqa` command. Each command parses its options, calls one library function and prints.

Library errors end in one place (`Commands.invoke`) as one `error:` line; the heavy libraries (torch,
transformers, zarr, matplotlib) are imported inside the commands, so `--help` and argument errors answer at once.
"""

import errno
import json
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperGroup

from iqa.errors import IqaError

PAPER_SEEDS = "8,19,25"  # iqa.data.splits.PAPER_SEEDS, spelt here so that --help imports no numpy
USER_ERRORS = (ValueError, LookupError, FileNotFoundError, FileExistsError, ImportError)  # raised for bad input


def flag(setting: str) -> str:
    """A library setting as the command line spells it: micro_batch -> --micro-batch."""
    return "--" + setting.replace("_", "-")


def message(error: Exception) -> str:
    """An exception as one line: settings as flags, a KeyError's repr quotes dropped, every other message kept whole."""
    if isinstance(error, IqaError):
        return error.phrased(flag)
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def fail(text: str, code: int = 1) -> None:
    """One clear line on stderr and a non-zero exit, instead of a traceback."""
    typer.secho(f"error: {text}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


class Commands(TyperGroup):
    """The `iqa` group: whatever the library raises for bad input, from any command, ends here as one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (IqaError, *USER_ERRORS) as error:
            fail(message(error))
        except OSError as error:  # a full disk while writing: ResultsSpilled says where the finished runs went
            where = f" ({error.filename})" if error.filename else ""
            fail(f"{error.strerror}{where}" if error.strerror else str(error))


app = typer.Typer(cls=Commands, help="No-reference IQA on foundation backbones: extract once, train heads fast.",
                  no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets (one manifest per dataset).", no_args_is_help=True)
app.add_typer(data_app, name="data")

CacheOption = Annotated[
    Optional[Path], typer.Option("--cache", help="Cache directory (default: $IQA_CACHE or ./iqa-cache).")
]
StoresOption = Annotated[
    Optional[str], typer.Option("--stores", help="Embedding stores under this folder or fsspec URL (s3://...) "
                                                 "(default: the cache; manifests stay in the cache).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def device_name(device: str) -> str:
    """--device as parsed: a device's name, checked without torch (which `chosen_device` imports later)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        fail(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    return device


MlflowOption = Annotated[Optional[str], typer.Option(
    "--mlflow", help="Also log the finished runs to MLflow: a tracking URI, or `cache` for an SQLite store inside the cache "
                     "(<cache>/mlflow, no server); needs pip install 'iqa[mlflow]'. The results database stays the record.")]


def log_to_mlflow(records: list[dict], db: Path | None, root: Path, uri: str) -> None:
    """`--mlflow`: the finished runs among `records` copied to the tracking store (each once, by key)."""
    from iqa.cache.results import default_db
    from iqa.heads.report.tracker import default_tracking_uri, log_runs

    target = None if uri == "cache" else uri
    logged = log_runs(records, db or default_db(root), root, target)
    typer.echo(f"mlflow: {logged} new runs logged to {target or default_tracking_uri(root)}", err=True)


LossOption = Annotated[str, typer.Option(help="mse+margin (the paper's), mse, l1 (SMART-IQA's); its loss study's rank, fidelity, srcc (with --micro-batch the whole batch).")]
OptimizerOption = Annotated[str, typer.Option(help="adam (the paper's) or adamw (SMART-IQA's).")]
WeightDecayOption = Annotated[float, typer.Option(help="Weight decay (decoupled with adamw).")]
L2normOption = Annotated[bool, typer.Option(
    "--l2norm", help="Heads see unit-length embeddings (CLIP/SigLIP's normalised image_embeds); stores keep the raw vector.")]
WEIGHTS = Literal["pretrained", "random-init", "tiny"]  # iqa.extract.registry.WEIGHTS, spelt here: --help imports no numpy
WeightsOption = Annotated[WEIGHTS, typer.Option(
    "--weights", help="pretrained (the registry's checkpoint, or --model), random-init (full-size architecture, "
    "random weights) or tiny (a tiny random model of the same class).")]
DeviceOption = Annotated[
    str, typer.Option("--device", callback=device_name, help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N.")
]
EngineHelp = "local, or ray ({}; pip install 'iqa\\[ray]')."  # \\[: a literal bracket in the help's markup


def _csv(values: list[str]) -> list[str]:
    """Options may be repeated or comma-separated: --dataset a,b --dataset c."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_numbers(text: str, option: str, kind: type = float) -> tuple:
    """A comma list of numbers, e.g. --mask-k 100,90,70; anything else is one error line naming the option."""
    try:
        return tuple(kind(part) for part in _csv([text]))
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}")


def parse_seeds(seeds: str) -> list[int]:
    try:
        values = [int(s) for s in seeds.split(",")]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    if len(set(values)) != len(values):
        fail(f"--seeds lists a seed twice ({seeds}); each seed is one run")
    return values


def chosen_device(device: str, engine: str = "local") -> str:
    """The device a command runs on, once its own arguments are checked (torch imports in seconds): `auto` is
    the GPU when torch sees one, else the CPU. A CUDA device on a machine without one ends the command before
    anything is loaded or removed; with --engine ray the device is the workers', which this machine may lack."""
    if device != "auto" and not (engine == "local" and device.startswith("cuda")):
        return device  # named, and no GPU of this machine's to check
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        fail(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    return device


def cannot_write(where, error: OSError) -> None:
    """A write that failed (read-only place, a file where a folder must be, a full disk) as one line."""
    fix = "free some space" if error.errno == errno.ENOSPC else "choose a writable place"
    fail(f"cannot write under {where}: {error.strerror or error}{f' ({error.filename})' if error.filename else ''}; {fix}")


def cache_dir(cache: Path | None) -> Path:
    """The chosen cache folder; a file in its place is refused here, before anything reads or writes under it."""
    from iqa.cache.location import cache_root

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
        fail(f"no results database at {path}; train with `iqa head` first")
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


def show_version(shown: bool) -> None:
    if shown:
        from iqa import __version__

        typer.echo(f"iqa {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
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
    save_as: Annotated[Optional[str], typer.Option("--name", help="csv: dataset name in the cache (default: csv).")] = None,
) -> None:
    """Read a dataset's label files as released and write its manifest into the cache."""
    given = dict(images=images, labels=labels, image_col=image_col, score_col=score_col, score_range=score_range,
                 lower_better=lower_better or None, group_col=group_col, name=save_as)
    options = {option: value for option, value in given.items() if value is not None}
    from iqa.data.prepare import prepare_dataset

    root_dir = cache_dir(cache)
    try:
        manifest, path, warnings = prepare_dataset(name, root, root_dir, **options)
    except OSError as e:
        cannot_write(root_dir, e)
    for warning in warnings:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"{manifest.dataset}: {len(manifest):,} images, {manifest.score_scale} -> {path}")
    if name == "csv" and save_as is None:
        typer.echo(f"saved as dataset {manifest.dataset!r} (--name NAME gives it another); "
                   f"`iqa extract --dataset {manifest.dataset}` and the other commands use that name")


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(help="Dataset name in the cache.")],
    cache: CacheOption = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds.")] = PAPER_SEEDS,
    split_by: Annotated[str, typer.Option(help="random, group (content groups kept on one side) or official (the published split).")] = "random",
    as_json: JsonOption = False,
) -> None:
    """Counts, score range and the train/test split of each seed."""
    from iqa.data.prepare import summarise_dataset

    summary = summarise_dataset(cache_dir(cache), name, parse_seeds(seeds), split_by)
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
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <cache>/demo-src).")] = None,
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
        fail(message(e))
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
    weights: WeightsOption = "pretrained",
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", min=1, help="Input side (default: the checkpoint's own, or the registry's for rotary models).")] = None,
    preprocess: Annotated[str, typer.Option(
        "--preprocess", help="square (whole image, the paper's resize) or native (shortest side, centre crop).")] = "square",
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPUs and AVX512-BF16/AMX CPUs), float32, bfloat16, float16.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="(default: 4 on CPU, 32 on GPU)")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Decode worker processes.")] = 2,
    shard: Annotated[str, typer.Option("--shard", help="i/n: this process takes every n-th chunk from i.")] = "0/1",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Unreadable images warn instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild the store from scratch.")] = False,
    tag: Annotated[Optional[str], typer.Option("--tag", help="Store as <backbone>@<tag>.zarr.")] = None,
    store_dtype: Annotated[str, typer.Option("--store-dtype", help="float16 or float32.")] = "float16",
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="A fine-tuning run folder: embed with its tuned backbone (store tagged with the run).")] = None,
    engine: Annotated[str, typer.Option("--engine", help=EngineHelp.format("Ray Data on a cluster"))] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="ray: cluster address (default: a local one).")] = None,
    actors: Annotated[Optional[int], typer.Option(
        "--actors", min=1, help="ray: embedding actors (default: one per GPU share, else one per CPU).")] = None,
    gpus_per_actor: Annotated[float, typer.Option(
        "--gpus-per-actor", min=0.01, help="ray: GPU share of each actor (0.5 puts two on a GPU).")] = 1.0,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Also store each block's/stage's pooled vector: all, or a list like 4,3 (from 1).")] = None,
    layer_pool: Annotated[str, typer.Option(
        "--layer-pool", help="perception: tokens (each layer's patch mean and class token) or head (each layer through the default embedding's norm, attention pooling and projection, as Suppl. B.1).")] = "tokens",
    spatial: Annotated[Optional[int], typer.Option(
        "--spatial", help="With --layers: also store each layer's map average-pooled to N x N (SMART-IQA's 7), for `iqa head --spatial`.")] = None,
    stores: StoresOption = None,
    cache: CacheOption = None,
) -> None:
    """Run a backbone over every image of a dataset once; resumable, shardable."""
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit()):
        fail(f"--shard must look like i/n (e.g. 0/4), got {shard!r}")
    check_engine(engine)
    if engine == "local" and (actors is not None or gpus_per_actor != 1.0):
        fail("--actors and --gpus-per-actor are for --engine ray")
    device = chosen_device(device, engine)
    from iqa.cache.location import store_root
    from iqa.extract.run import ExtractRequest, extract_dataset

    try:
        request = ExtractRequest(
            cache_dir(cache), dataset, backbone, source=model, weights=weights, adapter=adapter,
            tag=tag, dtype=dtype, store_dtype=store_dtype, stores=store_root(stores) if stores else None,
            overwrite=overwrite, batch_size=batch_size, shard=(int(index), int(count)), skip_bad=skip_bad,
            resolution=resolution, preprocess=preprocess, layers=layers, layer_pool=layer_pool, spatial=spatial,
        )
        if engine == "ray":
            from iqa.extract.ray_engine import extract_with_ray

            summary = extract_with_ray(request, address=address, actors=actors, gpus_per_actor=gpus_per_actor)
        else:
            summary = extract_dataset(request, device=device, num_workers=workers)
    except FileNotFoundError:
        raise  # a missing input, said by the library
    except OSError as err:  # a full disk or a read-only store: the chunks written so far are kept
        cannot_write(stores or cache_dir(cache), err)
    if summary.changed:
        typer.echo(f"warning: {summary.store}: {summary.changed}: their chunks recomputed", err=True)
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
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
def cache_ls(cache: CacheOption = None, json_lines: JsonOption = False) -> None:
    """Every store in the cache: rows, dimension, stored layers and maps, progress, unreadable images, fingerprint."""
    from dataclasses import asdict

    from iqa.cache.listing import describe_store, store_dirs
    from iqa.cache.store import DamagedStore

    damaged = []
    for path in store_dirs(cache_dir(cache)):
        try:
            info = describe_store(path)
        except DamagedStore as error:
            damaged.append(str(error))
            continue
        if json_lines:
            typer.echo(json.dumps({**asdict(info), "path": str(info.path), "invalid": [list(i) for i in info.invalid]}))
            continue
        layers = f"  layers {','.join(map(str, info.layers))}" if info.layers else ""
        maps = f" with {info.map_side} x {info.map_side} maps" if info.map_side else ""
        typer.echo(
            f"{info.dataset}/{info.path.name}  {info.rows} x {info.dim} {info.dtype}{layers}{maps}  "
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
    from iqa.cache.listing import describe_store, store_dirs
    from iqa.cache.verify import verify_store

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
    json_lines: JsonOption = False,
) -> None:
    """Write one store to another format for tools that do not read Zarr."""
    from iqa.cache.export_h5 import export_h5
    from iqa.cache.store import store_path

    if format != "h5":
        fail(f"unknown export format {format!r}; only h5 is supported")
    path = store_path(cache_dir(cache), dataset, backbone, tag)
    if not path.exists():
        fail(f"no store at {path}")
    try:
        written = export_h5(path, out, allow_partial)
    except OSError as error:
        cannot_write(out, error)
    typer.echo(json.dumps({"store": str(path), "out": str(written)}) if json_lines else written)


# ---- heads ----

@app.command("head")
def head_command(
    backbone: Annotated[str, typer.Option(help="Backbone key whose cached embeddings to train on.")],
    cached: Annotated[bool, typer.Option("--cached", hidden=True, help="Kept for old scripts: heads always train on "
                                                                       "cached embeddings.")] = True,
    dataset: Annotated[list[str], typer.Option(help="Dataset(s), trained and tested on their own split.")] = [],
    train: Annotated[list[str], typer.Option(help="Cross-dataset: train on this set (pairs with --test).")] = [],
    test: Annotated[list[str], typer.Option(help="Cross-dataset: test on all of this set (several after one --train: one run each).")] = [],
    act: Annotated[str, typer.Option(help="Named heads: baseline, sig, gated, hyper; probes ridge, knn (comma-separated).")] = "baseline",
    act_pair: Annotated[list[str], typer.Option(help="Extra head as an act1,act2 pair, e.g. sigmoid,gelu.")] = [],
    mask_k: Annotated[str, typer.Option(help="Top-k percentile feature masking levels, e.g. 100,90,70.")] = "100",
    dropout: Annotated[Optional[str], typer.Option(help="Dropout placement: input or layers (with --keep).")] = None,
    keep: Annotated[str, typer.Option(help="Dropout keep probabilities (rate = 1 - keep).")] = "1.0",
    seeds: Annotated[str, typer.Option(help="Seeds: split, init, data order, dropout.")] = PAPER_SEEDS,
    split_by: Annotated[str, typer.Option(help="random, group (content groups held out whole) or official (the published split; with --select val its validation set selects).")] = "random",
    epochs: int = 30,
    lr: float = 1e-4,
    batch: Annotated[int, typer.Option("--batch", help="Rows per optimiser step (12, the paper's; SMART-IQA's is 32).")] = 12,
    micro_batch: Annotated[int, typer.Option(help="Rows of the batch the loss scores alone: 2 (the paper's "
                                                  "accumulation of six), or the batch (all of it ranked at once).")] = 2,
    loss: LossOption = "mse+margin",
    optimizer: OptimizerOption = "adam",
    weight_decay: WeightDecayOption = 0.0,
    standardize: Annotated[Optional[bool], typer.Option("--standardize/--no-standardize", help="Z-score features with each run's train rows (default: on for ridge/knn, off for MLP heads).")] = None,
    l2norm: L2normOption = False,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 autocast on GPUs, the paper's mixed precision; float32 on CPUs, where "
                                            "autocast is slower at batch 12), float32 or bfloat16.")] = "auto",
    stack_size: Annotated[Optional[int], typer.Option(help="Runs trained at once (default: 2 on CPU, 64 on GPU).")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Embedding store tag inside the cache.")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database (default: <cache>/results.sqlite).")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per run.")] = False,
    engine: Annotated[str, typer.Option("--engine", help=EngineHelp.format("each stack a Ray task"))] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="ray: cluster address (default: a local one).")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Train on an unfinished store's finished rows "
                                                                       "(recorded with a partial fingerprint).")] = False,
    stores: StoresOption = None,
    cache: CacheOption = None,
    select: Annotated[str, typer.Option(help="Epoch kept: test (best test SRCC, the paper's, optimistic), val (best SRCC on a validation part of the training split) or last.")] = "test",
    val_fraction: Annotated[float, typer.Option(help="With --select val: the share of each seed's training rows held out.")] = 0.1,
    layer: Annotated[Optional[str], typer.Option(help="Train on one stored layer N (from 1), or all: a layer sweep.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Train on stored layers concatenated, e.g. 4,3 (the pairing study).")] = None,
    fuse: Annotated[Optional[str], typer.Option(help="With --layers: a learned per-image weight per stage instead of the concatenation: smart (SMART-IQA Eq. 4-10: ReLU projections, a sigmoid per stage, the weighted stages concatenated) or attention (a softmax over stages, summed).")] = None,
    spatial: Annotated[Optional[int], typer.Option(help="With --layers and --fuse: fuse the stores' N x N stage maps (iqa extract --spatial N; SMART-IQA's 7) location by location; --act hyper --hyper-target eq16 then generates its weights per location (App. A), other heads read v's average over the locations.")] = None,
    knn_k: Annotated[Optional[int], typer.Option(help="The knn probe's k, fixed (ALOE: 20) (default: chosen by 5-fold CV on the training rows).")] = None,
    hyper_target: Annotated[Optional[str], typer.Option(help="--act hyper as SMART-IQA App. A sizes it: eq16 (weights generated from the content features, d -> 128 -> 1) or table4 (112-wide code, 224 -> 112 -> 56 -> 1); with --dropout input --keep 0.7 (Table IV) (default: iqa's 16-wide code).")] = None,
    mlflow: MlflowOption = None,
) -> None:
    """Train head grids on cached embeddings; finished runs in the results database are skipped."""
    seed_list, mask_ks, keeps = tuple(parse_seeds(seeds)), parse_numbers(mask_k, "--mask-k"), parse_numbers(keep, "--keep")
    from iqa.heads.report.run_listing import run_summary
    from iqa.heads.report.tables import results_table, small_test_warning
    from iqa.heads.training.grid_request import GridRequest, train_grid

    request = GridRequest(
        backbone, datasets=tuple(_csv(dataset)), train=tuple(_csv(train)), test=tuple(_csv(test)),
        heads=tuple(_csv([act])), act_pairs=tuple(tuple(_csv([pair])) for pair in act_pair),
        seeds=seed_list, mask_ks=mask_ks, dropout=dropout, keeps=keeps, epochs=epochs, lr=lr, batch_size=batch, micro_batch=micro_batch, split_by=split_by,
        loss=loss, optimizer=optimizer, weight_decay=weight_decay, standardize=standardize, l2norm=l2norm,
        select=select, val_fraction=val_fraction, layer=layer, layers=layers, fuse=fuse, dtype=dtype, tag=tag,
        stack_size=stack_size, knn_k=knn_k, hyper_target=hyper_target, spatial=spatial,
    )
    device = chosen_device(device, engine)
    records = train_grid(request, cache_dir(cache), device, db, stores, allow_partial, engine, address)
    if mlflow:
        log_to_mlflow(records, db, cache_dir(cache), mlflow)
    undefined = [r for r in records if r["best_srcc"] is None or r["best_srcc"] != r["best_srcc"]]
    if undefined:  # NaN: constant targets or predictions on the test rows, where rank correlation means nothing
        typer.secho(f"warning: {len(undefined)} of {len(records)} runs have no defined SRCC (constant scores or "
                    "predictions on their test rows); their numbers are NaN", err=True, fg=typer.colors.YELLOW)
    small = small_test_warning(records)
    if small:
        typer.secho(f"warning: {small}", err=True, fg=typer.colors.YELLOW)
    if json_lines:
        for record in records:
            typer.echo(json.dumps(run_summary(record)))
    else:
        typer.echo(results_table(records, layout="variants"), nl=False)


@app.command("results")
def results_command(
    format: Annotated[str, typer.Option("--format", help="md, csv or latex.")] = "md",
    layout: Annotated[str, typer.Option(help="backbones, variants, masking, dropout, cross, activations or regimes (Table S1).")] = "backbones",
    which: Annotated[str, typer.Option(help="best (best epoch per run, the paper's) or last epoch.")] = "best",
    regime: Annotated[Optional[str], typer.Option(help="Only runs of this regime: frozen, lora or full.")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Every table of the paper, published beside measured (md, csv or html).")] = False,
    db: Annotated[Optional[Path], typer.Option(help="Results database (default: <cache>/results.sqlite).")] = None,
    cache: CacheOption = None,
    list_runs: Annotated[bool, typer.Option("--runs", help="List runs: key, config, metrics, kept weights.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per run (what --runs lists), one a line; with --compare: the comparison.")] = False,
    paired: Annotated[Optional[str], typer.Option("--compare", help="KEY_A,KEY_B: the configurations of two runs compared over the seeds both ran: per-seed differences and a bootstrap interval over test images.")] = None,
) -> None:
    """Mean ± std over seeds, laid out like the paper's tables."""
    from iqa.heads.report.paper import compare, render
    from iqa.heads.report.tables import results_table

    path = existing_db(db, cache_dir(cache))
    runs = [r for r in existing_runs(path) if regime is None or r["regime"] == regime]
    if paired:
        return _paired_comparison(runs, paired, path, cache_dir(cache), format, json_out)
    if list_runs or json_out:
        from iqa.heads.report.run_listing import run_listing

        typer.echo(run_listing(runs, path, json_out), nl=False)
        return
    table = render(compare(runs), format) if paper else results_table(runs, layout=layout, fmt=format, which=which)
    typer.echo(table, nl=False)


def _paired_comparison(runs: list[dict], keys: str, results_db: Path, root: Path, fmt: str, json_out: bool) -> None:
    from iqa.cache.load import load_cached
    from iqa.heads.report.paired import compare_keys, paired_table

    pair = _csv([keys])
    if len(pair) != 2:
        fail(f"--compare takes two run keys (or unique prefixes), KEY_A,KEY_B; got {keys!r}")
    if fmt not in ("md", "csv") and not json_out:
        fail(f"--compare prints md or csv (or --json), not {fmt}")
    try:
        result = compare_keys(runs, *pair, results_db, partial(load_cached, root))
    except (LookupError, ValueError, FileNotFoundError) as error:  # KeyError is a LookupError
        fail(message(error))
    typer.echo(json.dumps(result.as_dict()) if json_out else paired_table(result, fmt), nl=json_out)


@app.command("export")
def export_command(
    run_key: Annotated[Optional[str], typer.Argument(help="A run key, or a prefix of one that is unique (`iqa results --runs`).")] = None,
    out: Annotated[Path, typer.Option("--out", help="A new folder for the model.")] = ...,
    best: Annotated[bool, typer.Option("--best", help="Instead of a key: the best run on --dataset (validation SRCC where "
                                                      "every candidate has it, else test SRCC; the rule is printed).")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="--best: the dataset trained and tested on.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="--best: only runs of this backbone.")] = None,
    head: Annotated[Optional[str], typer.Option(help="--best: only runs of this head.")] = None,
    select: Annotated[Optional[str], typer.Option(help="--best: only runs whose epoch this rule kept (test, val, last).")] = None,
    bundle: Annotated[bool, typer.Option("--bundle", help="Copy the base backbone weights into the folder: it then loads "
                                                          "anywhere, offline.")] = False,
    db: Annotated[Optional[Path], typer.Option(help="Results database (default: <cache>/results.sqlite).")] = None,
    cache: CacheOption = None,
    json_lines: JsonOption = False,
) -> None:
    """Write a finished run as a self-contained model folder: config.json, weights, model card."""
    from iqa.heads.saved.export import best_run, export_run, find_run

    if best == (run_key is not None):
        fail("give a run key, or --best with --dataset (not both)")
    if best and dataset is None:
        fail("--best needs --dataset: the dataset the run was trained and tested on")
    root = cache_dir(cache)
    path = existing_db(db, root)
    if best:
        run, rule = best_run(existing_runs(path), dataset, backbone, head, select)
        typer.echo(f"run {run['key'][:12]}: {rule}", err=True)
    else:
        run = find_run(existing_runs(path), run_key)
    try:
        folder = export_run(root, path, run, out, bundle)
    except FileExistsError:
        raise
    except OSError as error:  # a full disk or an unwritable place: no half model is left
        cannot_write(out, error)
    typer.echo(json.dumps({"key": run["key"], "model": str(folder)}) if json_lines else f"model written to {folder}")


@app.command("score")
def score_command(
    model: Annotated[Path, typer.Argument(help="A model folder from `iqa export`.")],
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files and folders (walked for images).")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Score a prepared dataset, from its embedding store when that matches the model.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write path,score,mos rows to this CSV file.")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Exit 0 even if some images are unreadable.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass (default: 4 on CPU, 32 on GPU).")] = None,
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes.")] = 2,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="Base backbone weights (HF id or folder) if not where training found them; checked by checksum.")] = None,
    cache: CacheOption = None,
) -> None:
    """Score images with exactly the preprocessing the model was trained on."""
    from iqa.cache.atomic import replaceable_file
    from iqa.heads.saved.model import image_files, is_scores_file, load_model, score_dataset, score_files, write_scores

    if bool(images) == bool(dataset):
        fail("give image files or folders, or --dataset D (one of the two)")
    if out is not None:  # refused before the model is loaded and the images scored
        replaceable_file(out, is_scores_file, "--out")
    loaded = load_model(model, chosen_device(device), base)
    if dataset:
        scored, source = score_dataset(loaded, cache_dir(cache), dataset, batch_size, workers, progress=out is not None)
        typer.echo(f"{dataset}: scored from its {'embedding store' if source == 'store' else 'images'}", err=True)
    else:
        scored = score_files(loaded, image_files(images), batch_size, workers, progress=out is not None)
    good = [s for s in scored if not s.reason]
    if out is not None:
        try:
            write_scores(scored, out)
        except OSError as error:  # a full disk: the previous file stays as it was
            cannot_write(out, error)
        typer.echo(f"{len(good)} of {len(scored)} images scored -> {out}")
    else:
        for s in good:
            typer.echo(json.dumps({"path": s.path, "score": s.score, "mos": s.mos}) if json_lines else f"{s.path}\t{s.score:.4f}\t{s.mos:.4f}")
    bad = [s for s in scored if s.reason]
    for s in bad:
        typer.secho(f"unreadable: {s.path}: {s.reason}", err=True)
    if bad and not skip_bad:
        fail(f"{len(bad)} of {len(scored)} images could not be scored (listed above); --skip-bad to accept")


@app.command("zeroshot")
def zeroshot_command(
    backbone: Annotated[str, typer.Option(help="CLIP or SigLIP store(s), comma-separated: clip,siglip2.")],
    dataset: Annotated[list[str], typer.Option(help="Dataset(s) whose stores to score, comma-separated.")],
    prompts: Annotated[list[str], typer.Option(help="A prompt set: pyiqa (five pairs, the default), clipiqa (the "
                                                    "paper's pair) or pairs 'Good photo.|Bad photo.;...'; repeatable.")] = [],
    prompts_file: Annotated[Optional[Path], typer.Option(help="Prompt sets, one per line ('name = pairs'): a sweep.")] = None,
    template: Annotated[str, typer.Option(help="Each prompt is put into {} of this text.")] = "{}",
    seeds: Annotated[str, typer.Option(help="Seeds whose test rows each run is evaluated on (as heads are).")] = "8,19,25",
    split_by: Annotated[str, typer.Option(help="random, group or official: the heads' split rule.")] = "random",
    tag: Annotated[Optional[str], typer.Option(help="Embedding store tag inside the cache.")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database (default: <cache>/results.sqlite).")] = None,
    learn_prompts: Annotated[bool, typer.Option("--learn-prompts", help="Train context vectors before each prompt "
                                                "(CLIP-IQA+; text tower frozen) on each seed's training rows.")] = False,
    context: Annotated[Optional[int], typer.Option(min=1, help="--learn-prompts: learned word vectors per prompt (default: 16).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="--learn-prompts: epochs (default: 30).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="--learn-prompts: learning rate (default: CoOp's 2e-3).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2, help="--learn-prompts: rows per optimiser step (default: 12).")] = None,
    loss: Annotated[Optional[str], typer.Option(help="--learn-prompts: mse+margin (the paper's, default), mse or l1.")] = None,
    select: Annotated[Optional[str], typer.Option(help="--learn-prompts: epoch kept, test (default), val or last.")] = None,
    device: DeviceOption = "auto",
    stores: StoresOption = None,
    cache: CacheOption = None,
    mlflow: MlflowOption = None,
) -> None:
    """Zero-shot quality (CLIP-IQA) from the store's own checkpoint's text tower: no training, no image pass."""
    from iqa.cache.location import store_root
    from iqa.cache.results import ResultsDB, default_db
    from iqa.extract.backbones import BackboneLoadError
    from iqa.heads.zeroshot.learn import LearnSettings
    from iqa.heads.zeroshot.prompts import prompt_sets
    from iqa.heads.zeroshot.runs import run_learned, run_zeroshot, sweep_table

    root = cache_dir(cache)
    device = chosen_device(device)
    given = {k: v for k, v in dict(context=context, epochs=epochs, lr=lr, batch_size=batch_size, loss=loss,
                                   select=select).items() if v is not None}
    if given and not learn_prompts:
        fail(f"{', '.join('--' + k.replace('_', '-') for k in given)} set how prompts are learned: add --learn-prompts")
    try:
        common = (root, _csv([backbone]), _csv(dataset), prompt_sets(prompts, prompts_file), parse_seeds(seeds),
                  ResultsDB(db or default_db(root)))
        where = dict(split_by=split_by, template=template, tag=tag, stores=store_root(stores) if stores else None)
        settings = LearnSettings(**given)
        rows = run_learned(*common, settings, device=device, **where) if learn_prompts else run_zeroshot(*common, **where)
    except (BackboneLoadError, FileNotFoundError, ValueError, KeyError) as error:
        fail(message(error))
    except OSError as error:
        fail(error.strerror or str(error))
    if mlflow:
        log_to_mlflow([record for row in rows for record in row.records], db, root, mlflow)
    typer.echo(sweep_table(rows), nl=False)


# ---- demo ----
@app.command()
def demo(
    seeds: Annotated[str, typer.Option(help="Seeds of the content-held-out splits.")] = PAPER_SEEDS,
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
        result = run_demo(root, tuple(parse_seeds(seeds)), epochs=epochs, device=chosen_device(device), tsne=not no_tsne)
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
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default: <cache>/report).")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database (default: <cache>/results.sqlite).")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Backbones to profile, e.g. siglip2,clip (default: those in the runs).")] = None,
    no_tsne: Annotated[bool, typer.Option("--no-tsne", help="Skip t-SNE (it retrains each shown run).")] = False,
    paper: Annotated[bool, typer.Option("--paper", help="Add paper.html: the published numbers beside the measured.")] = False,
    explain: Annotated[Optional[str], typer.Option("--explain", help="Exported model folders, comma-separated: add explanations.html (maps and their measures).")] = None,
    explain_set: Annotated[Optional[Path], typer.Option("--explain-set", help="--explain: the grid set measured on (default: <cache>/gridpg, built once).")] = None,
    paired: Annotated[list[str], typer.Option("--compare", help="KEY_A,KEY_B (repeatable): a paired comparison of the two runs' configurations, as `iqa results --compare` prints it.")] = [],
    device: DeviceOption = "auto",
    cache: CacheOption = None,
) -> None:
    """Tables, figures, compute profile and index.html from the results database."""
    from functools import partial

    from iqa.cache.load import load_cached
    from iqa.heads.report.build import default_profile, write_report

    root = cache_dir(cache)
    results_db = existing_db(db, root)
    runs = existing_runs(results_db)
    backbones = _csv([profile]) if profile is not None else default_profile(runs)
    device = chosen_device(device)
    explained = _explained_models(explain, explain_set, root, device) if explain else None
    pairs = [tuple(_csv([p])) for p in paired]
    if any(len(p) != 2 for p in pairs):
        fail("--compare takes two run keys (or unique prefixes), KEY_A,KEY_B")
    try:
        summary = write_report(runs, out or root / "report", partial(load_cached, root), backbones, device, tsne=not no_tsne,
                               paper=paper, explanations=explained, results_db=results_db, paired=pairs)
    except OSError as error:
        cannot_write(out or root / "report", error)
    for note in summary.notes:
        typer.echo(f"  left out: {note}")
    for line in summary.paper:
        typer.echo(f"  beside the paper: {line}")
    typer.echo(f"{len(summary.tables)} table files, {len(summary.figures)} figure files -> {summary.out / 'index.html'}")


def _explained_models(explain: str, grid_set: Path | None, cache: Path, device: str):
    """`--explain`'s model folders loaded (a bad one is one error line, before any report is built)."""
    from iqa.heads.report.explanations import load_explained

    return load_explained([Path(f) for f in _csv([explain])], cache, grid_set, device)


# ---- fine-tuning ----
@app.command("finetune")
def finetune_command(
    backbone: Annotated[str, typer.Option(help="Registry keys, comma-separated, e.g. siglip2,dinov3,resnet152.")],
    dataset: Annotated[str, typer.Option(help="Prepared datasets (see `iqa data`), comma-separated.")],
    head: Annotated[str, typer.Option(help="baseline, sig, gated, or activation pairs act1+act2 (e.g. sigmoid+gelu); comma-separated.")] = "sig",
    act_pair: Annotated[list[str], typer.Option(help="Extra head as an act1,act2 pair, e.g. sigmoid,gelu (as `iqa head`).")] = [],
    mode: Annotated[str, typer.Option(help="lora, full (every weight), frozen (head only, live features); comma-separated.")] = "lora",
    seeds: Annotated[str, typer.Option("--seeds", "--seed", help="Seeds: split, head init, LoRA init, data order.")] = "8",
    test: Annotated[Optional[str], typer.Option(help="Datasets also scored whole after every epoch: cross-dataset records (Table 3).")] = None,
    epochs: int = 30,
    batch_size: Annotated[int, typer.Option(help="Physical batch (a multiple of 2).")] = 2,
    accumulate: Annotated[int, typer.Option(help="Physical batches per optimiser step.")] = 6,
    micro_batch: Annotated[int, typer.Option(help="Rows the loss scores alone: 2 (the paper's), or the physical batch "
                                                  "(the whole batch ranked at once).")] = 2,
    lora_rank: Annotated[str, typer.Option(help="LoRA ranks, e.g. 1,2,4,8,16.")] = "4",
    lora_alpha: Annotated[Optional[str], typer.Option(help="LoRA alphas, e.g. 8 (default: 2 x rank).")] = None,
    lr: Annotated[str, typer.Option(help="Head (and LoRA adapter) learning rates, comma-separated.")] = "1e-4",
    backbone_lr: Annotated[float, typer.Option(help="Backbone learning rate in full mode.")] = 5e-6,
    mask_k: Annotated[str, typer.Option(help="Top-k percentile feature masking levels, e.g. 100,90,70.")] = "100",
    dropout: Annotated[Optional[str], typer.Option(help="Dropout placement in the head: input or layers (with --keep).")] = None,
    keep: Annotated[str, typer.Option(help="Dropout keep probabilities (rate = 1 - keep).")] = "1.0",
    loss: Annotated[str, typer.Option(help="Losses, comma-separated: mse+margin (the paper's), mse, l1.")] = "mse+margin",
    optimizer: OptimizerOption = "adam",
    weight_decay: WeightDecayOption = 0.0,
    l2norm: L2normOption = False,
    select: Annotated[str, typer.Option(help="Epoch kept: test (best test SRCC, the paper's, optimistic), val (best SRCC on a validation part of the training split) or last.")] = "test",
    val_fraction: Annotated[float, typer.Option(help="With --select val: the share of each seed's training rows held out.")] = 0.1,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 autocast on GPUs and AVX512-BF16/AMX CPUs), float32, bfloat16, float16 (grad scaler).")] = "auto",
    model: Annotated[Optional[str], typer.Option("--model", help="Base weights: HF id or local directory.")] = None,
    weights: WeightsOption = "pretrained",
    split_by: Annotated[str, typer.Option(help="random, or group (content groups kept on one side).")] = "random",
    run_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint folder of a single run (default: <cache>/runs/<dataset>/...).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Decode worker processes.")] = 2,
    explain_every: Annotated[Optional[int], typer.Option("--explain-every", min=1, help="Keep Grad-CAM maps of 3 fixed test images every N optimiser steps (the report draws them as a strip; Fig. S6).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray (each run a Ray task, one GPU each).")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="ray: cluster address (default: a local one).")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON line per finished record, with its key.")] = False,
    db: Annotated[Optional[Path], typer.Option(help="Results database (default: <cache>/results.sqlite).")] = None,
    cache: CacheOption = None,
    mlflow: MlflowOption = None,
) -> None:
    """Tune backbones and heads end to end on images, a grid of every combination of the comma lists;
    finished runs are skipped, a killed one resumes from its last checkpoint."""
    from iqa.extract.backbones import BackboneLoadError
    from iqa.heads.finetune.config import expand_finetune_grid
    from iqa.heads.finetune.grid import finetune_grid, run_label
    from iqa.heads.finetune.loop import Runtime
    from iqa.cache.results import ResultsDB

    check_engine(engine)
    device = chosen_device(device, engine)
    root = cache_dir(cache)
    pairs = [tuple(_csv([p])) for p in act_pair]
    if any(len(p) != 2 for p in pairs):
        fail("--act-pair takes two activations, e.g. sigmoid,gelu")
    try:
        runs = expand_finetune_grid(
            _csv([backbone]), _csv([dataset]), _csv([head]) + ["+".join(p) for p in pairs], parse_seeds(seeds),
            _csv([mode]), parse_numbers(lora_rank, "--lora-rank", int),
            parse_numbers(lora_alpha, "--lora-alpha") if lora_alpha else [None], parse_numbers(mask_k, "--mask-k"),
            parse_numbers(keep, "--keep"), parse_numbers(lr, "--lr"), _csv([loss]), _csv([test] if test else []),
            epochs=epochs, batch_size=batch_size, accumulate=accumulate, micro_batch=micro_batch, backbone_lr=backbone_lr,
            weights=weights, optimizer=optimizer, weight_decay=weight_decay, l2norm=l2norm,
            select=select, val_fraction=val_fraction, split_by=split_by, dropout=dropout,
        )
        tuned_on = None
        if engine == "ray":
            from iqa.heads.finetune.ray_grid import tune_on_ray

            tuned_on = tune_on_ray(address, num_gpus=1.0 if device.startswith("cuda") else 0.0)
        outcome = finetune_grid(root, runs, ResultsDB(db) if db else None, Runtime(device, dtype, model, workers, explain_every=explain_every),
                                tuned_on, run_dir, on_record=_finetune_line if json_lines else None)
    except (BackboneLoadError, FileNotFoundError, ImportError, KeyError, ValueError) as err:
        fail(message(err))
    except OSError as err:  # a full disk: the last checkpoint written is kept, and a rerun resumes from it
        cannot_write(run_dir or root, err)
    if not json_lines:
        for record in outcome.records:
            _finetune_summary(record)
    if mlflow:
        log_to_mlflow(outcome.records, db, root, mlflow)
    for run, why in outcome.failed:
        typer.secho(f"failed twice: {run_label(run)}: {why}", err=True, fg=typer.colors.RED)
    diverged = [r for r in outcome.records if r["status"] == "diverged"]
    if outcome.failed or diverged:
        fail(f"{len(outcome.failed)} runs failed, {len(diverged)} records diverged (their last good checkpoints are kept "
             f"and the diverged ones recorded); the others are recorded")


def _finetune_line(record: dict) -> None:
    fields = ("key", "train_dataset", "test_dataset", "backbone", "regime", "lora_rank", "lora_alpha", "head", "seed",
              "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")
    typer.echo(json.dumps({k: record.get(k) for k in fields}))


def _finetune_summary(r: dict) -> None:
    where = f"{r['backbone']} {r['regime']} {r['head']} s{r['seed']} {r['train_dataset']}" + (
        f"->{r['test_dataset']}" if r["test_dataset"] != r["train_dataset"] else "")
    if r["status"] == "diverged":
        typer.echo(f"{where}: diverged in epoch {r['diverged_epoch']} ({r['key'][:10]})")
        return
    typer.echo(f"{where}: best SRCC {r['best_srcc']:.4f} PLCC {r['best_plcc']:.4f} (epoch {r['best_epoch']}), "
               f"last SRCC {r['last_srcc']:.4f} PLCC {r['last_plcc']:.4f} ({r['key'][:10]})")


# ---- explanations ----
@app.command("explain")
def explain_command(
    inputs: Annotated[list[Path], typer.Argument(help="MODEL (an `iqa export` folder; not with --backbone), then image files and folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for one page (.png) and the raw maps (.npy) per image; with --evaluate, the deletion curves (deletion.png).")] = None,
    method: Annotated[str, typer.Option("--method", help="gradcam (on the backbone's spatial features) or ig (Integrated Gradients).")] = "gradcam",
    target: Annotated[str, typer.Option("--target", help="high: what raises the score; low: what lowers it.")] = "high",
    compare: Annotated[Optional[str], typer.Option("--compare", help="More model folders, comma-separated, side by side.")] = None,
    bands: Annotated[Optional[str], typer.Option("--bands", help="Feature-band maps, percent from the top of |embedding|: 0-1,1-10,...")] = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="Explain a bare backbone's feature bands (no model).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="--backbone weights: HF id or local directory.")] = None,
    weights: Annotated[WEIGHTS, typer.Option("--weights", help="--backbone: pretrained, random-init or tiny (as `iqa extract`).")] = "pretrained",
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Measure the maps: distortion pointing game and deletion AUC.")] = False,
    grid_set: Annotated[Optional[Path], typer.Option("--set", help="--evaluate: a grid set (default: <cache>/gridpg, built once).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per image (with --evaluate: one for the set).")] = False,
    deletion_fill: Annotated[str, typer.Option("--deletion-fill", help="--evaluate: deleted pixels set to zero (ALOE's) or the image's mean colour.")] = "zero",
    device: DeviceOption = "auto",
    cache: CacheOption = None,
) -> None:
    """Attribution maps of predicted quality (Grad-CAM or IG), per image, for one or more models."""
    from iqa.heads.explain.request import ExplainRequest, evaluate_maps, explain_images

    request = ExplainRequest(tuple(inputs), method=method, target=target, compare=tuple(map(Path, _csv([compare or ""]))),
                             bands=bands, backbone=backbone, model=model, weights=weights, evaluate=evaluate,
                             deletion_fill=deletion_fill)
    device = chosen_device(device)
    if evaluate:
        try:
            result = evaluate_maps(request, cache_dir(cache), grid_set, device, out)
        except FileExistsError:
            raise  # the library's refusal to replace a folder it did not make
        except OSError as err:
            cannot_write(out, err)
        if json_out:
            typer.echo(json.dumps(result.as_dict()))
        else:
            pointed = result.grids - result.discarded
            typer.echo(f"{inputs[0]}: pointing game {result.pointing_game:.3f} (chance 0.25) over {pointed} of "
                       f"{result.grids} grids ({result.discarded} without positive attribution discarded); deletion AUC "
                       f"{result.deletion_auc:.4f} (random order {result.deletion_auc_random:.4f}; lower is more faithful)")
        return
    if out is None:
        fail("--out DIR is needed: the folder for the pages and maps")
    try:
        done = explain_images(request, out, device)
    except FileExistsError:
        raise  # the library's refusal to replace a folder it did not make
    except OSError as err:
        cannot_write(out, err)
    for item in done:
        if item.reason:
            typer.echo(f"unreadable: {item.path}: {item.reason}", err=True)
        else:
            typer.echo(json.dumps({"path": str(item.path), "page": str(item.page)}) if json_out else f"{item.path}\t{item.page}")
    bad = [item for item in done if item.reason]
    if bad:
        fail(f"{len(bad)} of {len(done)} images could not be explained (listed above)")


@data_app.command("make-gridpg")
def make_gridpg_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <cache>/gridpg).")] = None,
    cache: CacheOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild and replace an existing folder.")] = False,
) -> None:
    """Build the distortion pointing-game set: 2x2 grids of demo photos, exactly one cell distorted."""
    from iqa.data.gridpg import GRIDPG_DIR, make_gridpg

    build_data_set(make_gridpg, out if out is not None else cache_dir(cache) / GRIDPG_DIR, force, "grid set")


if __name__ == "__main__":
    app()
