"""Edge deployment on CPU: the export's FP32, FP16 and INT8 artifacts through dmrx's scoring path, side by side
with the torch path, for throughput and for one user's latency.

    python benchmarks/edge.py                                  # 200k candidates, 1 and 2 threads, 3 rounds
    python benchmarks/edge.py --rows 20000 --rounds 1 --json   # small, machine-readable

Configurations: torch fp32 and int8 (the run's model), and onnxruntime fp32, fp16, int8 (the CPU flavour,
*.int8-cpu.onnx, which CPU scoring loads) and int8 Q/DQ (the TensorRT-targeted graphs, for comparison),
each as `dmrx.scoring.Scorer(..., threads=N)` over the user_encoder + candidate_scorer split graphs.

- rows/s: `dmrx.scoring.score_file` over the whole candidate file (read, encode, score, write) at --batch-size,
  for each --threads value. Rounds interleave the configurations (each round times every one once, in a
  rotated order), so a change in the machine's load hits them alike; the table shows the median round.
- latency: one user with C candidates (--candidates, one thread): `Scorer.score_work` on the prepared batch
  (the two graphs, or torch's user and candidate sides) and `Scorer.score_batch` on raw ids (encoding
  included), --calls calls each after a warm-up; p50 and p99.

Model and file as benchmarks/score.py makes them (its helpers, imported): a freshly initialised default-size
DMR over a synthetic candidate file, exported with FP16 and INT8 (gates off: the weights are random) unless
--run names an exported run. The export is redone when it lacks the CPU INT8 graphs or with --reexport.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import score as score_bench  # noqa: E402  (benchmarks/score.py: the model and file helpers)

CONFIGS = [
    ("torch", "fp32"),
    ("torch", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "fp16"),
    ("onnxruntime", "int8"),
    ("onnxruntime", "int8-qdq"),
]


def make_scorer(run: Path, backend: str, precision: str, threads: int):
    """A Scorer; "int8-qdq" is onnxruntime int8 on the TensorRT-targeted Q/DQ graphs instead of the CPU flavour."""
    from dmrx.scoring import Scorer
    from dmrx.scoring.ort_backend import OrtBackend

    if precision != "int8-qdq":
        return Scorer(run, backend, precision, device="cpu", threads=threads)
    s = Scorer(run, backend, "fp32", device="cpu", threads=threads)
    s.backend = OrtBackend(s.export, "int8", "cpu", threads, cpu_flavour=False)
    return s


def ensure_export(run: Path, data: Path, force: bool) -> float | None:
    from dmrx.runtime import export_bundle
    from dmrx.runtime.ort import CPU_INT8

    exp = run / "export"
    if not force and export_bundle.is_export(exp):
        manifest = export_bundle.read(exp)
        wanted = [export_bundle.graph_name(g, p) for g in export_bundle.SPLIT_GRAPHS for p in ("fp16", CPU_INT8)]
        have = all(name in manifest["files"] for name in wanted)
        if have and manifest["version"] == export_bundle.VERSION:  # an older format is exported again
            return None
    from dmrx.export.pipeline import ExportOptions, export_run

    t0 = time.perf_counter()
    export_run(
        run,
        ExportOptions(fp16=True, int8=True, calib_data=data, eval_data=data, eval_rows=20_000, gate=False, force=True),
    )
    return time.perf_counter() - t0


def one_user(scorer, n: int, seed: int = 0) -> dict:
    """Raw-id columns of one user with n candidates: a 60-behaviour history, targets drawn like the file's."""
    rng = np.random.default_rng(seed)
    spec, table_of = scorer.spec, scorer.spec.table_of()
    vocabs = scorer.bundle.vocabs
    T = 60
    cols: dict = {"user": np.full(n, 1, np.int64), "hist_len": np.full(n, T, np.int64)}
    for f in spec.behaviors:
        ids = vocabs[table_of[f"hist/{f}"]].ids
        cols[f"hist/{f}"] = np.repeat(rng.choice(ids, T)[None, :], n, axis=0)
    for k in spec.batch_keys():
        if k == "user":
            continue
        if k.startswith("dense/"):
            cols[k] = rng.normal(3.0, 0.8, n).astype(np.float32)
        elif k.startswith("profile/"):
            cols[k] = np.full(n, rng.choice(vocabs[table_of[k]].ids), np.int64)
        else:
            cols[k] = rng.choice(vocabs[table_of[k]].ids, n)
    return cols


def latency(scorer, n: int, calls: int) -> dict:
    cols = one_user(scorer, n)
    work, _ = scorer.prepare(cols)
    out = {}
    for name, fn in (("model", lambda: scorer.score_work(work)), ("end_to_end", lambda: scorer.score_batch(cols))):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = {"p50_ms": 1e3 * float(np.percentile(ts, 50)), "p99_ms": 1e3 * float(np.percentile(ts, 99))}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="candidates in the synthetic file")
    ap.add_argument("--per-user", type=int, default=20, help="candidates per user in the file")
    ap.add_argument("--mean-len", type=int, default=60, help="mean behaviours per user")
    ap.add_argument("--file", type=Path, default=None, help="candidate file (default /tmp/dmrx-bench-score-ROWS.h5)")
    ap.add_argument("--run", type=Path, default=None, help="a run to use (default: a fresh model, as score.py's)")
    ap.add_argument("--reexport", action="store_true", help="export the run again even when it has an export")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts for rows/s")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--candidates", default="200,1000", help="comma-separated candidate counts for one-user latency")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per latency figure")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every rows/s configuration")
    ap.add_argument("--only", default=None, help="comma-separated backend:precision pairs (int8-qdq: Q/DQ graphs)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    import torch

    threads = [int(x) for x in args.threads.split(",")]
    sizes = [int(x) for x in args.candidates.split(",")]
    path = args.file or Path(tempfile.gettempdir()) / f"dmrx-bench-score-{args.rows}.h5"
    if not path.exists():
        score_bench.make_file(path, args.rows, args.per_user, args.mean_len)
    users = max(1, args.rows // args.per_user)
    run = args.run or Path(tempfile.gettempdir()) / f"dmrx-bench-edge-run-{users}"
    if not (run / "manifest.json").exists():
        score_bench.make_run(run, path, users)
    export_s = ensure_export(run, path, args.reexport)
    wanted = None if args.only is None else {tuple(x.split(":")) for x in args.only.split(",")}
    configs = [c for c in CONFIGS if wanted is None or c in wanted]

    from dmrx.scoring import score_file

    rates: dict[tuple, list[float]] = {}
    loads: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory(prefix="dmrx-bench-edge-") as tmp:
        scorers = {}
        for backend, precision in configs:
            for t in threads:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                scorers[(backend, precision, t)] = make_scorer(run, backend, precision, t)
                loads[(backend, precision, t)] = time.perf_counter() - t0
        keys = list(scorers)
        for r in range(args.rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                torch.set_num_threads(key[2])
                out = Path(tmp) / "scores.h5"
                t0 = time.perf_counter()
                s = score_file(path, out=out, batch_size=args.batch_size, scorer=scorers[key])
                rates.setdefault(key, []).append(s["rows"] / (time.perf_counter() - t0))
                out.unlink()
        torch.set_num_threads(1)
        lat = {}
        for backend, precision in configs:
            scorer = scorers.get((backend, precision, 1)) or make_scorer(run, backend, precision, 1)
            lat[(backend, precision)] = {n: latency(scorer, n, args.calls) for n in sizes}

    def ratio_median(a: tuple, b: tuple) -> float | None:
        if a not in rates or b not in rates:
            return None
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    rows = []
    for backend, precision in configs:
        row = {"backend": backend, "precision": precision, "threads": {}, "latency": {}}
        for t in threads:
            k = (backend, precision, t)
            row["threads"][str(t)] = {
                "rows_per_s": statistics.median(rates[k]),
                "rounds": rates[k],
                "load_s": loads[k],
                "vs_onnxruntime_fp32": ratio_median(k, ("onnxruntime", "fp32", t)),
                "vs_torch_fp32": ratio_median(k, ("torch", "fp32", t)),
            }
        row["latency"] = {str(n): v for n, v in lat[(backend, precision)].items()}
        row["path"] = scorers[(backend, precision, threads[0])].describe().get("path")
        rows.append(row)
    goals = {}
    for t in threads:
        i8 = ratio_median(("onnxruntime", "int8", t), ("onnxruntime", "fp32", t))
        f32 = ratio_median(("onnxruntime", "fp32", t), ("torch", "fp32", t))
        goals[f"{t}_threads"] = {
            "int8_vs_fp32_artifact": i8,
            "int8_goal_1.5x": None if i8 is None else i8 >= 1.5,
            "ort_fp32_vs_torch_fp32": f32,
            "ort_fp32_goal_0.8x": None if f32 is None else f32 >= 0.8,
        }
    if ("onnxruntime", "int8") in lat and 200 in sizes:
        p50 = lat[("onnxruntime", "int8")][200]["model"]["p50_ms"]
        goals["int8_one_user_200_p50_ms"] = p50
        goals["int8_one_user_200_goal_3ms"] = p50 <= 3.0
    summary = {
        "file": str(path),
        "rows": args.rows,
        "per_user": args.per_user,
        "run": str(run),
        "model": "freshly initialised DMRConfig() (default size)"
        if "freshly initialised" in (run / "summary.json").read_text()
        else f"trained run {run}",
        "export_s": export_s,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cpu": score_bench._cpu_name(),
        "vnni": _has_vnni(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "configs": rows,
        "goals": goals,
    }
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    _print(summary, threads, sizes)


def _has_vnni() -> bool | None:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _print(s: dict, threads: list[int], sizes: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 160))
    t = Table(
        title=f"dmrx on CPU: {s['rows']:,} candidates (~{s['per_user']} per user), batch {s['batch_size']}, "
        f"median of {s['rounds']} interleaved rounds; {s['model']}"
    )
    t.add_column("configuration")
    for n in threads:
        t.add_column(f"rows/s, {n} thr", justify="right")
        t.add_column(f"vs ORT fp32 ({n})", justify="right")
        t.add_column(f"vs torch fp32 ({n})", justify="right")
    for n in sizes:
        t.add_column(f"1 user x {n}: p50 / p99 ms", justify="right")
    t.add_column(f"{sizes[0]} end to end p50", justify="right") if sizes else None
    for r in s["configs"]:
        cells = [f"{r['backend']} {r['precision']}"]
        for n in threads:
            x = r["threads"][str(n)]
            cells += [
                f"{x['rows_per_s']:,.0f}",
                "-" if x["vs_onnxruntime_fp32"] is None else f"{x['vs_onnxruntime_fp32']:.2f}x",
                "-" if x["vs_torch_fp32"] is None else f"{x['vs_torch_fp32']:.2f}x",
            ]
        for n in sizes:
            m = r["latency"][str(n)]["model"]
            cells.append(f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f}")
        if sizes:
            cells.append(f"{r['latency'][str(sizes[0])]['end_to_end']['p50_ms']:.2f}")
        t.add_row(*cells)
    con.print(t)
    con.print(f"CPU: {s['cpu']}, VNNI: {s['vnni']}, 1-min load {s['load_avg_1m']:.2f}. Goals: {json.dumps(s['goals'])}")


if __name__ == "__main__":
    main()
