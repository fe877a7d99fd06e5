"""`dmrx score`: batch-score a candidate file (or join shard outputs with --merge)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from dmrx.cli.common import console, err_console, print_json, user_errors
from dmrx.errors import DmrxError


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        rate = task.fields.get("rate")
        return Text(f"{rate:,.0f} rows/s" if rate else "- rows/s", style="progress.data.speed")


class _Bar:
    """A rich progress bar over rows: rows/s measured over this run (resumed rows excluded), and ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.t0 = time.perf_counter()
        self.first = None

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), _Rate(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
                                     transient=True)
            self.progress.__enter__()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("score", total=total, completed=done, rate=None)
            self.first, self.t0 = done, time.perf_counter()
            return
        dt = time.perf_counter() - self.t0
        rate = (done - self.first) / dt if dt > 0 else None
        self.progress.update(self.task, completed=done, rate=rate)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


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
    rows["backend"] = s["backend"] + (f" ({', '.join(s['providers'])})" if s.get("providers") else
                                      f" ({s['device']})" if s.get("device") else "")
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
    inputs: Annotated[list[Path], typer.Argument(
        help="CANDIDATES.h5 to score; with --merge, the shard outputs to join.", show_default=False)],
    model: Annotated[str | None, typer.Option(
        help="Run directory or its export bundle (default: the most recent run, with its export if any).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Output file (default CANDIDATES.scores.h5 beside the input; .shard-I-of-N with --shard).")] = None,
    backend: Annotated[str, typer.Option(help="auto, torch, onnxruntime or tensorrt.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, fp16, bf16 (torch on CUDA) or int8.")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1, help="Candidates per scoring call.")] = 4096,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last committed chunk.")] = False,
    shard: Annotated[str | None, typer.Option(
        help="Score only shard I of N (I/N; by user) into its own output.")] = None,
    merge: Annotated[bool, typer.Option(help="Join shard outputs (the arguments) into --out in row order.")] = False,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows per committed chunk (resume granularity).")] = 1 << 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Score a candidate file with a trained model: CTR per row into /score of an HDF5 file."""
    from dmrx.scoring import merge_shards, parse_shard, score_file

    if merge:
        if shard or resume:
            raise DmrxError("--merge joins finished shard outputs; it takes no --shard or --resume")
        summary = merge_shards(inputs, out)
    else:
        if len(inputs) != 1:
            raise DmrxError(f"give one candidate file (got {len(inputs)}); use --merge to join shard outputs")
        try:
            with _Bar(enabled=not json_out) as bar:
                summary = score_file(inputs[0], model, out, backend=backend, precision=precision,
                                     batch_size=batch_size, threads=threads, resume=resume,
                                     shard=parse_shard(shard), chunk_rows=chunk_rows, device=device, progress=bar)
        except KeyboardInterrupt:
            err_console.print("interrupted: committed chunks are kept; rerun with --resume to continue")
            raise
    if json_out:
        print_json(summary)
    else:
        console.print(_summary_table(summary))
