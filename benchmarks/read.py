"""Reader throughput: examples/s of assembled training batches from a 1M-example dmrx file, on one core.

    python benchmarks/read.py                       # writes /tmp/dmrx-bench-read.h5 once, then reuses it
    python benchmarks/read.py --file big.h5 --json  # machine-readable

The file has a synthetic shape: ~50k users with ~100 behaviours each (item/cate/brand/btag), ~20 examples per
user, each seeing a prefix of its user's sequence, plus profile/target/context/dense fields, label and prob
like `dmrx data synthetic` writes. Batches are 256 x T=50, shuffled, read with and without a Vocab encoder
for every id field. The process is pinned to one CPU (sched_setaffinity) where the OS allows it.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy is imported
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dmrx.data.format import Writer  # noqa: E402
from dmrx.data.reader import DataFile  # noqa: E402
from dmrx.data.vocab import Vocab  # noqa: E402

BEHAVIOR_FIELDS = ["item", "cate", "brand", "btag"]


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu} (sched_setaffinity)"
    return "not pinned (sched_setaffinity unavailable on this OS)"


def make_file(path: Path, examples: int, users: int, mean_len: int, seed: int = 0) -> None:
    """Write a synthetic-shaped file with the streaming Writer, in per-user blocks (bounded memory)."""
    rng = np.random.default_rng(seed)
    n_items, n_cates, n_brands = 200_000, 5_000, 50_000
    item_cate = rng.integers(1, n_cates + 1, n_items + 1)
    item_brand = rng.integers(1, n_brands + 1, n_items + 1)
    item_pop = rng.zipf(1.3, 4 * n_items) % n_items + 1  # a skewed pool to draw items from
    lengths = np.clip(rng.poisson(mean_len, users), 1, None)
    per_user = rng.multinomial(examples, np.full(users, 1.0 / users))  # ~examples/users each, sum exact
    gender, age, shopping = (rng.integers(1, k + 1, users) for k in (2, 7, 3))
    block = 5_000
    with Writer(path, BEHAVIOR_FIELDS, attrs={"source": "dmrx benchmarks/read.py", "seed": seed}) as w:
        for u0 in range(0, users, block):
            us = np.arange(u0, min(u0 + block, users))
            ln = lengths[us]
            items = rng.choice(item_pop, int(ln.sum()))
            first = w.add_sequences(
                ln,
                item=items,
                cate=item_cate[items],
                brand=item_brand[items],
                btag=rng.choice([1, 2, 3, 4], len(items), p=[0.85, 0.06, 0.04, 0.05]),
            )
            user = np.repeat(us, per_user[us])
            end = np.floor(rng.random(len(user)) * (lengths[user] + 1)).astype(np.int64)
            order = np.lexsort((end, user))
            user, end = user[order], end[order]
            target = rng.choice(item_pop, len(user))
            prob = (1 / (1 + np.exp(-rng.normal(-3.2, 1.0, len(user))))).astype(np.float32)
            w.add_examples(
                seq=first + user - u0,
                end=end,
                user=user + 1,
                label=(rng.random(len(user)) < prob).astype(np.int8),
                prob=prob,
                profile={"gender": gender[user], "age": age[user], "shopping": shopping[user]},
                target={"item": target, "cate": item_cate[target], "brand": item_brand[target]},
                context={"pid": rng.integers(1, 3, len(user))},
                dense={"price": rng.normal(3.0, 0.8, len(user)).astype(np.float32)},
            )


def build_encoder(data: DataFile):
    """A Vocab per id field, built from the whole file (outside the timing); hist/x shares target/x's."""
    vocabs: dict[str, Vocab] = {}
    for f in data.fields.behaviors:
        vocabs[f] = Vocab.build(values=data._read(f"behaviors/{f}"))  # the whole column: fine at 1M rows
    cols = data.read_columns(
        0,
        data.n_rows,
        ["user"] + [f"{g}/{f}" for g in ("profile", "target", "context") for f in getattr(data.fields, g)],
    )
    for k, v in cols.items():
        name = k.split("/", 1)[1] if k.startswith("target/") else k
        vocabs[name] = Vocab.build(values=v) if name not in vocabs else vocabs[name]
    by_key = {}
    for f in data.fields.behaviors:
        by_key[f"hist/{f}"] = vocabs[f]
    for k in cols:
        by_key[k] = vocabs[k.split("/", 1)[1] if k.startswith("target/") else k]
    return lambda key, raw: by_key[key].encode(raw)


def measure(data: DataFile, encoder, repeat: int, batch_size: int, max_len: int) -> dict:
    """Wall-clock and CPU-time rates per pass; on a shared machine the CPU-time rate is the steadier one."""
    wall, cpu = [], []
    for epoch in range(repeat):
        n = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in data.batches(batch_size, max_len, shuffle=True, epoch=epoch, encoder=encoder):
            n += len(batch["hist_len"])
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / (time.process_time() - c0))
        assert n == data.n_rows
    return {
        "examples_per_s_best": max(wall),
        "examples_per_s_median": float(np.median(wall)),
        "examples_per_cpu_s_best": max(cpu),
        "examples_per_cpu_s_median": float(np.median(cpu)),
        "runs": len(wall),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--file",
        type=Path,
        default=Path("/tmp/dmrx-bench-read.h5"),
        help="the data file; written first if it does not exist",
    )
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--mean-len", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the file per setting")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    pinned = "not pinned (--no-pin)" if args.no_pin else pin_one_core()
    wrote = None
    if not args.file.exists():
        t0 = time.perf_counter()
        make_file(args.file, args.examples, args.users, args.mean_len)
        wrote = time.perf_counter() - t0
    with DataFile(args.file) as data:
        encoder = build_encoder(data)
        results = {
            "file": str(args.file),
            "file_bytes": args.file.stat().st_size,
            "rows": data.n_rows,
            "sequences": data.n_sequences,
            "behaviors": data.n_behaviors,
            "batch_size": args.batch_size,
            "max_len": args.max_len,
            "shuffle": True,
            "cpu": pinned,
            "write_s": wrote,
            "raw": measure(data, None, args.repeat, args.batch_size, args.max_len),
            "encoded": measure(data, encoder, args.repeat, args.batch_size, args.max_len),
        }
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"dmrx reader: {results['rows']:,} examples, batch {args.batch_size}, "
        f"T={args.max_len}, shuffled; {pinned}"
    )
    table.add_column("encoder")
    table.add_column("examples/s wall (best)", justify="right")
    table.add_column("wall (median)", justify="right")
    table.add_column("examples/CPU-s (best)", justify="right")
    table.add_column("CPU (median)", justify="right")
    table.add_column("runs", justify="right")
    for name in ("raw", "encoded"):
        r = results[name]
        table.add_row(
            "none" if name == "raw" else "Vocab, every id field",
            *(
                f"{r[k]:,.0f}"
                for k in (
                    "examples_per_s_best",
                    "examples_per_s_median",
                    "examples_per_cpu_s_best",
                    "examples_per_cpu_s_median",
                )
            ),
            str(r["runs"]),
        )
    Console().print(table)
    if wrote is not None:
        Console().print(f"wrote {args.file} in {wrote:.1f} s")


if __name__ == "__main__":
    main()
