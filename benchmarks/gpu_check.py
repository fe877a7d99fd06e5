"""One-shot GPU validation, a few minutes on one GPU, no network. Ends with one table.

1. trains a few hundred steps on CUDA with mixed precision (bf16 autocast) and checks the loss falls;
2. checks CUDA against CPU forward parity on the same weights (fp32, TF32 off);
3. scores a synthetic candidate file with torch on CUDA at fp32, fp16 and bf16: rows/s, and the AUC
   difference against fp32 on the labelled test file;
4. where TensorRT is installed, exports FP16 and INT8 engines and scores with them the same way.

    python benchmarks/gpu_check.py            # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu --steps 30 --users 500   # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _auc_of_scores(scores_path: Path, test: Path) -> float:
    import h5py

    from dmrx.data.reader import DataFile
    from dmrx.evaluation.metrics import auc

    with h5py.File(scores_path) as f:
        scores = f["score"][:]
    with DataFile(test) as d:
        labels = d.read_columns(0, d.n_rows, ["label"])["label"]
    return auc(labels, scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from dmrx.data.reader import DataFile
    from dmrx.data.synthetic import SyntheticConfig, generate
    from dmrx.evaluation.predict import predict
    from dmrx.models import bundle
    from dmrx.models.dmr import DMRConfig
    from dmrx.scoring import score_file
    from dmrx.training.trainer import TrainConfig, train

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a machine with a GPU (or --device cpu for a dry run)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows: list[dict] = []

    def check(name: str, value: str, ok: bool | None) -> None:
        rows.append({"check": name, "result": value, "ok": ok})
        print(f"{name}: {value} {'' if ok is None else ('OK' if ok else 'FAILED')}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        generate(tmp, SyntheticConfig(users=args.users, items=max(2000, args.users), seed=0))
        check("synthetic data", f"{args.users} users in {time.perf_counter() - t0:.1f} s", None)

        # 1. training with mixed precision
        run = tmp / "run"
        summary = train(
            tmp / "train.h5",
            tmp / "valid.h5",
            run,
            DMRConfig(),
            TrainConfig(
                device=args.device,
                max_steps=args.steps,
                epochs=100,
                log_every=max(args.steps // 10, 1),
                checkpoint_every=10**9,
            ),
        )
        losses = [
            json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)
        ]
        check("train: loss first -> last logged", f"{losses[0]:.4f} -> {losses[-1]:.4f}", losses[-1] < losses[0])
        check("train: examples/s (bf16 autocast)", f"{summary['examples_per_s']:,.0f}", None)

        # 2. CUDA vs CPU forward parity, same weights
        b_cpu = bundle.load(run, device="cpu")
        b_dev = bundle.load(run, device=args.device)
        with DataFile(tmp / "valid.h5") as f:
            p_cpu = predict(b_cpu.model, b_cpu.encoder(), f, device="cpu")["prob"]
            p_dev = predict(b_dev.model, b_dev.encoder(), f, device=args.device)["prob"]
        diff = float(np.abs(p_cpu - p_dev).max())
        check(f"parity {args.device} vs cpu fp32: max |ctr diff|", f"{diff:.2e}", diff <= 1e-5)

        # 3. scoring at each precision
        precisions = ["fp32", "fp16", "bf16"] if args.device == "cuda" else ["fp32"]
        base_auc = None
        for precision in precisions:
            out = tmp / f"cand.{precision}.h5"
            s = score_file(
                tmp / "candidates.h5", model=run, out=out, backend="torch", precision=precision, device=args.device
            )
            test_out = tmp / f"test.{precision}.h5"
            score_file(
                tmp / "test.h5", model=run, out=test_out, backend="torch", precision=precision, device=args.device
            )
            auc_now = _auc_of_scores(test_out, tmp / "test.h5")
            base_auc = auc_now if base_auc is None else base_auc
            tol = {"fp32": 0.0, "fp16": 0.0005, "bf16": 0.002}[precision]
            check(f"score torch {precision}: rows/s", f"{s['rows_per_s']:,.0f}", None)
            check(
                f"score torch {precision}: |AUC - fp32 AUC|",
                f"{abs(auc_now - base_auc):.5f}",
                abs(auc_now - base_auc) <= tol,
            )

        # 4. TensorRT, where installed
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            check("tensorrt", "not installed: engines not built or run", None)
        else:
            from dmrx.export.pipeline import ExportOptions, export_run

            export_run(run, ExportOptions(fp16=True, int8=True, engine="tensorrt"))
            for precision in ("fp16", "int8"):
                s = score_file(
                    tmp / "candidates.h5",
                    model=run,
                    out=tmp / f"trt.{precision}.h5",
                    backend="tensorrt",
                    precision=precision,
                    device="cuda",
                )
                check(f"score tensorrt {precision}: rows/s", f"{s['rows_per_s']:,.0f}", None)

    failed = [r for r in rows if r["ok"] is False]
    if args.json:
        print(json.dumps({"device": device_name, "torch": torch.__version__, "checks": rows}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"dmrx GPU check on {device_name} (torch {torch.__version__})")
        for col in ("check", "result", "ok"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["check"], r["result"], "" if r["ok"] is None else ("yes" if r["ok"] else "NO"))
        Console().print(table)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
