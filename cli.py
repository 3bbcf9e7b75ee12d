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


if __name__ == "__main__":
    app()
