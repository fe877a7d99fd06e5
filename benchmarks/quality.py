"""Quality: train and evaluate DMR, its ablations and the baselines over seeds; print mean and std.

Every choice (epochs via early stopping, options) is made on the validation split; the test split is read
once per seed, after training. Synthetic data also carries the true click probability, so the share of
the oracle's AUC gap over 0.5 that a model closes is reported: (AUC - 0.5) / (oracle - 0.5).

    python benchmarks/quality.py --dataset synthetic --seeds 3
    python benchmarks/quality.py --dataset amazon --seeds 3 --variants dmr,din_like
    python benchmarks/quality.py ... --json --markdown results.md
    python benchmarks/quality.py --variants lr,widedeep,pnn,din,dien,dmr          # like Table 1
    python benchmarks/quality.py --variants dmr,i2i_only,u2i_only,no_aux,no_position,shared_double  # Table 2
    python benchmarks/quality.py --users 300 --seeds 1 --epochs 1 --variants lr,dmr  # smoke run
    python benchmarks/quality.py --dataset amazon --seeds 3 --results amazon.jsonl  # reuse finished runs
    python benchmarks/quality.py --synthetic '{"items": 20000, "cates": 200, "brands": 2000, "dim": 16, "ctr": 0.05}'
                                          # change the generator's SyntheticConfig (here: docs/synthetic-v1.md's data)

With --results, every finished (variant, seed) run is appended to a JSONL file as soon as it ends, keyed by
the dataset, data seed, variant options, seed and epochs; a later invocation with the same file reuses the
runs it finds there and trains only the missing ones. An interrupted benchmark continues where it stopped,
adding seeds costs only the new seeds, and Table 1 and Table 2 share DMR's runs. The key does not know the
code: start a new file when the model, the trainer or their defaults change.

Relative improvement (RI) is computed as the paper's tables do, on the mean test AUC over seeds:
RI = AUC / AUC_ref - 1 against LR (Table 1) and against DMR (Table 2), whichever of the two is listed
(against the first variant when neither is). Compare it with the seeds' std: an RI smaller than the
spread is no evidence of a difference.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError
from dmrx.evaluation.metrics import auc, relevance_means, report
from dmrx.evaluation.predict import predict
from dmrx.models.dmr import DMRConfig
from dmrx.training.trainer import TrainConfig, load_config, train

REPO = Path(__file__).resolve().parents[1]
AMAZON = REPO.parent / "shared" / "data" / "amazon-beauty"
CONFIGS = REPO / "configs"


def load_variants() -> dict[str, dict]:
    """Variant name (its config file's name) -> the model options that file sets, from configs/: DMR, the
    baselines of the paper's Table 1 (dmrx.models.baselines: same data path, trainer and evaluation), the
    ablations of its Table 2 (din_like: DMR without relevance units or positions), and the alternatives to
    the options whose defaults were chosen by measurement. configs/README.md describes each."""
    variants = {}
    for group in (".", "baselines", "ablations", "alternatives"):
        for path in sorted((CONFIGS / group).glob("*.json")):
            try:
                load_config(path, {})  # every option checked before any training starts
            except DmrxError as e:
                raise SystemExit(f"error: {e}") from None
            if path.stem in variants:
                raise SystemExit(f"error: {path}: a second variant named {path.stem}")
            variants[path.stem] = json.loads(path.read_text()).get("model", {})
    return variants


VARIANTS = load_variants()


def prepare(dataset: str, work: Path, data_seed: int, amazon: Path = AMAZON, *, synthetic: dict | None = None) -> Path:
    """Write the dataset's train/valid/test files into work (kept when already there); return the dir.
    synthetic: SyntheticConfig fields that differ from the defaults (users included)."""
    if (work / "test.h5").exists():
        return work
    if dataset == "synthetic":
        from dmrx.data.synthetic import SyntheticConfig, generate

        generate(work, SyntheticConfig(**{**(synthetic or {}), "seed": data_seed}))
        return work
    if dataset == "amazon":
        if not amazon.exists():
            raise SystemExit(f"{amazon} is absent: the Amazon Beauty benchmark needs ../shared/data/amazon-beauty")
        from dmrx.data.importers.amazon import import_amazon

        import_amazon(amazon, "Beauty", work, seed=data_seed)
        return work
    raise SystemExit(f"unknown dataset {dataset}")


def run_one(data: Path, variant: dict, seed: int, epochs: int, work: Path, device: str = "auto") -> dict:
    cfg = DMRConfig.from_json(variant)
    t0 = time.perf_counter()
    summary = train(
        data / "train.h5",
        data / "valid.h5",
        work / f"run-{seed}",
        cfg,
        TrainConfig(seed=seed, epochs=epochs, patience=1, device=device),
    )
    seconds = time.perf_counter() - t0
    from dmrx.models import bundle

    b = bundle.load(work / f"run-{seed}")
    with DataFile(data / "test.h5") as f:  # the test split, read once
        res = predict(b.model.to(summary["device"]), b.encoder(), f, device=summary["device"])
    m = report(res["label"], res["prob"], res["user"], res.get("prob_true"))
    out = {
        "val_auc": summary["best_val_auc"],
        "auc": m["auc"],
        "gauc": m["gauc"],
        "logloss": m["logloss"],
        "train_seconds": seconds,
        "examples_per_s": summary["examples_per_s"],
        "epochs": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
    }
    if "oracle_auc" in m:
        out["oracle_auc"] = m["oracle_auc"]
        out["gap_closed"] = (m["auc"] - 0.5) / (m["oracle_auc"] - 0.5)
    out.update(relevance_means(res))
    for unit in ("r", "r_hat"):
        if unit in res:
            out[f"{unit}_auc"] = auc(res["label"], res[unit])  # does the unit alone separate clicks?
    return out


def popularity(data: Path) -> dict:
    """A model that ignores the history: the target item's click rate in the training file (smoothed)."""
    with DataFile(data / "train.h5") as f:
        tr = f.read_columns(0, f.n_rows, ["target/item", "label"])
    with DataFile(data / "test.h5") as f:
        te = f.read_columns(0, f.n_rows, ["target/item", "label", "user"] + ["prob"] * f.fields.has_prob)
    n = int(max(tr["target/item"].max(), te["target/item"].max())) + 1
    shows = np.bincount(tr["target/item"], minlength=n)
    clicks = np.bincount(tr["target/item"], weights=tr["label"], minlength=n)
    prior = tr["label"].mean()
    ctr = (clicks + 20 * prior) / (shows + 20)  # 20 pseudo-impressions at the mean rate
    m = report(te["label"], ctr[te["target/item"]], te["user"], te.get("prob"))
    out = {"auc": m["auc"], "gauc": m["gauc"], "logloss": m["logloss"]}
    if "oracle_auc" in m:
        out["oracle_auc"] = m["oracle_auc"]
        out["gap_closed"] = (m["auc"] - 0.5) / (m["oracle_auc"] - 0.5)
    return out


def run_key(args, name: str, seed: int) -> dict:
    """What makes a run reusable from a --results file: same data, same variant options, seed and epochs."""
    key = {
        "dataset": args.dataset,
        "data_seed": args.data_seed,
        "users": args.users,
        "variant": name,
        "options": VARIANTS[name],
        "seed": seed,
        "epochs": args.epochs,
    }
    if args.synthetic:  # only when given, so that files written before the option still match
        key["synthetic"] = args.synthetic
    return key


def load_results(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in runs], np.float64)
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["synthetic", "amazon"], default="synthetic")
    ap.add_argument(
        "--variants", default="dmr,din_like", help=f"comma list of popularity (no training), {','.join(VARIANTS)}"
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="max epochs; early stopping on validation AUC")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--users", type=int, help="synthetic data: number of users (default 10,000; small for smoke runs)")
    ap.add_argument(
        "--synthetic",
        type=json.loads,
        default=None,
        help='synthetic data: SyntheticConfig fields to change, as JSON (\'{"dim": 16, "ctr": 0.05}\')',
    )
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument(
        "--data-dir",
        type=Path,
        help="keep the prepared data here (reused when present, whatever --users or --synthetic say)",
    )
    ap.add_argument("--amazon-dir", type=Path, default=AMAZON, help="the S3-Rec Beauty files")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    ap.add_argument(
        "--results", type=Path, help="JSONL of finished runs: reused when their key matches, new runs appended"
    )
    args = ap.parse_args()
    names = args.variants.split(",")
    if args.synthetic:
        from dmrx.data.synthetic import SyntheticConfig

        # seed and users have their own flags, which the --results key already records
        unknown = set(args.synthetic) - (set(SyntheticConfig.__dataclass_fields__) - {"seed", "users"})
        if args.dataset != "synthetic" or unknown:
            raise SystemExit(
                f"--synthetic: fields of SyntheticConfig other than seed and users, for --dataset "
                f"synthetic only (got {sorted(unknown) or args.dataset})"
            )
    for n in names:
        if n not in VARIANTS and n != "popularity":
            raise SystemExit(f"unknown variant {n}; choose from {', '.join(VARIANTS)}")
    results = {}
    done = {json.dumps(r["key"], sort_keys=True): r["metrics"] for r in load_results(args.results)}
    with tempfile.TemporaryDirectory() as tmp:

        @functools.cache
        def data() -> Path:  # prepared on first use: a benchmark answered from --results needs no data
            return prepare(
                args.dataset,
                args.data_dir or Path(tmp) / "data",
                args.data_seed,
                args.amazon_dir,
                synthetic={**(args.synthetic or {}), **({"users": args.users} if args.users else {})},
            )

        for name in names:
            if name == "popularity":  # no training, no seeds
                runs = [popularity(data())]
                results[name] = {"runs": runs, "summary": summarise(runs)}
                continue
            runs = []
            for seed in range(args.seeds):
                key = run_key(args, name, seed)
                metrics = done.get(json.dumps(key, sort_keys=True))
                if metrics is None:
                    metrics = run_one(data(), VARIANTS[name], seed, args.epochs, Path(tmp) / name, args.device)
                    if args.results:
                        with args.results.open("a") as f:
                            f.write(json.dumps({"key": key, "metrics": metrics}) + "\n")
                runs.append(metrics)
            results[name] = {"runs": runs, "summary": summarise(runs)}
    refs = [r for r in ("lr", "dmr") if r in results] or [names[0]]
    for name in names:  # RI as the paper's tables: mean AUC / the reference's mean AUC - 1
        results[name]["ri"] = {
            ref: results[name]["summary"]["auc"]["mean"] / results[ref]["summary"]["auc"]["mean"] - 1 for ref in refs
        }
    if args.json:
        print(json.dumps({"dataset": args.dataset, "seeds": args.seeds, "results": results}, indent=2))
    rows = []
    for name in names:
        s = results[name]["summary"]
        row = {
            "model": name,
            "AUC": f"{s['auc']['mean']:.4f} ± {s['auc']['std']:.4f}",
            **{f"RI vs {ref}": f"{ri:+.2%}" for ref, ri in results[name]["ri"].items()},
            "gAUC": f"{s['gauc']['mean']:.4f}",
            "logloss": f"{s['logloss']['mean']:.4f}",
        }
        if "gap_closed" in s:
            row["oracle gap closed"] = f"{s['gap_closed']['mean']:.1%}"
        if "mean_r_pos" in s:
            row["r pos/neg"] = f"{s['mean_r_pos']['mean']:.3f} / {s['mean_r_neg']['mean']:.3f}"
        if "mean_r_hat_pos" in s:
            row["r_hat pos/neg"] = f"{s['mean_r_hat_pos']['mean']:.3f} / {s['mean_r_hat_neg']['mean']:.3f}"
        row["train s"] = f"{s['train_seconds']['mean']:.0f}" if "train_seconds" in s else "-"
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
