"""`dmrx export`: ONNX graphs (FP32, FP16, calibrated INT8), V', TensorRT engines, and the gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dmrx.choices import CalibMethod, Engine
from dmrx.cli.common import console, err_console, print_json, print_table, user_errors
from dmrx.errors import DmrxError
from dmrx.progress import status


def _gate_table(gates: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("gate", "value", "threshold", "result", "note"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for g in gates:
        v = g["value"]
        value = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        table.add_row(
            g["name"],
            value,
            g["threshold"],
            "[green]pass[/]" if g["passed"] else "[bold red]MISS[/]",
            g.get("note", ""),
        )
    return table


def _lint_file(path: Path, json_out: bool) -> None:
    from dmrx.export.lint import lint

    if not path.is_file():
        raise DmrxError(f"{path}: no such file")
    try:
        rep = lint(path)
    except Exception as e:  # noqa: BLE001 -- onnx raises several types for an unreadable file
        raise DmrxError(f"{path}: not a readable ONNX model ({e.__class__.__name__})") from None
    if json_out:
        print_json(rep.to_json())
    else:
        verdict = "[green]ok[/]" if rep.ok else f"[bold red]{len(rep.problems)} problem(s)[/]"
        console.print(f"{path}: TensorRT lint {verdict} (opset {rep.opset})")
        for p in rep.problems:
            console.print(f"  - {p}", highlight=False)
    if not rep.ok:
        raise typer.Exit(1)


@user_errors
def export(
    run: Annotated[
        Path | None,
        typer.Argument(
            help="Run directory (default: the most recent run); with --check-tensorrt also an .onnx file to lint."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default RUN/export); must not exist unless --force.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing output directory (atomically: "
            "the old export stays until the new one is complete).",
        ),
    ] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write FP16 graphs (gate: |ΔAUC| <= 0.0005).")] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also write static INT8 Q/DQ graphs (gates: |ΔAUC| <= 0.001, "
            "logloss within 0.5%, size <= 40% of FP32).",
        ),
    ] = False,
    calib_data: Annotated[
        Path | None, typer.Option(help="Calibration data (default: the run's training file).")
    ] = None,
    calib_rows: Annotated[int, typer.Option(min=1, help="Rows to calibrate on.")] = 4096,
    calib_method: Annotated[
        CalibMethod, typer.Option(help="INT8 calibration (percentile: the 99.999th).")
    ] = CalibMethod.percentile,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="Held-out labelled data for the quality gates (default: the run's validation file)."),
    ] = None,
    eval_rows: Annotated[int, typer.Option(min=1, help="Held-out rows the quality gates read (at most).")] = 100_000,
    engine: Annotated[
        Engine | None, typer.Option(help="Also build engines (tensorrt: needs TensorRT and a GPU).", show_default=False)
    ] = None,
    check_tensorrt: Annotated[
        bool,
        typer.Option("--check-tensorrt", help="Lint every graph against the ONNX-TensorRT parser's rules (a gate)."),
    ] = False,
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--no-gate",
            help="--no-gate: write the artifacts even when a gate misses (marked so in the manifest).",
        ),
    ] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
):
    """Export a run to ONNX (ranking graph, user encoder, candidate scorer, V'), proven against torch."""
    from dmrx.calibration import report_table
    from dmrx.export.pipeline import ExportOptions, GateFailure, export_run

    if check_tensorrt and run is not None and run.suffix == ".onnx":
        _lint_file(run, json_out)
        return
    opts = ExportOptions(
        out=out,
        fp16=fp16,
        int8=int8,
        calib_data=calib_data,
        calib_rows=calib_rows,
        calib_method=calib_method.value,
        eval_data=eval_data,
        eval_rows=eval_rows,
        engine=engine and engine.value,
        check_tensorrt=check_tensorrt,
        gate=gate,
        force=force,
    )
    try:
        with status("exporting", enabled=not json_out) as say:
            manifest = export_run(run, opts, progress=say)
    except GateFailure as e:
        print_table(_gate_table([g.to_json() for g in e.gates], "missed gates"), to=err_console)
        raise
    if json_out:
        print_json(manifest)
        return
    print_table(report_table(manifest["quality"], f"exported {manifest['path']}"))
    print_table(
        _gate_table(
            manifest["gates"], "gates" + ("" if manifest["gates_passed"] else " (MISSED, written with --no-gate)")
        )
    )
    files = Table(title="artifacts")
    for col in ("file", "precision", "bytes", "sha256"):
        files.add_column(col, justify="right" if col == "bytes" else "left")
    for name, a in manifest["artifacts"].items():
        files.add_row(name, a.get("precision", "-"), f"{a['bytes']:,}", manifest["files"][name][:16])
    print_table(files)
