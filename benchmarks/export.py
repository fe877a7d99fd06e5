"""CPU ONNX Runtime throughput of an export's FP32 / FP16 / INT8 ranking graphs, side by side.

    python benchmarks/export.py RUN/export                      # an existing export (with --fp16 --int8)
    python benchmarks/export.py RUN/export --batch 1 256 4096 --threads 1 --json

Rows per second of each precision at a few batch sizes (median of repeated timed rounds after a
warm-up, on rows sampled from the held-out file the export was gated on), file sizes, and the AUC and
logloss the export measured. The INT8 gate of the export issue ("faster than FP32 on CPU ONNX Runtime")
is checked here: the script says, per batch size, whether INT8 beat FP32, and exits 1 when it did not at
the largest batch. Threads default to 1 (set OMP/ORT intra-op threads), so numbers are per core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from dmrx.export import gates as G
from dmrx.models import bundle
from dmrx.runtime.graphs import GraphSpec, to_feeds
from dmrx.runtime.ort import session


def rows_per_s(sess: ort.InferenceSession, feeds: dict, seconds: float, rounds: int = 5) -> float:
    n = len(next(iter(feeds.values())))
    for _ in range(3):
        sess.run(["ctr"], feeds)
    rates = []
    for _ in range(rounds):
        t0, calls = time.perf_counter(), 0
        while True:
            sess.run(["ctr"], feeds)
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / rounds:
                break
        rates.append(calls * n / dt)
    return statistics.median(rates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path, help="an export directory (dmrx export --fp16 --int8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per precision and batch size")
    ap.add_argument("--run", type=Path, help="the source run (default: the directory holding the export)")
    ap.add_argument("--data", type=Path, help="rows to time on (default: the run's held-out file)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    manifest = json.loads((args.export_dir / "manifest.json").read_text())
    b = bundle.load(args.run or args.export_dir.parent)
    gs = GraphSpec.of(b.model)
    data = args.data or bundle.run_data(b.path, "valid", "test.h5", config=b.config, missing_ok=True)
    rows = G.sample_rows(data, b.encoder(), b.model, max(args.batch))
    precisions = [p for p in ("fp32", "fp16", "int8") if (args.export_dir / _name(p)).exists()]
    sessions = {p: session(args.export_dir / _name(p), threads=args.threads) for p in precisions}
    results: dict = {
        "export": str(args.export_dir),
        "threads": args.threads,
        "ort": ort.__version__,
        "precisions": {},
        "batches": args.batch,
    }
    for p in precisions:
        q = manifest.get("quality", {}).get(p, {})
        results["precisions"][p] = {
            "bytes": (args.export_dir / _name(p)).stat().st_size,
            "auc": q.get("auc"),
            "logloss": q.get("logloss"),
            "rows_per_s": {},
        }
    for n in args.batch:
        feeds = to_feeds({k: v[:n] for k, v in rows.items()}, gs, "ranking")
        for p in precisions:
            results["precisions"][p]["rows_per_s"][str(n)] = rows_per_s(sessions[p], feeds, args.seconds)
    verdict = {}
    if "int8" in precisions:
        for n in args.batch:
            r = results["precisions"]
            verdict[str(n)] = r["int8"]["rows_per_s"][str(n)] / r["fp32"]["rows_per_s"][str(n)]
        results["int8_speedup"] = verdict
        results["int8_faster_at_largest_batch"] = verdict[str(max(args.batch))] > 1.0
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        table = Table(title=f"ONNX Runtime CPU, {args.threads} thread(s): {args.export_dir}")
        table.add_column("precision")
        for n in args.batch:
            table.add_column(f"rows/s @{n}", justify="right")
        for col in ("size", "AUC", "logloss"):
            table.add_column(col, justify="right")
        for p, r in results["precisions"].items():
            table.add_row(
                p,
                *[f"{r['rows_per_s'][str(n)]:,.0f}" for n in args.batch],
                f"{r['bytes'] / 1024:,.1f} KiB",
                "-" if r["auc"] is None else f"{r['auc']:.5f}",
                "-" if r["logloss"] is None else f"{r['logloss']:.5f}",
            )
        if verdict:
            table.add_row("int8/fp32", *[f"{verdict[str(n)]:.2f}x" for n in args.batch], "", "", "")
        Console().print(table)
    return 0 if results.get("int8_faster_at_largest_batch", True) else 1


def _name(p: str) -> str:
    return "ranking.onnx" if p == "fp32" else f"ranking.{p}.onnx"


if __name__ == "__main__":
    raise SystemExit(main())
