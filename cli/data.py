"""`dmrx data ...`: write the dmrx data format from the embedded generator and from users' sources."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmrx.cli.common import console, print_json, print_table, renamed, user_errors
from dmrx.progress import status

MaxLen = Annotated[
    int,
    typer.Option(
        min=0, help="Longest history any reader will use: older behaviours are not stored (0 stores whole prefixes)."
    ),
]

app = typer.Typer(help="Create and inspect dmrx data files.", no_args_is_help=True)


@app.command()
@user_errors
def synthetic(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Directory to write train/valid/test/candidates.h5 into.")] = Path("."),
    n_users: Annotated[int, typer.Option(min=10, help="Number of users (raw ids 1..N).")] = 10_000,
    n_items: Annotated[int, typer.Option(min=600, help="Number of items.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed; the output is deterministic for a seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    users: Annotated[int | None, typer.Option(min=10, hidden=True, help="Old name of --n-users.")] = None,
    items: Annotated[int | None, typer.Option(min=600, hidden=True, help="Old name of --n-items.")] = None,
):
    """Generate the embedded default data: an Alimama-like click log with drifting user interests."""
    from dmrx.data.synthetic import SyntheticConfig, generate

    # --users and --items were counts here but a file of user ids elsewhere (dmrx retrieve --users FILE)
    n_users = renamed(ctx, n_users, users, "--n-users", "--users")
    n_items = renamed(ctx, n_items, items, "--n-items", "--items")
    cfg = SyntheticConfig(users=n_users, items=n_items, seed=seed)
    with status("generating synthetic data", enabled=not json_out):
        written = generate(out, cfg)
    if json_out:
        print_json({"out": str(out), "rows": written})
    else:
        for name, rows in written.items():
            console.print(f"wrote {out / name}: {rows:,} rows")


@app.command()
@user_errors
def info(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A dmrx data file (.h5).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
):
    """Describe a data file: counts, label rate, history lengths, fields by role, size (streamed)."""
    from rich.table import Table

    from dmrx.data.info import describe

    d = describe(file)
    if json_out:
        print_json(d)
        return
    table = Table(title=str(file), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    h = d["history"]
    rows = {
        "schema version": d["schema_version"],
        "examples": f"{d['rows']:,}",
        "sequences": f"{d['sequences']:,}",
        "behaviours": f"{d['behaviors']:,}",
        "distinct users": f"{d['users']:,}",
        "label rate": "no labels" if d["label_rate"] is None else f"{d['label_rate']:.4f}",
        "mean prob": "absent" if d["mean_prob"] is None else f"{d['mean_prob']:.4f}",
        "history length": "no examples"
        if h is None
        else f"min {h['min']}  mean {h['mean']:.1f}  p50 {h['p50']}  p90 {h['p90']}  max {h['max']}",
        "empty histories": "-" if h is None else f"{h['empty_share']:.2%}",
        "file size": _size(d["file_bytes"]),
    }
    for role, names in d["fields"].items():
        if isinstance(names, list):
            rows[f"fields: {role}"] = ", ".join(names) or "-"
    for k, v in d["attrs"].items():
        rows[f"attr {k}"] = v
    for k, v in rows.items():
        table.add_row(k, str(v))
    print_table(table)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.command()
@user_errors
def amazon(
    src: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="Directory with NAME.txt and NAME_item2attributes.json (the S3-Rec layout)."
        ),
    ],
    name: Annotated[str, typer.Argument(help="Dataset name: the files' prefix, e.g. Beauty.")],
    out: Annotated[Path, typer.Option(help="Directory to write train.h5, valid.h5 and test.h5 into.")] = Path("."),
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the negative sampling; the output is deterministic for a seed.")
    ] = 0,
    max_len: MaxLen = 50,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Import Amazon review sequences (S3-Rec layout) with leave-last-out splits and one sampled negative
    per positive."""
    from dmrx.data.importers.amazon import import_amazon

    with status(f"importing {src / name}", enabled=not json_out):
        summary = import_amazon(src, name, out, seed=seed, max_len=max_len)
    _report(out, summary, json_out)


@app.command()
@user_errors
def alimama(
    src: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            help="Directory with raw_sample.csv, ad_feature.csv, user_profile.csv and "
            "behavior_log.csv (Tianchi Ali_Display_Ad_Click).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory to write train.h5 and test.h5 into.")] = Path("."),
    chunk_rows: Annotated[
        int,
        typer.Option(min=1000, help="Rows parsed at a time; peak memory grows linearly with it (~450 bytes a row)."),
    ] = 1 << 19,
    max_len: MaxLen = 50,
    tmp: Annotated[
        Path | None, typer.Option(help="Directory for the temporary buckets (~17 bytes per behaviour); default: --out.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Import the raw Alimama click log: the first 7 days train, the last day tests; histories are the
    user's behaviours before each impression (an external sort keeps memory bounded)."""
    from dmrx.data.importers.alimama import import_alimama

    with status("importing alimama", enabled=not json_out) as say:
        summary = import_alimama(src, out, chunk_rows=chunk_rows, max_len=max_len, tmp_dir=tmp, progress=say)
    _report(out, summary, json_out)


def _delimiter(text: str) -> str:
    return {"\\t": "\t", "tab": "\t"}.get(text, text)


def _names(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


@app.command("csv")
@user_errors
def csv_(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="CSV file (or .parquet/.pq, with pyarrow) with a header row.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT.h5", help="The dmrx data file to write.")],
    user_column: Annotated[str, typer.Option(help="User id column.")] = "user_id",
    label: Annotated[str, typer.Option(help="0/1 label column.")] = "label",
    no_label: Annotated[bool, typer.Option("--no-label", help="Write an unlabelled file (no label column).")] = False,
    target: Annotated[
        str | None,
        typer.Option(help="Target fields as field=column,... (default: X=X_id for every X_id/hist_X_id column pair)."),
    ] = None,
    history: Annotated[
        str | None,
        typer.Option(help="History fields as field=column,... (default: X=hist_X_id for every X_id/hist_X_id pair)."),
    ] = None,
    sep: Annotated[str, typer.Option(help="Separator inside history cells.")] = "^",
    profile: Annotated[str | None, typer.Option(help="User-profile categorical columns, comma-separated.")] = None,
    context: Annotated[str | None, typer.Option(help="Context categorical columns, comma-separated.")] = None,
    dense: Annotated[str | None, typer.Option(help="Continuous columns, comma-separated.")] = None,
    delimiter: Annotated[str, typer.Option(help="Field delimiter of the CSV ('\\t' or 'tab' for tabs).")] = ",",
    hash_cols: Annotated[
        str | None,
        typer.Option(
            "--hash", help="Columns of arbitrary strings to map to stable hashed ids, comma-separated (pid...)."
        ),
    ] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows converted at a time.")] = 1 << 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    user: Annotated[str | None, typer.Option(hidden=True, help="Old name of --user-column.")] = None,
):
    """Import a flat table with delimiter-joined history columns (the FuxiCTR layout): a row per example."""
    from dmrx.data.importers.tabular import import_csv, parse_mapping

    # --user is a user id in dmrx retrieve; here it named the column
    user_column = renamed(ctx, user_column, user, "--user-column", "--user")
    with status(f"importing {file}", enabled=not json_out):
        summary = import_csv(
            file,
            out,
            user=user_column,
            label=None if no_label else label,
            target=parse_mapping(target, "--target"),
            history=parse_mapping(history, "--history"),
            sep=sep,
            profile=_names(profile),
            context=_names(context),
            dense=_names(dense),
            delimiter=_delimiter(delimiter),
            hashed=_names(hash_cols),
            chunk_rows=chunk_rows,
        )
    if json_out:
        print_json(summary)
    else:
        console.print(
            f"wrote {out}: {summary['rows']:,} rows, {summary['sequences']:,} sequences, "
            f"{summary['behaviors']:,} behaviours"
        )


@app.command()
@user_errors
def parquet(
    file: Annotated[Path, typer.Argument(metavar="CANDIDATES.h5", help="A dmrx data file (.h5).")],
    out: Annotated[Path, typer.Argument(metavar="OUT.parquet", help="The Parquet file to write.")],
    max_len: MaxLen = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Write a dmrx data file as Parquet, one row per candidate with its history as list columns: the
    layout `dmrx score`, Ray and Spark read (docs/scoring.md)."""
    from dmrx.data.arrow import write_parquet

    with status(f"converting {file}", enabled=not json_out):
        summary = write_parquet(file, out, max_len=max_len)
    if json_out:
        print_json(summary)
    else:
        console.print(f"wrote {out}: {summary['rows']:,} rows, histories up to {summary['max_len']} behaviours")


def _report(out: Path, summary: dict, json_out: bool) -> None:
    if json_out:
        print_json({"out": str(out), **summary})
    else:
        for name, rows in summary["rows"].items():
            console.print(f"wrote {out / name}: {rows:,} rows")
