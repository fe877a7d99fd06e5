"""The engines' overhead: rows/s of scoring on Ray Data and Spark against `dmrx score`, side by side in one run.

    python benchmarks/engines.py                        # 200k candidates, ~20 per user, 2 CPUs
    python benchmarks/engines.py --rows 50000 --json    # small, machine-readable
    python benchmarks/engines.py --repeat 3             # medians of three runs of each configuration

The candidate file and the default-size, freshly initialised model are benchmarks/score.py's (the same
synthetic Alimama-like file, reused from the temp directory when present); the file is converted once to
the Parquet layout (`dmrx data parquet`, histories cut to the model's T). Then, each timed end to end with
the model loaded inside the timing (every engine loads it in its own workers):

- `dmrx score` on the .h5 file and on the Parquet file (dmrx.scoring.score_file / score_parquet, --cpus
  threads): the single-process baseline;
- Ray Data: a local cluster of --cpus CPUs, dmrx.integrations.ray.score over read_parquet, one thread per
  actor, the output materialised (the score and row columns);
- Spark: a local[--cpus] session, dmrx.integrations.spark.score over spark.read.parquet, one thread per
  Python worker, executed through the noop sink.

Engine start-up (ray.init, the Spark session) is timed apart and left out of the rates; starting the
workers that load the model is in them, as it is in every job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score import _cpu_name, make_file, make_run  # noqa: E402  (benchmarks/score.py: the same file and model)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="candidates in the synthetic file")
    ap.add_argument("--per-user", type=int, default=20, help="candidates per user")
    ap.add_argument("--mean-len", type=int, default=60, help="mean behaviours per user")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for every configuration (threads, Ray CPUs, local[N])")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each configuration (the median is reported)")
    ap.add_argument("--only", default="score,ray,spark", help="comma-separated: score, ray, spark")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    from dmrx.data.arrow import write_parquet
    from dmrx.models.bundle import load
    from dmrx.scoring import score_file
    from dmrx.scoring.parquet import score_parquet

    only = set(args.only.split(","))
    tmp = Path(tempfile.gettempdir())
    h5 = tmp / f"dmrx-bench-score-{args.rows}.h5"
    if not h5.exists():
        make_file(h5, args.rows, args.per_user, args.mean_len)
    users = max(1, args.rows // args.per_user)
    run = tmp / f"dmrx-bench-score-run-{users}"
    if not (run / "manifest.json").exists():
        make_run(run, h5, users)
    T = load(run).model.cfg.max_len
    parquet = tmp / f"dmrx-bench-engines-{args.rows}-T{T}.parquet"
    convert_s = None
    if not parquet.exists():
        convert_s = _timed(lambda: write_parquet(h5, parquet, max_len=T))

    configs: dict[str, list[float]] = {}
    startup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dmrx-bench-engines-") as out:
        out = Path(out)

        def add(name: str, fn) -> None:
            configs.setdefault(name, []).append(_timed(fn))

        for _ in range(args.repeat):
            if "score" in only:
                kw = {"backend": "torch", "threads": args.cpus, "batch_size": args.batch_size}
                add("dmrx score (.h5)", lambda kw=kw: score_file(h5, run, out / "a.h5", **kw))
                add("dmrx score (.parquet)", lambda kw=kw: score_parquet(parquet, run, out / "b.h5", **kw))
        if "ray" in only:
            import ray

            from dmrx.integrations import ray as dmrx_ray

            startup["ray.init"] = _timed(
                lambda: ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            )
            ray.data.DataContext.get_current().enable_progress_bars = False
            for _ in range(args.repeat):

                def ray_job():
                    ds = ray.data.read_parquet(str(parquet))
                    scored = dmrx_ray.score(ds, run, "torch", keep=["row"], batch_size=args.batch_size, threads=1)
                    assert scored.materialize().count() == args.rows

                add("Ray Data", ray_job)
            ray.shutdown()
        if "spark" in only:
            from pyspark.sql import SparkSession

            from dmrx.integrations import spark as dmrx_spark

            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            holder = {}
            startup["Spark session"] = _timed(
                lambda: holder.setdefault(
                    "spark",
                    SparkSession.builder.master(f"local[{args.cpus}]")
                    .config("spark.ui.enabled", "false")
                    .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_size))
                    .getOrCreate(),
                )
            )
            spark = holder["spark"]
            spark.sparkContext.setLogLevel("ERROR")
            for _ in range(args.repeat):

                def spark_job():
                    df = spark.read.parquet(str(parquet))
                    scored = dmrx_spark.score(df, run, "torch", keep=["row"], batch_size=args.batch_size, threads=1)
                    scored.write.format("noop").mode("overwrite").save()

                add("Spark", spark_job)
            spark.stop()

    base = statistics.median(configs["dmrx score (.h5)"]) if "dmrx score (.h5)" in configs else None
    results = []
    for name, times in configs.items():
        wall = statistics.median(times)
        results.append(
            {
                "config": name,
                "wall_s": wall,
                "runs": times,
                "rows_per_s": args.rows / wall,
                "vs_dmrx_score": (base / wall) if base else None,
            }
        )
    summary = {
        "rows": args.rows,
        "per_user": args.per_user,
        "cpus": args.cpus,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "model": "freshly initialised DMRConfig() (default size), torch fp32",
        "parquet": str(parquet),
        "parquet_bytes": parquet.stat().st_size,
        "convert_s": convert_s,
        "startup_s": startup,
        "cpu": _cpu_name(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"scoring {args.rows:,} candidates (~{args.per_user} per user) on {args.cpus} CPUs, torch fp32, "
        f"median of {args.repeat}"
    )
    for col in ("configuration", "wall s", "rows/s", "vs dmrx score (.h5)"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in results:
        ratio = f"{r['vs_dmrx_score']:.2f}x" if r["vs_dmrx_score"] else "-"
        t.add_row(r["config"], f"{r['wall_s']:.2f}", f"{r['rows_per_s']:,.0f}", ratio)
    con = Console()
    con.print(t)
    starts = ", ".join(f"{k} {v:.1f} s" for k, v in startup.items())
    con.print(
        f"Engine start-up, not in the rates: {starts or '-'}. Model load and worker start are in every rate. "
        f"CPU: {summary['cpu']}, 1-min load {summary['load_avg_1m']}."
    )


if __name__ == "__main__":
    main()
