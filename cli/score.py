"""`dmrx score`: batch-score a candidate file (or join shard outputs with --merge)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dmrx.choices import Backend, Device, Precision
from dmrx.cli.common import err_console, print_json, print_table, user_errors
from dmrx.errors import DmrxError
from dmrx.progress import progress


def _summary_table(s: dict) -> Table:
    title = f"scored {s['input']} -> {s['output']}" if "input" in s else f"merged -> {s['output']}"
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = {"rows": f"{s['rows']:,}"}
    if s.get("resumed_from_row") is not None:
        rows["resumed from row"] = f"{s['resumed_from_row']:,}"
    if "users" in s:
        rows["users"] = f"{s['users']:,}"
        rows["user encodings"] = f"{s['user_encodings']:,}"
    for k, v in (s.get("unknown_ids") or {}).items():
        rows[f"unknown ids: {k}"] = f"{v:,}"
    rows["backend"] = s["backend"] + (
        f" ({', '.join(s['providers'])})" if s.get("providers") else f" ({s['device']})" if s.get("device") else ""
    )
    rows["precision"] = s["precision"]
    if s.get("threads"):
        rows["threads"] = str(s["threads"])
    if s.get("shard"):
        rows["shard"] = f"{s['shard']} (rows {s['row_range'][0]:,}:{s['row_range'][1]:,})"
    if "shards" in s:
        rows["shards"] = str(s["shards"])
    rows["wall time"] = f"{s['wall_s']:.2f} s" + (f" (model load {s['load_s']:.2f} s)" if "load_s" in s else "")
    if "rows_per_s" in s:
        rows["rows/s"] = f"{s['rows_per_s']:,.0f}" + (" (scoring)" if "load_s" in s else "")
    if s.get("note"):
        rows["note"] = s["note"]
    for k, v in rows.items():
        table.add_row(k, v)
    return table


@user_errors
def score(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="CANDIDATES.h5 (or .parquet) to score; with --merge, the shard outputs to join.", show_default=False
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            metavar="RUN_OR_EXPORT",
            show_default=False,
            help="Run directory or its export bundle (default: the most recent run, with its export if any).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output file (default CANDIDATES.scores.h5 beside the input; .shard-I-of-N with --shard)."),
    ] = None,
    backend: Annotated[
        Backend, typer.Option(help="Inference engine (auto: the fastest one available).")
    ] = Backend.auto,
    precision: Annotated[
        Precision, typer.Option(help="Numeric precision (bf16: torch on CUDA only).")
    ] = Precision.fp32,
    batch_size: Annotated[int, typer.Option(min=1, help="Candidates per scoring call.")] = 4096,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    device: Annotated[Device, typer.Option(help="Where to score (auto: cuda when available).")] = Device.auto,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last committed chunk.")] = False,
    shard: Annotated[
        str | None, typer.Option(help="Score only shard I of N (I/N; by user) into its own output.")
    ] = None,
    merge: Annotated[bool, typer.Option(help="Join shard outputs (the arguments) into --out in row order.")] = False,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows per committed chunk (resume granularity).")] = 1 << 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Score a candidate file with a trained model: CTR per row into /score of an HDF5 file."""
    from dmrx.data.arrow import is_parquet
    from dmrx.scoring import merge_shards, parse_shard, score_file
    from dmrx.scoring.parquet import score_parquet

    if merge:
        if shard or resume:
            raise DmrxError("--merge joins finished shard outputs; it takes no --shard or --resume")
        summary = merge_shards(inputs, out)
    else:
        if len(inputs) != 1:
            raise DmrxError(f"give one candidate file (got {len(inputs)}); use --merge to join shard outputs")
        parquet = is_parquet(inputs[0])
        if parquet and (shard or resume):
            raise DmrxError(
                f"{inputs[0]}: --shard and --resume work on .h5 candidate files; a Parquet file is scored whole "
                "(split it into several files, or use dmrx.integrations.ray / .spark)"
            )
        try:
            with progress(enabled=not json_out) as start:
                shared = dict(
                    backend=backend.value,
                    precision=precision.value,
                    batch_size=batch_size,
                    threads=threads,
                    device=None if device is Device.auto else device.value,
                    progress=_rows_bar(start),
                )
                if parquet:
                    summary = score_parquet(inputs[0], model, out, **shared)
                else:
                    summary = score_file(
                        inputs[0], model, out, resume=resume, shard=parse_shard(shard), chunk_rows=chunk_rows, **shared
                    )
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: nothing written (a Parquet input is scored whole)"
                if parquet
                else "interrupted: committed chunks are kept; rerun with --resume to continue"
            )
            raise
    if json_out:
        print_json(summary)
    else:
        print_table(_summary_table(summary))


def _rows_bar(start):
    """score_file's progress(rows_done, rows_total) as a bar that starts where a resumed run left off."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = start("scoring", total, completed=done)
        else:
            bar.update(done)

    return update
