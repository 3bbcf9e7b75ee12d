"""The `iqa` command. Each command is a few lines over library functions that tests call directly."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from iqa.cache.location import cache_root

app = typer.Typer(help="No-reference IQA on foundation backbones: extract once, train heads fast.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets (one manifest per dataset).", no_args_is_help=True)
app.add_typer(data_app, name="data")

CacheOption = Annotated[
    Optional[Path], typer.Option("--cache", help="Cache directory [default: $IQA_CACHE or ./iqa-cache].")
]


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr and a non-zero exit, instead of a traceback."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.callback()
def main() -> None:
    """No-reference IQA on foundation backbones: extract once, train heads fast."""


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
    device: Annotated[str, typer.Option("--device")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU), float32, bfloat16, float16.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="Decode worker processes.")] = 2,
    shard: Annotated[str, typer.Option("--shard", help="i/n: this process takes every n-th chunk from i.")] = "0/1",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Unreadable images warn instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild the store from scratch.")] = False,
    tag: Annotated[Optional[str], typer.Option("--tag", help="Store as <backbone>@<tag>.zarr.")] = None,
    store_dtype: Annotated[str, typer.Option("--store-dtype", help="float16 or float32.")] = "float16",
    cache: CacheOption = None,
) -> None:
    """Run a backbone over every image of a dataset once; resumable, shardable."""
    from iqa.cache.store import FingerprintMismatch
    from iqa.extract.backbones import BackboneLoadError
    from iqa.extract.run import extract_dataset

    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit()):
        fail(f"--shard must look like i/n (e.g. 0/4), got {shard!r}")
    try:
        summary = extract_dataset(
            cache_root(cache), dataset, backbone, source=model, random_init=random_init, tiny=tiny, device=device,
            dtype=dtype, batch_size=batch_size, num_workers=workers, shard=(int(index), int(count)), skip_bad=skip_bad,
            overwrite=overwrite, tag=tag, store_dtype=store_dtype,
        )
    except (BackboneLoadError, FingerprintMismatch, FileNotFoundError, KeyError, ValueError) as err:
        fail(str(err).strip("'\""))
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
    from iqa.cache.store import list_stores

    for info in list_stores(cache_root(cache)):
        typer.echo(
            f"{info.dataset}/{info.path.name}  {info.rows} x {info.dim} {info.dtype}  "
            f"chunks {info.chunks_done}/{info.chunks_total}  unreadable {len(info.invalid)}  {info.fingerprint_id}"
        )


@cache_app.command("verify")
def cache_verify(cache: CacheOption = None) -> None:
    """Check every store (fingerprint vs manifest, completeness, NaN rows); non-zero exit on any problem."""
    from iqa.cache.store import describe_store, list_stores, verify_store

    stores = [info.path for info in list_stores(cache_root(cache))]
    failed = 0
    for path in stores:
        problems = verify_store(path)
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
    cache: CacheOption = None,
) -> None:
    """Write one store to another format for tools that do not read Zarr."""
    from iqa.cache.store import export_h5, store_path

    if format != "h5":
        fail(f"unknown export format {format!r}; only h5 is supported")
    path = store_path(cache_root(cache), dataset, backbone, tag)
    if not path.exists():
        fail(f"no store at {path}")
    typer.echo(export_h5(path, out))


if __name__ == "__main__":
    app()
