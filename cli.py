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
    test: Annotated[list[str], typer.Option(help="Cross-dataset: test on all of this set.")] = [],
    act: Annotated[str, typer.Option(help="Named heads: baseline, sig, gated (comma-separated).")] = "baseline",
    act_pair: Annotated[list[str], typer.Option(help="Extra head as an act1,act2 pair, e.g. sigmoid,gelu.")] = [],
    mask_k: Annotated[str, typer.Option(help="Top-k percentile feature masking levels, e.g. 100,90,70.")] = "100",
    dropout: Annotated[Optional[str], typer.Option(help="Dropout placement: input or layers (with --keep).")] = None,
    keep: Annotated[str, typer.Option(help="Dropout keep probabilities (rate = 1 - keep).")] = "1.0",
    seeds: Annotated[str, typer.Option(help="Seeds: split, init, data order, dropout.")] = "8,19,25",
    epochs: int = 30,
    lr: float = 1e-4,
    device: str = "cpu",
    stack_size: Annotated[Optional[int], typer.Option(help="Runs trained at once [default: 2 on CPU, 64 on GPU].")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Embedding store tag inside the cache.")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per run.")] = False,
    cache: CacheOption = None,
) -> None:
    """Train head grids on cached embeddings; finished runs in the results database are skipped."""
    import json

    from iqa.heads.grid import expand_grid, head_choices, run_grid
    from iqa.heads.results import ResultsDB, default_db, results_table

    if not cached:
        fail("only --cached (frozen-backbone heads) is available; fine-tuning has its own command")
    if len(train) != len(test):
        fail("--train and --test come in pairs")
    pairs = [(d, d) for d in _csv(dataset)] + list(zip(_csv(train), _csv(test)))
    if not pairs:
        fail("give --dataset or --train/--test")
    try:
        pair_acts = [tuple(_csv([p])) for p in act_pair]
        if any(len(p) != 2 for p in pair_acts):
            fail("--act-pair takes two activations, e.g. sigmoid,gelu")
        heads = head_choices(_csv([act]) if act else [], pair_acts)
        configs = expand_grid(
            pairs, backbone, heads, [int(s) for s in _csv([seeds])], [float(k) for k in _csv([mask_k])],
            dropout, [float(p) for p in _csv([keep])], epochs=epochs, lr=lr, tag=tag,
        )
        from iqa.cache.store import load_cached

        root = cache_root(cache)
        records = run_grid(configs, lambda name: load_cached(root, name, backbone, tag), ResultsDB(db or default_db(root)), device, stack_size)
    except (ValueError, FileNotFoundError, KeyError) as error:
        fail(str(error).strip("'\""))
    if json_lines:
        fields = ("train_dataset", "test_dataset", "backbone", "head", "act1", "act2", "mask_k", "dropout", "keep",
                  "seed", "status", "best_epoch", "best_srcc", "best_plcc", "last_srcc", "last_plcc")
        for record in records:
            typer.echo(json.dumps({k: record[k] for k in fields}))
    else:
        typer.echo(results_table(records, layout="variants"), nl=False)


@app.command("results")
def results_command(
    format: Annotated[str, typer.Option("--format", help="md, csv or latex.")] = "md",
    layout: Annotated[str, typer.Option(help="backbones, variants, masking or dropout.")] = "backbones",
    which: Annotated[str, typer.Option(help="best (best epoch per run, the paper's) or last epoch.")] = "best",
    regime: Annotated[Optional[str], typer.Option(help="Only runs of this regime: frozen, lora or full.")] = None,
    db: Annotated[Optional[Path], typer.Option(help="Results database [default: <cache>/results.sqlite].")] = None,
    cache: CacheOption = None,
) -> None:
    """Mean ± std over seeds, laid out like the paper's tables."""
    from iqa.heads.results import ResultsDB, default_db, results_table

    path = db or default_db(cache_root(cache))
    if not path.exists():
        fail(f"no results database at {path}; train with `iqa head --cached` first")
    runs = [r for r in ResultsDB(path).runs() if regime is None or r["regime"] == regime]
    try:
        typer.echo(results_table(runs, layout=layout, fmt=format, which=which), nl=False)
    except ValueError as error:
        fail(str(error))


if __name__ == "__main__":
    app()
