"""Batch-scoring throughput: rows/s of `dmrx score` per backend and precision, against naive per-row scoring.

    python benchmarks/score.py                          # 1M candidates, ~20 per user, 2 threads
    python benchmarks/score.py --rows 100000 --json     # small, machine-readable
    python benchmarks/score.py --run runs/NAME          # a trained run instead of a fresh model

The candidate file is synthetic but shaped like `dmrx data synthetic` output at Alimama-like scale:
rows/20 users with ~60-behaviour histories (item/cate/brand/btag; every candidate sees its user's whole
history, as candidates are scored "now"), profile gender/age/shopping, targets item/cate/brand drawn from
a skewed pool of 200k items, context pid and dense price. Written once to --file and reused.

The model is, unless --run names a trained one, a freshly initialised DMR of the default DMRConfig
(embed 32, T = 50, additive attention 64, MLP 512-256-128) with vocabularies covering the file's ids:
the arithmetic per row is what matters for throughput, not the weights. With --export the run is
exported (FP32, FP16 and INT8 graphs; quality gates off, the weights being random) so that the
onnxruntime configurations are timed as well.

Every configuration is timed end to end through `dmrx.scoring.score_file` (read, encode, score, commit,
write the output), after loading the model; naive scoring is torch eager, the full model on one row at a
time (no grouping, no batching), timed on a sample of --naive-rows rows and extrapolated. FLOPs per
candidate are counted from the model's shapes (dmrx.scoring.flops_per_candidate); the machine's peak is
measured in the same run as the best of a few 4096^3 fp32 torch matmuls on the same threads. Wall-clock
rates depend on what else runs on the machine: CPU seconds are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BEHAVIORS = ["item", "cate", "brand", "btag"]
N_ITEMS, N_CATES, N_BRANDS = 200_000, 5_000, 50_000


def make_file(path: Path, rows: int, per_user: int, mean_len: int, seed: int = 0) -> None:
    from dmrx.data.format import Writer

    rng = np.random.default_rng(seed)
    item_cate = rng.integers(1, N_CATES + 1, N_ITEMS + 1)
    item_brand = rng.integers(1, N_BRANDS + 1, N_ITEMS + 1)
    pool = rng.zipf(1.3, 4 * N_ITEMS) % N_ITEMS + 1
    users = max(1, rows // per_user)
    counts = np.full(users, rows // users)
    counts[: rows - counts.sum()] += 1
    lengths = np.clip(rng.poisson(mean_len, users), 1, 4 * mean_len)
    block = 5_000
    with Writer(path, BEHAVIORS, attrs={"source": "dmrx benchmarks/score.py", "seed": seed}) as w:
        for u0 in range(0, users, block):
            us = np.arange(u0, min(u0 + block, users))
            ln = lengths[us]
            items = rng.choice(pool, int(ln.sum()))
            first = w.add_sequences(
                ln,
                item=items,
                cate=item_cate[items],
                brand=item_brand[items],
                btag=rng.choice([1, 2, 3, 4], len(items), p=[0.85, 0.06, 0.04, 0.05]),
            )
            user = np.repeat(us, counts[us])
            target = rng.choice(pool, len(user))
            w.add_examples(
                seq=first + user - u0,
                end=lengths[user],
                user=user + 1,
                label=(rng.random(len(user)) < 0.05).astype(np.int8),  # for export's quality gates only
                profile={"gender": rng.integers(1, 3, users)[user], "age": (user % 7) + 1, "shopping": (user % 3) + 1},
                target={"item": target, "cate": item_cate[target], "brand": item_brand[target]},
                context={"pid": rng.integers(1, 3, len(user))},
                dense={"price": rng.normal(3.0, 0.8, len(user)).astype(np.float32)},
            )


def make_run(run_dir: Path, data_path: Path, users: int) -> Path:
    """A complete run bundle holding a freshly initialised default-size DMR over the file's id ranges."""
    import torch

    from dmrx.artifacts.atomic import write_json
    from dmrx.data.features import declare
    from dmrx.data.reader import DataFile
    from dmrx.data.vocab import Vocab
    from dmrx.models import bundle
    from dmrx.models.dmr import DMRConfig

    torch.manual_seed(0)
    with DataFile(data_path) as data:
        spec = declare(data.fields, "item", True)
    spec.dense_mean, spec.dense_std = {"price": 3.0}, {"price": 0.8}
    rng = {
        "item": N_ITEMS,
        "cate": N_CATES,
        "brand": N_BRANDS,
        "btag": 4,
        "profile_gender": 2,
        "profile_age": 7,
        "profile_shopping": 3,
        "context_pid": 2,
        "user": users,
    }
    vocabs = {t: Vocab(np.arange(1, rng[t] + 1)) for t in spec.tables}
    cfg = DMRConfig()
    model = bundle.build_model(cfg, spec, vocabs).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / "config.json", {"data": {"train": str(data_path), "valid": None}, "model": cfg.to_json(), "train": {}}
    )
    write_json(run_dir / "schema.json", spec.to_json())
    sampler = np.ones(len(vocabs["item"]))
    sampler[0] = 0
    bundle.save_vocabs(run_dir / "vocab.safetensors", vocabs, sampler)
    bundle.save_weights(model, run_dir / "model.safetensors")
    (run_dir / "metrics.jsonl").write_text("")
    write_json(run_dir / "summary.json", {"note": "freshly initialised by benchmarks/score.py"})
    bundle.write_manifest(run_dir)
    return run_dir


def peak_gflops(threads: int, n: int = 4096, repeat: int = 3) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def naive_rows_per_s(b, data_path: Path, sample: int) -> dict:
    """Full model, one row at a time, torch eager: the rows of one sampled batch, timed per row.

    One torch thread (per-row ops are too small to split; more threads only add synchronisation)."""
    import torch

    from dmrx.data.reader import DataFile
    from dmrx.evaluation.predict import to_tensors

    enc = b.encoder()
    with DataFile(data_path) as data:
        keys = sorted(set(b.spec.batch_keys()) | {"user"})
        n = min(sample, data.n_rows)
        batch = next(
            data.batches(
                n, b.model.cfg.max_len, encoder=enc, keys=keys, behavior_fields=list(b.spec.behaviors), row_range=(0, n)
            )
        )
        batch = enc.finish(batch)
    rows = [{k: v[i : i + 1] for k, v in batch.items() if k != "user"} for i in range(n)]
    model = b.model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        model(to_tensors(rows[0]))
        t0, c0 = time.perf_counter(), time.process_time()
        for r in rows:
            torch.sigmoid(model(to_tensors(r))["logit"])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(threads)
    return {"rows_timed": n, "wall_s": wall, "cpu_s": cpu, "rows_per_s": n / wall, "rows_per_cpu_s": n / cpu}


def configs(export) -> list[tuple[str, str]]:
    """(backend, precision) pairs this machine and bundle can run."""
    import torch

    from dmrx.runtime.tensorrt import unavailable_reason

    out = [("torch", "fp32"), ("torch", "int8")]
    if torch.cuda.is_available():
        out += [("torch-cuda", "fp32"), ("torch-cuda", "fp16"), ("torch-cuda", "bf16")]
    out += [("onnxruntime", p) for p in ("fp32", "fp16", "int8") if export and export.split_graphs(p)]
    if unavailable_reason() is None:
        out += [("tensorrt", p) for p in ("fp32", "fp16", "int8") if export and export.engines(p)]
    return out


def time_config(b, data_path: Path, backend: str, precision: str, threads: int, batch_size: int, out_dir: Path) -> dict:
    from dmrx.scoring import Scorer, score_file

    device = "cuda" if backend.endswith("-cuda") else ("cpu" if backend in ("torch", "onnxruntime") else None)
    t0 = time.perf_counter()
    scorer = Scorer(b, backend.replace("-cuda", ""), precision, device=device, threads=threads)
    load = time.perf_counter() - t0
    out = out_dir / f"{backend}-{precision}.scores.h5"
    c0, t0 = time.process_time(), time.perf_counter()
    s = score_file(data_path, out=out, batch_size=batch_size, scorer=scorer)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    desc = scorer.describe()
    return {
        "backend": backend,
        "precision": precision,
        "rows": s["rows"],
        "load_s": load,
        "wall_s": wall,
        "cpu_s": cpu,
        "rows_per_s": s["rows"] / wall,
        "rows_per_cpu_s": s["rows"] / cpu,
        "user_encodings": s["user_encodings"],
        "path": desc.get("path"),
        "providers": desc.get("providers"),
        "device": desc.get("device"),
        "output": str(out),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="candidates in the synthetic file")
    ap.add_argument("--per-user", type=int, default=20, help="candidates per user")
    ap.add_argument("--mean-len", type=int, default=60, help="mean behaviours per user")
    ap.add_argument("--file", type=Path, default=None, help="candidate file (default /tmp/dmrx-bench-score-ROWS.h5)")
    ap.add_argument(
        "--run",
        type=Path,
        default=None,
        help="a run to score with; a fresh default-size model is written there when it does not exist "
        "(default: one in the temp directory)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--naive-rows", type=int, default=300, help="rows timed for the naive path")
    ap.add_argument("--only", default=None, help="comma-separated backend:precision pairs to time")
    ap.add_argument(
        "--export",
        action="store_true",
        help="export the run (FP32, FP16, INT8; gates off) when it has no export, so onnxruntime "
        "(and TensorRT, with --engine) configurations are timed too",
    )
    ap.add_argument("--engine", action="store_true", help="with --export: also build TensorRT engines")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--save", type=Path, default=None, help="also write the JSON here, after every configuration")
    args = ap.parse_args(argv)

    import torch

    from dmrx.scoring import flops_per_candidate
    from dmrx.scoring.backends import load_model

    torch.set_num_threads(args.threads)
    path = args.file or Path(tempfile.gettempdir()) / f"dmrx-bench-score-{args.rows}.h5"
    wrote = None
    if not path.exists():
        t0 = time.perf_counter()
        make_file(path, args.rows, args.per_user, args.mean_len)
        wrote = time.perf_counter() - t0
    users = max(1, args.rows // args.per_user)
    run = args.run or Path(tempfile.gettempdir()) / f"dmrx-bench-score-run-{users}"
    if not (run / "manifest.json").exists():
        make_run(run, path, users)
    fresh = "freshly initialised" in (run / "summary.json").read_text()
    export_s = None
    if args.export and not (run / "export" / "manifest.json").exists():
        from dmrx.export.pipeline import ExportOptions, export_run

        t0 = time.perf_counter()
        export_run(
            run,
            ExportOptions(
                fp16=True,
                int8=True,
                calib_data=path,
                eval_data=path,
                eval_rows=20_000,
                gate=False,
                engine="tensorrt" if args.engine else None,
            ),
        )
        export_s = time.perf_counter() - t0
    b, export = load_model(run)
    flops = flops_per_candidate(b.model)
    peak = peak_gflops(args.threads)
    naive = naive_rows_per_s(b, path, args.naive_rows)
    wanted = None if args.only is None else {tuple(x.split(":")) for x in args.only.split(",")}
    results = []
    summary = {
        "file": str(path),
        "rows": args.rows,
        "per_user": args.per_user,
        "write_s": wrote,
        "export_s": export_s,
        "export": str(export.path) if export else None,
        "model": "freshly initialised DMRConfig() (default size)" if fresh else f"trained run {run}",
        "model_config": b.model.cfg.to_json(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "cpu": _cpu_name(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "flops_per_candidate": flops,
        "peak_gflops_fp32_matmul": peak,
        "naive": naive,
        "configs": results,
    }
    with tempfile.TemporaryDirectory(prefix="dmrx-bench-score-") as tmp:
        for backend, precision in configs(export):
            if wanted is not None and (backend, precision) not in wanted:
                continue
            try:
                r = time_config(b, path, backend, precision, args.threads, args.batch_size, Path(tmp))
            except Exception as e:  # a configuration that cannot run here is reported, not fatal
                r = {"backend": backend, "precision": precision, "error": f"{e.__class__.__name__}: {e}"}
            results.append(r)
            if args.save:
                args.save.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    ok = [r for r in results if "rows_per_s" in r]
    best = max(ok, key=lambda r: r["rows_per_s"]) if ok else None
    if best:
        achieved = best["rows_per_s"] * flops["grouped"] / 1e9
        summary["best"] = {
            "config": f"{best['backend']} {best['precision']}",
            "rows_per_s": best["rows_per_s"],
            "speedup_vs_naive": best["rows_per_s"] / naive["rows_per_s"],
            "gflops_achieved": achieved,
            "fraction_of_peak": achieved / peak,
            "goal_100k_rows_per_s": best["rows_per_s"] >= 100_000,
            "goal_10x_naive": best["rows_per_s"] >= 10 * naive["rows_per_s"],
        }
    if args.save:
        args.save.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    _print(summary)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _print(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 140))
    f = s["flops_per_candidate"]
    t = Table(
        title=f"dmrx score: {s['rows']:,} candidates, ~{s['per_user']} per user, {s['threads']} threads, "
        f"batch {s['batch_size']}; {s['model']}"
    )
    for col in ("configuration", "path", "rows/s (wall)", "rows/CPU-s", "vs naive", "GFLOP/s", "% of peak"):
        t.add_column(col, justify="left" if col in ("configuration", "path") else "right")
    naive = s["naive"]
    t.add_row(
        "naive torch eager",
        f"full model, 1 row/call ({naive['rows_timed']} rows timed)",
        f"{naive['rows_per_s']:,.0f}",
        f"{naive['rows_per_cpu_s']:,.0f}",
        "1.0x",
        f"{naive['rows_per_s'] * f['full'] / 1e9:.1f}",
        f"{100 * naive['rows_per_s'] * f['full'] / 1e9 / s['peak_gflops_fp32_matmul']:.1f}",
    )
    for r in s["configs"]:
        name = f"{r['backend']} {r['precision']}"
        if "error" in r:
            t.add_row(name, r["error"][:60], "-", "-", "-", "-", "-")
            continue
        path = (r.get("path") or "").replace("fused C attention kernel", "C attention kernel")
        if r.get("providers"):
            path = "+".join(p.replace("ExecutionProvider", "") for p in r["providers"])
        elif r.get("device"):
            path = f"{path} {r['device']}"
        g = r["rows_per_s"] * f["grouped"] / 1e9
        t.add_row(
            name,
            path[:60],
            f"{r['rows_per_s']:,.0f}",
            f"{r['rows_per_cpu_s']:,.0f}",
            f"{r['rows_per_s'] / naive['rows_per_s']:.1f}x",
            f"{g:.1f}",
            f"{100 * g / s['peak_gflops_fp32_matmul']:.1f}",
        )
    con.print(t)
    con.print(
        f"FLOPs per candidate: grouped candidate side {f['grouped'] / 1e6:.3f} M (+ {f['tanh_per_candidate']:,} "
        f"tanh), full per-row model {f['full'] / 1e6:.3f} M, user side {f['user_side'] / 1e6:.3f} M per "
        f"distinct history. Peak: {s['peak_gflops_fp32_matmul']:.1f} GFLOP/s (fp32 4096^3 matmul, "
        f"{s['threads']} threads). CPU: {s['cpu']}, 1-min load {s['load_avg_1m']}."
    )
    if "best" in s:
        b = s["best"]
        con.print(
            f"best: {b['config']} {b['rows_per_s']:,.0f} rows/s = {b['speedup_vs_naive']:.1f}x naive, "
            f"{b['gflops_achieved']:.1f} GFLOP/s = {100 * b['fraction_of_peak']:.1f}% of peak; goals "
            f">= 100k rows/s: {'met' if b['goal_100k_rows_per_s'] else 'NOT met'}, >= 10x naive: "
            f"{'met' if b['goal_10x_naive'] else 'NOT met'}"
        )
    if s.get("write_s"):
        con.print(f"wrote {s['file']} in {s['write_s']:.1f} s")


if __name__ == "__main__":
    main()
