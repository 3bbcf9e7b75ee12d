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


# ---- demo set ----
@data_app.command("make-demo")
def make_demo_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: <cache>/demo-src].")] = None,
    cache: CacheOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild and replace an existing folder.")] = False,
) -> None:
    """Build the offline demo set: scikit-image's photos, 7 distortions x 5 levels, SSIM-based scores."""
    from iqa.data.demo import DEMO_DIR, make_demo  # here, not at the top: scikit-image is slow to import

    out = out if out is not None else cache_root(cache) / DEMO_DIR
    try:
        labels = make_demo(out, force=force)
    except FileExistsError:
        fail(f"{out} already exists; pass --force to rebuild it")
    typer.echo(f"demo set: {labels}")


if __name__ == "__main__":
    app()
