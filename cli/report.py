"""`dmrx report`: a run's figures (the paper's Figures 2-4, ROC, calibration) and an index.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmrx.cli.common import kv_table, print_json, print_table, user_errors


@user_errors
def report(
    run: Annotated[Path | None, typer.Argument(help="Run directory (default: the most recent run).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Labelled test file (default: test.h5 beside the run's training file).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per inference batch.")] = 4096,
    bins: Annotated[int, typer.Option(min=2, help="Equal-count bins of the calibration plot.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
):
    """Figures as PNG files in RUN/report/ plus an index.html showing them with the run's metrics.

    Needs matplotlib (dmrx's plot extra).
    """
    from dmrx.evaluation.report import build_report

    res = build_report(run, data, batch_size=batch_size, n_bins=bins)
    if json_out:
        print_json(res)
        return
    print_table(
        kv_table(
            f"report {res['index']}",
            {
                **{k: res["metrics"][k] for k in ("rows", "auc", "gauc", "logloss", "ece") if k in res["metrics"]},
                "figures": ", ".join(res["figures"]),
                **{f"skipped {k}": v for k, v in res["skipped"].items()},
            },
        )
    )
