"""Retrieval speed on a synthetic item table (default 1M items x d = 32), and the Amazon Beauty quality check.

    python benchmarks/retrieve.py                      # 1M x 32, 2 threads; rich table
    python benchmarks/retrieve.py --items 100000 --json
    python benchmarks/retrieve.py --amazon ../shared/data/amazon-beauty   # DMR vs most-popular, leave-last-out

Speed (one run, one process, `--threads` compute threads for torch, ONNX Runtime and faiss searches):
Wall-clock figures are reported with the process CPU time beside them (CPU ms per query, GB per CPU-second,
users per CPU-second): on a shared machine the CPU time is the steadier number, and with --threads 1 it
approximates what an idle core does.

- One user at a time: exact fp32 search (dmrx's blocked matrix product with a running top-k; also a plain
  torch mat-vec + topk for reference) against the int8 two-stage path (one pass over an int8 copy of V',
  block-max shortlist, exact fp32 re-ranking). Median and p90 latency over `--queries` users, recall@K
  against exact fp32, and memory bandwidth = bytes of the table read per query / median latency (4*N*d for
  fp32, N*d for int8; the scores the pass writes and re-reads are not counted).
- Many users: exact users/s (users in blocks of 256 against item chunks: V' read once per block), and faiss
  HNSW (inner product) users/s at the smallest efSearch of the sweep whose recall@K >= --target-recall.
  HNSW is built with `--build-threads` (construction time is reported, it is not a search figure).

Synthetic table: 4,096 cluster centres in d dimensions, items = centre + noise, item norms log-normal (a
popularity-like spread), users drawn like items; fixed seed. Realistic rather than worst case: iid Gaussian
vectors are the hardest case for HNSW and much easier for the int8 shortlist.

Amazon (needs the importer dmrx/data/amazon.py): imports NAME.txt (leave-last-out: last item = test
positive, history = the items before it), trains DMR (`--epochs`, on CUDA when available), and prints
HitRate/Recall/NDCG@{10,50,100} of DMR's u . v' against most-popular (training-behaviour counts) on the
test positives; the check passes when DMR's HitRate@50 beats most-popular's.
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


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def synthetic(n: int, d: int, users: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, d)).astype(np.float32)
    items = np.empty((n, d), np.float32)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        c = centres[rng.integers(0, len(centres), m)]
        v = c + 0.6 * rng.standard_normal((m, d)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        items[s : s + m] = v * rng.lognormal(0.0, 0.35, (m, 1)).astype(np.float32) * 0.2
    c = centres[rng.integers(0, len(centres), users)]
    u = (c + 0.8 * rng.standard_normal((users, d))).astype(np.float32)
    return items, u


def latencies(fn, queries: np.ndarray, warmup: int = 3) -> tuple[np.ndarray, list]:
    """Wall-clock ms per query (and the process CPU ms per query in LAST_CPU_MS: on a shared machine the
    CPU time is the steadier figure; with one thread it approximates the latency on an idle core)."""
    global LAST_CPU_MS
    for q in queries[:warmup]:
        fn(q[None])
    times, rows = [], []
    c0 = time.process_time()
    for q in queries:
        t = time.perf_counter()
        r = fn(q[None])
        times.append(time.perf_counter() - t)
        rows.append(r)
    LAST_CPU_MS = (time.process_time() - c0) / max(len(queries), 1) * 1e3
    return np.array(times) * 1e3, rows


LAST_CPU_MS = float("nan")


def bench_speed(args) -> dict:
    import torch

    from dmrx.retrieval.search import ExactSearch, Int8Search, recall

    set_threads(args.threads)
    k = args.k
    t0 = time.perf_counter()
    items, users = synthetic(args.items, args.dim, max(args.users, args.queries), args.seed)
    n, d = items.shape
    res: dict = {
        "items": n,
        "dim": d,
        "k": k,
        "threads": args.threads,
        "queries": args.queries,
        "batch_users": args.users,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "make_s": round(time.perf_counter() - t0, 2),
    }
    exact = ExactSearch(items)
    q = users[: args.queries]
    ref = exact.search(q, k)[0]

    single = {}
    ms, _ = latencies(lambda x: exact.search(x, k), q)
    single["exact fp32"] = {"ms": ms, "cpu_ms": LAST_CPU_MS, "bytes": n * d * 4, "recall": 1.0}
    vt = torch.from_numpy(items)

    def naive(x):
        return torch.topk(vt @ torch.from_numpy(x[0]), k).indices.numpy()[None]

    ms, rows = latencies(naive, q)
    single["exact fp32, torch mv + topk"] = {
        "ms": ms,
        "cpu_ms": LAST_CPU_MS,
        "bytes": n * d * 4,
        "recall": recall(np.concatenate(rows), ref),
    }
    t = time.perf_counter()
    int8 = Int8Search(items, shortlist=args.shortlist, threads=args.threads)
    res["int8_prepare_s"] = round(time.perf_counter() - t, 2)
    ms, rows = latencies(lambda x: int8.search(x, k)[0], q)
    single[f"int8 pass + fp32 re-rank of {args.shortlist}"] = {
        "ms": ms,
        "cpu_ms": LAST_CPU_MS,
        "bytes": n * d,
        "recall": recall(np.concatenate(rows), ref),
    }
    res["single_user"] = {
        name: {
            "median_ms": float(np.median(v["ms"])),
            "p90_ms": float(np.percentile(v["ms"], 90)),
            "min_ms": float(v["ms"].min()),
            f"recall@{k}": v["recall"],
            "table_bytes": v["bytes"],
            "gb_per_s": v["bytes"] / np.median(v["ms"]) / 1e6,
            "mean_cpu_ms": v["cpu_ms"],
            "gb_per_cpu_s": v["bytes"] / v["cpu_ms"] / 1e6,
        }
        for name, v in single.items()
    }

    batch = users[: args.users]
    exact.search(batch[:256], k)  # warm
    t, c = time.perf_counter(), time.process_time()
    ref_b, _ = exact.search(batch, k)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    many = {
        "exact fp32, batched": {
            "users_per_s": len(batch) / dt,
            "users_per_cpu_s": len(batch) / dc,
            f"recall@{k}": 1.0,
            "seconds": dt,
        }
    }
    if not args.no_hnsw:
        try:
            from dmrx.retrieval.search import HnswSearch, faiss_module

            faiss_module()
        except Exception as e:  # noqa: BLE001 -- the [faiss] extra is optional
            many["hnsw"] = {"skipped": str(e)}
        else:
            set_threads(args.build_threads)
            t = time.perf_counter()
            hnsw = HnswSearch.build(items, m=args.hnsw_m, ef_construction=args.ef_construction)
            build_s = time.perf_counter() - t
            set_threads(args.threads)
            sweep = []
            for ef in args.ef_search:
                hnsw.search(batch[:64], k, ef_search=ef)
                t, c = time.perf_counter(), time.process_time()
                rows, _ = hnsw.search(batch, k, ef_search=ef)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                sweep.append(
                    {
                        "ef_search": max(ef, k),
                        "users_per_s": len(batch) / dt,
                        "users_per_cpu_s": len(batch) / dc,
                        f"recall@{k}": recall(rows, ref_b),
                    }
                )
                if sweep[-1][f"recall@{k}"] >= args.target_recall:
                    break
            ok = [s for s in sweep if s[f"recall@{k}"] >= args.target_recall]
            best = ok[0] if ok else sweep[-1]
            many[f"hnsw (M {args.hnsw_m}, efSearch {best['ef_search']})"] = {
                "users_per_s": best["users_per_s"],
                "users_per_cpu_s": best["users_per_cpu_s"],
                f"recall@{k}": best[f"recall@{k}"],
                "build_s": build_s,
                "build_threads": args.build_threads,
                "sweep": sweep,
                "meets_target": bool(ok),
            }
    res["many_users"] = many
    res["target_recall"] = args.target_recall
    return res


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs visible)"
    except OSError:
        pass
    return "unknown"


def bench_amazon(args) -> dict:
    try:
        from dmrx.data.importers.amazon import import_amazon
    except ImportError:
        raise SystemExit("--amazon needs the Amazon importer (dmrx/data/amazon.py, `dmrx data amazon`)") from None
    from dmrx.models import bundle
    from dmrx.models.dmr import DMRConfig
    from dmrx.progress import progress
    from dmrx.retrieval.evaluate import evaluate
    from dmrx.training.trainer import TrainConfig, train

    src = Path(args.amazon)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dmrx-amazon-"))
    data = work / "data"
    res: dict = {"src": str(src), "name": args.amazon_name, "work": str(work)}
    t = time.perf_counter()
    if not (data / "test.h5").exists():
        data.mkdir(parents=True, exist_ok=True)
        res["import"] = import_amazon(src, args.amazon_name, data, seed=0, max_len=50)
    res["import_s"] = round(time.perf_counter() - t, 1)
    run = work / "run"
    t = time.perf_counter()
    if not (run / "manifest.json").exists():
        model_cfg = DMRConfig(embed_dim=args.embed_dim, max_len=50)
        train_cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            patience=args.epochs,
            seed=0,
            max_steps=args.max_steps,
        )
        with progress(enabled=not args.json) as start:
            res["train"] = train(data / "train.h5", data / "valid.h5", run, model_cfg, train_cfg, progress=start)
    res["train_s"] = round(time.perf_counter() - t, 1)
    b = bundle.load(run)
    t = time.perf_counter()
    res["eval"] = evaluate(b, data / "test.h5")
    res["eval_s"] = round(time.perf_counter() - t, 1)
    d, p = res["eval"]["dmr"]["hit_rate@50"], res["eval"]["most_popular"]["hit_rate@50"]
    res["dmr_beats_most_popular_at_50"] = bool(d > p)
    return res


def print_speed(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    k = res["k"]
    t = Table(
        title=f"one user: {res['items']:,} items x d={res['dim']}, {res['threads']} threads, top {k}, "
        f"{res['queries']} queries ({res['cpu']})"
    )
    for c in ("path", "median ms", "p90 ms", "min ms", "CPU ms", f"recall@{k}", "GB/s", "GB/CPU-s"):
        t.add_column(c, justify="left" if c == "path" else "right")
    for name, v in res["single_user"].items():
        t.add_row(
            name,
            f"{v['median_ms']:.2f}",
            f"{v['p90_ms']:.2f}",
            f"{v['min_ms']:.2f}",
            f"{v['mean_cpu_ms']:.2f}",
            f"{v[f'recall@{k}']:.4f}",
            f"{v['gb_per_s']:.1f}",
            f"{v['gb_per_cpu_s']:.1f}",
        )
    con.print(t)
    t = Table(title=f"many users: {res['batch_users']:,} users, top {k}, {res['threads']} threads")
    for c in ("search", "users/s", "users/CPU-s", f"recall@{k}", "note"):
        t.add_column(c, justify="left" if c in ("search", "note") else "right")
    for name, v in res["many_users"].items():
        if "skipped" in v:
            t.add_row(name, "-", "-", "-", v["skipped"])
            continue
        note = ""
        if "build_s" in v:
            note = f"built in {v['build_s']:.1f} s ({v['build_threads']} threads); efSearch sweep " + ", ".join(
                f"{s['ef_search']}: {s[f'recall@{k}']:.3f}" for s in v["sweep"]
            )
            if not v["meets_target"]:
                note += f"; recall {res['target_recall']} NOT reached"
        t.add_row(name, f"{v['users_per_s']:,.0f}", f"{v['users_per_cpu_s']:,.0f}", f"{v[f'recall@{k}']:.4f}", note)
    con.print(t)


def print_amazon(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = res["eval"]
    t = Table(title=f"Amazon {res['name']} leave-last-out: {ev['queries']:,} test users, {ev['items']:,} items")
    for c in ("metric", "K", "DMR u . v'", "most popular"):
        t.add_column(c, justify="right")
    for m in ("hit_rate", "recall", "ndcg"):
        for k in ev["k"]:
            t.add_row(m, str(k), f"{ev['dmr'][f'{m}@{k}']:.4f}", f"{ev['most_popular'][f'{m}@{k}']:.4f}")
    Console().print(t)
    verdict = "beats" if res["dmr_beats_most_popular_at_50"] else "does NOT beat"
    Console().print(
        f"DMR {verdict} most-popular at K = 50 (HitRate@50 {ev['dmr']['hit_rate@50']:.4f} vs "
        f"{ev['most_popular']['hit_rate@50']:.4f}); train {res['train_s']} s, eval {res['eval_s']} s"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--queries", type=int, default=200, help="single-user queries timed one by one")
    ap.add_argument("--users", type=int, default=4096, help="users searched as a batch")
    ap.add_argument("--shortlist", type=int, default=1024, help="int8 shortlist re-ranked in fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-hnsw", action="store_true")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=128)
    ap.add_argument(
        "--ef-search",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[50, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
        help="HNSW efSearch sweep (comma-separated, ascending; values below k search with k)",
    )
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amazon", metavar="DIR", help="run the Amazon quality check on DIR (S3-Rec layout)")
    ap.add_argument("--amazon-name", default="Beauty")
    ap.add_argument("--work", help="--amazon: directory for the imported data and the run (reused if present)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="--amazon: stop training after this many steps (0: no limit; for smoke runs)",
    )
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.amazon:
        res = bench_amazon(args)
        show = print_amazon
    else:
        res = bench_speed(args)
        show = print_speed
    if args.json:
        sys.stdout.write(json.dumps(res, indent=2, default=float) + "\n")
    else:
        show(res)


if __name__ == "__main__":
    main()
