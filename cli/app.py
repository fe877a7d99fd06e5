"""The `dmrx` command: one sub-app per noun."""

from __future__ import annotations

from typing import Annotated

import typer

from dmrx import __version__
from dmrx.cli import data, export, report, retrieve, score, train

app = typer.Typer(
    help="dmrx: train, export, score and serve Deep Match to Rank (DMR) CTR models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dmrx {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the dmrx version and exit.")
    ] = False,
) -> None:
    """Options before any command (the help text is the app's)."""


app.add_typer(data.app, name="data")
app.command("train")(train.train)
app.command("evaluate")(train.evaluate)
app.command("score")(score.score)
app.add_typer(retrieve.index_app, name="index")
app.command("retrieve")(retrieve.retrieve)
app.command("export")(export.export)
app.command("report")(report.report)


def main() -> None:
    app()
