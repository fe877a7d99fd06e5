"""Training step time against vocabulary size: sparse gradients + SparseAdam vs dense Adam over every table.

A step's cost must not grow with the vocabulary: with Alimama-sized tables (about 3M rows in all) the
sparse step stays within 1.5x of the step at 10k rows. The "dense" column is the straightforward
implementation (dense embedding gradients, Adam over every table), measured in the same run.

    python benchmarks/train_speed.py            # rich table
    python benchmarks/train_speed.py --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dmrx.data.features import FeatureSpec
from dmrx.models.dmr import DMR, DMRConfig
from dmrx.training.trainer import NegativeSampler, _optimizers

T = 50
# Alimama-like tables: behaviours carry cate/brand/btag, the target adds item, campaign, customer
ALIMAMA = {
    "item": 846_812,
    "cate": 12_978,
    "brand": 461_529,
    "btag": 5,
    "campaign": 423_437,
    "customer": 255_876,
    "user": 1_141_730,
    "profile_age": 8,
    "profile_gender": 3,
    "context_pid": 3,
}


def _spec() -> FeatureSpec:
    tables = {
        "item": ["target/item"],
        "cate": ["hist/cate", "target/cate"],
        "brand": ["hist/brand", "target/brand"],
        "btag": ["hist/btag"],
        "campaign": ["target/campaign"],
        "customer": ["target/customer"],
        "user": ["user_index"],
        "profile_age": ["profile/age"],
        "profile_gender": ["profile/gender"],
        "context_pid": ["context/pid"],
    }
    return FeatureSpec(
        behaviors=["cate", "brand", "btag"],
        target=["item", "cate", "brand", "campaign", "customer"],
        profile=["age", "gender"],
        context=["pid"],
        dense=["price"],
        match_field="cate",
        use_user_id=True,
        tables=tables,
        dense_mean={"price": 0.0},
        dense_std={"price": 1.0},
    )


def _sizes(scale: float) -> dict[str, int]:
    return {t: max(4, int(n * scale)) for t, n in ALIMAMA.items()}


def _batches(sizes: dict[str, int], spec: FeatureSpec, n: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table_of = spec.table_of()
    out = []
    for _ in range(n):
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = torch.arange(T).unsqueeze(0) >= (T - lengths).unsqueeze(1)
        b = {"hist_len": lengths, "dense/price": torch.randn(B, generator=g), "label": (torch.rand(B) < 0.05).float()}
        for key, table in table_of.items():
            shape = (B, T) if key.startswith("hist/") else (B,)
            ids = torch.randint(1, sizes[table], shape, generator=g)
            b[key] = ids * mask if key.startswith("hist/") else ids
        out.append(b)
    return out


def step_time(sizes: dict[str, int], dense: bool, steps: int, B: int) -> float:
    torch.manual_seed(0)
    spec = _spec()
    model = DMR(DMRConfig(match_field="cate"), spec, sizes)
    if dense:  # the straightforward implementation: dense gradients, Adam over every table
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.sparse = False
        opts = [torch.optim.Adam(model.parameters(), lr=1e-3)]
    else:
        opts = list(_optimizers(model, 1e-3))
    counts = torch.ones(sizes["cate"], dtype=torch.float64).numpy()
    sampler = NegativeSampler(counts, 2000, 0, torch.device("cpu"))
    batches = _batches(sizes, spec, steps + 3, B)

    def one(b, step):
        out = model(b, sampler.sample(step), sampler.log_q)
        loss = F.binary_cross_entropy_with_logits(out["logit"], b["label"]) + 0.1 * out["aux"]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    for i, b in enumerate(batches[:3]):  # warm-up (allocations, Adam state creation)
        one(b, i)
    t0 = time.perf_counter()
    for i, b in enumerate(batches[3:]):
        one(b, i)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    small_scale = 10_000 / sum(ALIMAMA.values())
    rows = []
    for label, scale in (("10k rows", small_scale), ("Alimama (3.1M rows)", 1.0)):
        sizes = _sizes(scale)
        res = {"vocab": label, "table_rows": sum(sizes.values())}
        for kind in ("sparse", "dense"):
            res[f"{kind}_ms"] = 1000 * step_time(sizes, kind == "dense", args.steps, args.batch_size)
            res[f"{kind}_examples_per_s"] = args.batch_size / res[f"{kind}_ms"] * 1000
        rows.append(res)
    ratio = {k: rows[1][f"{k}_ms"] / rows[0][f"{k}_ms"] for k in ("sparse", "dense")}
    result = {
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "rows": rows,
        "growth_sparse": ratio["sparse"],
        "growth_dense": ratio["dense"],
        "sparse_speedup_at_alimama_size": rows[1]["dense_ms"] / rows[1]["sparse_ms"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DMR training step, batch {args.batch_size}, {torch.get_num_threads()} threads")
    for col in ("vocabulary", "table rows", "sparse+LazyAdam ms", "ex/s", "dense Adam ms", "ex/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["vocab"],
            f"{r['table_rows']:,}",
            f"{r['sparse_ms']:.1f}",
            f"{r['sparse_examples_per_s']:,.0f}",
            f"{r['dense_ms']:.1f}",
            f"{r['dense_examples_per_s']:,.0f}",
        )
    Console().print(table)
    Console().print(
        f"step time growth 10k -> 3.1M rows: sparse {ratio['sparse']:.2f}x (goal <= 1.5x), dense {ratio['dense']:.2f}x"
    )


if __name__ == "__main__":
    main()
