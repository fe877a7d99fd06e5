"""`dmrx train` and `dmrx evaluate`."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from dmrx.choices import Arch, Device
from dmrx.cli.common import err_console, kv_table, print_json, print_table, renamed, user_errors
from dmrx.errors import DmrxError
from dmrx.progress import progress, status


def _default_data() -> tuple[Path, Path | None]:
    train, valid = Path("train.h5"), Path("valid.h5")
    if not train.exists():
        from dmrx.data.synthetic import generate

        err_console.print("no --data given and no ./train.h5: generating the embedded synthetic data here")
        with status("generating synthetic data"):
            generate(".")
    return train, valid if valid.exists() else None


def _latest_unfinished() -> Path:
    from dmrx.models.bundle import RUNS_DIR

    runs = [p for p in RUNS_DIR.glob("*") if (p / "checkpoints" / "LATEST").exists()]
    if not runs:
        raise DmrxError(f"--resume: no interrupted run under {RUNS_DIR} (name one with --out)")
    return max(runs, key=lambda p: p.stat().st_mtime)


@user_errors
def train(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Training file (default ./train.h5, generated if absent).")] = None,
    valid: Annotated[Path | None, typer.Option(help="Validation file (default ./valid.h5 when present).")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON or TOML config with 'model' and 'train' sections.")] = None,
    arch: Annotated[
        Arch | None, typer.Option(help="Model kind: DMR or a baseline (overrides config).", show_default=False)
    ] = None,
    model: Annotated[Arch | None, typer.Option(hidden=True, help="Old name of --arch.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default ./runs/<timestamp>).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the training data (max).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; CPU runs are deterministic for a seed.")] = None,
    device: Annotated[
        Device | None, typer.Option(help="Where to train (default auto: cuda when available).", show_default=False)
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Examples per step.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=0, help="Stop after this many steps (0: no limit).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (--out, or the newest one).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Train a DMR model; the run directory becomes a self-contained model bundle."""
    from dmrx.training.trainer import check_new_run, check_resumable, load_config
    from dmrx.training.trainer import train as run_training

    arch = renamed(ctx, arch, model, "--arch", "--model")
    overrides = {
        "epochs": epochs,
        "seed": seed,
        "device": device and device.value,
        "batch_size": batch_size,
        "max_steps": max_steps,
    }
    model_cfg, train_cfg = load_config(config, overrides)
    if arch is not None:
        model_cfg.model = arch.value
        model_cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (out is None or (data is None and not resume)):
        # every rank must agree on these without talking: a timestamped name or generated data would race
        raise DmrxError("under torchrun, name the run directory with --out and the training file with --data")
    if resume:
        run_dir = out or _latest_unfinished()
        check_resumable(run_dir)
        if data is None:
            from dmrx.models.bundle import run_data

            data, valid = run_data(run_dir, "train"), run_data(run_dir, "valid")
    else:
        run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        check_new_run(run_dir)
        if data is None:
            data, default_valid = _default_data()
            valid = valid or default_valid
    with progress(enabled=not json_out) as start:
        summary = run_training(data, valid, run_dir, model_cfg, train_cfg, resume=resume, progress=start)
    summary["run"] = str(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun every rank has the same summary: rank 0 reports it, so --json stays one document
    if json_out:
        print_json(summary)
    else:
        print_table(kv_table(f"trained {run_dir}", summary))


@user_errors
def evaluate(
    run: Annotated[Path | None, typer.Argument(help="Run directory (default: the most recent run).")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Labelled dmrx data file to evaluate on (default: test.h5 beside the run's training file)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 4096,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
):
    """AUC, gAUC, logloss (and the oracle AUC when the file carries true probabilities)."""
    from dmrx.data.reader import DataFile
    from dmrx.evaluation.metrics import relevance_means, report
    from dmrx.evaluation.predict import predict
    from dmrx.models import bundle

    b = bundle.load(run)
    if data is None:
        data = bundle.run_data(b.path, "test.h5", config=b.config)
    with DataFile(data) as f:
        encoder = b.encoder()
        encoder.check_file(f)
        f.require_labels("evaluation", both_classes=False)  # one class still has a logloss
        res = predict(b.model, encoder, f, batch_size=batch_size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means over no rows: undefined, shown as such
        metrics = {**report(res["label"], res["prob"], res["user"], res.get("prob_true")), **relevance_means(res)}
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    if metrics.get("auc") is None:
        err_console.print(
            f"note: {data} holds one class only: AUC and gAUC are undefined (shown as -)", highlight=False
        )
    metrics = {"run": str(b.path), "data": str(data), **metrics}
    if json_out:
        print_json(metrics)
        return
    table = Table(title=f"{b.path} on {data}")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if k not in ("run", "data"):
            table.add_row(k, "-" if v is None else f"{v:.4f}" if isinstance(v, float) else f"{v:,}")
    print_table(table)
