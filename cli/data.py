"""`dmrx data ...`: write the dmrx data format from the embedded generator and from users' sources."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmrx.cli.common import console, print_json, user_errors

app = typer.Typer(help="Create and inspect dmrx data files.", no_args_is_help=True)


@app.command()
@user_errors
def synthetic(
    out: Annotated[Path, typer.Option(help="Directory to write train/valid/test/candidates.h5 into.")] = Path("."),
    users: Annotated[int, typer.Option(min=10, help="Number of users (raw ids 1..N).")] = 10_000,
    items: Annotated[int, typer.Option(min=600, help="Number of items.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed; the output is deterministic for a seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Generate the embedded default data: an Alimama-like click log with drifting user interests."""
    from dmrx.data.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(users=users, items=items, seed=seed)
    with console.status("generating synthetic data"):
        written = generate(out, cfg)
    if json_out:
        print_json({"out": str(out), "rows": written})
    else:
        for name, rows in written.items():
            console.print(f"wrote {out / name}: {rows:,} rows")
