"""Quality: train and evaluate DMR and its ablations over seeds; print mean and std.

Every choice (epochs via early stopping, options) is made on the validation split; the test split is read
once per seed, after training. Synthetic data also carries the true click probability, so the share of
the oracle's AUC gap over 0.5 that a model closes is reported: (AUC - 0.5) / (oracle - 0.5).

    python benchmarks/quality.py --dataset synthetic --seeds 3
    python benchmarks/quality.py --dataset amazon --seeds 3 --variants dmr,din_like
    python benchmarks/quality.py ... --json --markdown results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from dmrx.data.reader import DataFile
from dmrx.metrics import auc, report
from dmrx.model import DMRConfig
from dmrx.predict import predict
from dmrx.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
AMAZON = REPO.parent / "shared" / "data" / "amazon-beauty"

# DMR and the ablations of the paper's Table 2; din_like is DMR without relevance units or positions
VARIANTS = {
    "dmr": {},
    "din_like": {"use_u2i": False, "use_position": False, "use_r_hat": False},
    "i2i_only": {"use_u2i": False},
    "u2i_only": {"use_i2i": False},
    "no_aux": {"beta": 0.0},
    "no_position": {"use_position": False},
    "shared_double": {"shared_output": True},
}


def prepare(dataset: str, work: Path, data_seed: int) -> tuple[Path, dict]:
    """Write the dataset's train/valid/test files into work; return the dir and model defaults for it."""
    if dataset == "synthetic":
        from dmrx.data.synthetic import SyntheticConfig, generate

        generate(work, SyntheticConfig(seed=data_seed))
        return work, {}
    if dataset == "amazon":
        if not AMAZON.exists():
            raise SystemExit(f"{AMAZON} is absent: the Amazon Beauty benchmark needs ../shared/data/amazon-beauty")
        from dmrx.data.amazon import convert

        convert(AMAZON, "Beauty", work, seed=data_seed)
        return work, {"use_user_id": False}
    raise SystemExit(f"unknown dataset {dataset}")


def run_one(data: Path, variant: dict, seed: int, epochs: int, work: Path) -> dict:
    cfg = DMRConfig(**variant)
    t0 = time.perf_counter()
    summary = train(data / "train.h5", data / "valid.h5", work / f"run-{seed}", cfg,
                    TrainConfig(seed=seed, epochs=epochs, patience=1), progress_bar=False)
    seconds = time.perf_counter() - t0
    from dmrx import bundle

    b = bundle.load(work / f"run-{seed}")
    with DataFile(data / "test.h5") as f:  # the test split, read once
        res = predict(b.model, b.encoder(), f)
    m = report(res["label"], res["prob"], res["user"], res.get("prob_true"))
    out = {"auc": m["auc"], "gauc": m["gauc"], "logloss": m["logloss"], "train_seconds": seconds,
           "examples_per_s": summary["examples_per_s"], "epochs": summary["epochs_run"],
           "best_epoch": summary["best_epoch"]}
    if "oracle_auc" in m:
        out["oracle_auc"] = m["oracle_auc"]
        out["gap_closed"] = (m["auc"] - 0.5) / (m["oracle_auc"] - 0.5)
    pos = res["label"] > 0
    for unit in ("r", "r_hat"):
        if unit in res:
            out[f"mean_{unit}_pos"] = float(res[unit][pos].mean())
            out[f"mean_{unit}_neg"] = float(res[unit][~pos].mean())
            out[f"{unit}_auc"] = auc(res["label"], res[unit])  # does the unit alone separate clicks?
    return out


def summarise(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs]
        out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["synthetic", "amazon"], default="synthetic")
    ap.add_argument("--variants", default="dmr,din_like", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="max epochs; early stopping on validation AUC")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    args = ap.parse_args()
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n}; choose from {', '.join(VARIANTS)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, defaults = prepare(args.dataset, Path(tmp) / "data", args.data_seed)
        for name in names:
            runs = [run_one(data, {**defaults, **VARIANTS[name]}, seed, args.epochs, Path(tmp) / name)
                    for seed in range(args.seeds)]
            results[name] = {"runs": runs, "summary": summarise(runs)}
    if args.json:
        print(json.dumps({"dataset": args.dataset, "seeds": args.seeds, "results": results}, indent=2))
    rows = []
    base = results[names[0]]["summary"]["auc"]["mean"]
    for name in names:
        s = results[name]["summary"]
        row = {"model": name, "AUC": f"{s['auc']['mean']:.4f} ± {s['auc']['std']:.4f}",
               "vs first": f"{(s['auc']['mean'] - base) * 100:+.2f} pt",
               "gAUC": f"{s['gauc']['mean']:.4f}", "logloss": f"{s['logloss']['mean']:.4f}"}
        if "gap_closed" in s:
            row["oracle gap closed"] = f"{s['gap_closed']['mean']:.1%}"
        if "mean_r_pos" in s:
            row["r pos/neg"] = f"{s['mean_r_pos']['mean']:.3f} / {s['mean_r_neg']['mean']:.3f}"
        if "mean_r_hat_pos" in s:
            row["r_hat pos/neg"] = f"{s['mean_r_hat_pos']['mean']:.3f} / {s['mean_r_hat_neg']['mean']:.3f}"
        row["train s"] = f"{s['train_seconds']['mean']:.0f}"
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join(r.get(c, "") for c in cols) + " |\n" for r in rows)
    if args.markdown:
        args.markdown.write_text(md)
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.dataset}: test metrics, mean ± std over {args.seeds} seeds")
        for c in cols:
            table.add_column(c, justify="right")
        for r in rows:
            table.add_row(*[r.get(c, "") for c in cols])
        Console().print(table)


if __name__ == "__main__":
    main()
