"""One-shot GPU validation, a few minutes on one GPU, no network. Ends with one table.

Stages, each with its own time budget and error handling (one failing stage is a row of the table, not the
end of the run), the table written to --json-out after every stage:

1. trains a few hundred steps on CUDA with mixed precision (bf16 autocast) and checks the loss falls;
2. CUDA against CPU forward parity on the same weights (fp32, TF32 off);
3. one LazyAdam step (the sparse embedding optimiser) on CUDA against the same step on the CPU;
4. training steps/s after warm-up, synchronised, at batch 256 and 4096, and the peak CUDA memory;
5. a one-rank process group (NCCL on CUDA, gloo on CPU) forced through the sparse all-gather, the gradient
   averaging and the global batch norm;
6. scores the synthetic candidate file with torch at fp32, fp16 and bf16: the scorer path used (grouped
   with the C kernel, grouped torch, or the reference), rows/s, and the largest difference from CPU fp32;
7. where TensorRT is installed, exports FP16 and INT8 engines and scores with them.

    python benchmarks/gpu_check.py --json-out gpu_check.json     # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu --steps 30 --users 500   # a dry run of the script itself

A dry run on the CPU runs every stage that needs no CUDA; the others are rows that say "skipped: no CUDA".
benchmarks/gpu_loan.sh runs this, with the offline install and the CUDA tests, on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

try:
    import dmrx  # noqa: F401
    import dmrx.cli  # noqa: F401  (cli/, export/, calibration/ join the dmrx namespace only when installed)
except ImportError:
    sys.exit(
        "gpu_check: dmrx is not installed in this Python; from the repository root run "
        "`python3 -m pip install --no-index --no-deps --no-build-isolation -e .` (benchmarks/gpu_loan.sh does)"
    )

SKIP_NO_CUDA = "skipped: no CUDA"


class StageTimeout(Exception):
    pass


def _auc_of_scores(scores_path: Path, test: Path) -> float:
    import h5py

    from dmrx.data.reader import DataFile
    from dmrx.evaluation.metrics import auc

    with h5py.File(scores_path) as f:
        scores = f["score"][:]
    with DataFile(test) as d:
        labels = d.read_columns(0, d.n_rows, ["label"])["label"]
    return auc(labels, scores)


def _scores(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path) as f:
        return f["score"][:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Checks:
    """The table: rows of (stage, check, result, ok), written to json_out after every stage."""

    def __init__(self, json_out: Path | None, meta: dict):
        self.rows: list[dict] = []
        self.json_out = json_out
        self.meta = meta

    def add(self, stage: str, name: str, value: str, ok: bool | None = None) -> None:
        self.rows.append({"stage": stage, "check": name, "result": value, "ok": ok})
        # live progress on stderr: stdout carries the table (or strict JSON with --json) at the end
        print(f"{name}: {value} {'' if ok is None else ('OK' if ok else 'FAILED')}", file=sys.stderr, flush=True)

    def run(self, stage: str, budget_s: float, fn, *args) -> None:
        """Run one stage under a hard time budget; an exception or an overrun is a failed row."""
        t0 = time.perf_counter()

        def on_alarm(signum, frame):
            raise StageTimeout(f"over its {budget_s:.0f} s budget")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, int(budget_s)))
        try:
            fn(*args)
        except Exception as e:  # a stage's failure is reported; the next stages still run
            detail = traceback.format_exception_only(type(e), e)[-1].strip()
            self.add(stage, f"{stage}: error", detail[:300], False)
            traceback.print_exc(file=sys.stderr)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        self.add(stage, f"{stage}: seconds", f"{time.perf_counter() - t0:.1f}")
        self.write()

    def write(self) -> None:
        if self.json_out is None:
            return
        from dmrx.artifacts.atomic import write_json

        write_json(self.json_out, {**self.meta, "checks": self.rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--speed-steps", type=int, default=30, help="timed steps per batch size (after 3 warm-up)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON at the end")
    ap.add_argument("--json-out", type=Path, help="write the table here after every stage")
    args = ap.parse_args()

    from dmrx.data.reader import DataFile
    from dmrx.data.synthetic import SyntheticConfig, generate
    from dmrx.evaluation.predict import predict, to_tensors
    from dmrx.models import bundle
    from dmrx.models.dmr import DMRConfig, _global_batch_norm
    from dmrx.scoring import Scorer, score_file
    from dmrx.training.distributed import Dist
    from dmrx.training.optim import LazyAdam
    from dmrx.training.trainer import NegativeSampler, TrainConfig, _optimizers, train

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a machine with a GPU (or --device cpu for a dry run)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    checks = Checks(args.json_out, {"device": device_name, "torch": torch.__version__, "dmrx": dmrx.__version__})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"

        def data() -> None:
            t0 = time.perf_counter()
            generate(tmp, SyntheticConfig(users=args.users, items=max(2000, args.users), seed=0))
            checks.add("data", "synthetic data", f"{args.users} users in {time.perf_counter() - t0:.1f} s")

        def training() -> None:
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
                    checkpoint_seconds=0,
                ),
            )
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            losses = [x["loss"] for x in lines if "loss" in x]
            ok = losses[-1] < losses[0]
            checks.add("train", "train: loss first -> last logged", f"{losses[0]:.4f} -> {losses[-1]:.4f}", ok)
            checks.add("train", "train: examples/s (bf16 autocast on CUDA)", f"{summary['examples_per_s']:,.0f}")

        def parity() -> None:
            b_cpu = bundle.load(run, device="cpu")
            b_dev = bundle.load(run, device=args.device)
            with DataFile(tmp / "valid.h5") as f:
                p_cpu = predict(b_cpu.model, b_cpu.encoder(), f, device="cpu")["prob"]
                p_dev = predict(b_dev.model, b_dev.encoder(), f, device=args.device)["prob"]
            diff = float(np.abs(p_cpu - p_dev).max())
            checks.add("parity", f"parity {args.device} vs cpu fp32: max |ctr diff|", f"{diff:.2e}", diff <= 1e-5)

        def lazy_adam() -> None:
            gen = torch.Generator().manual_seed(0)
            table = torch.randn(5000, 32, generator=gen)
            rows = torch.randint(0, 5000, (4096,), generator=gen)  # repeats: the step must sum duplicates
            grad_rows = torch.randn(4096, 32, generator=gen)
            out = {}
            for dev in {"cpu", args.device}:
                p = torch.nn.Parameter(table.clone().to(dev))
                opt = LazyAdam([p], lr=1e-2)
                for _ in range(2):
                    p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0).to(dev), grad_rows.to(dev), p.shape)
                    opt.step()
                out[dev] = p.detach().cpu()
            diff = float((out[args.device] - out["cpu"]).abs().max())
            checks.add("lazyadam", f"LazyAdam 2 steps {args.device} vs cpu: max |diff|", f"{diff:.2e}", diff <= 1e-5)

        def speed() -> None:
            b = bundle.load(run, device=args.device)
            model = b.model.train()
            encoder = b.encoder()
            opts = _optimizers(model, 1e-3, 1e-2)
            sampler = NegativeSampler(np.ones(model.output_table().shape[0]), model.cfg.num_negatives, 0, device)
            with DataFile(tmp / "train.h5") as f:
                keys = ["seq", "end", "label"] + encoder.spec.batch_keys()
                base = next(
                    f.batches(
                        4096, model.cfg.max_len, encoder=encoder, keys=keys, behavior_fields=encoder.spec.behaviors
                    )
                )
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            for batch_size in (256, 4096):
                idx = np.arange(batch_size) % len(base["label"])
                t = to_tensors(encoder.finish({k: v[idx] for k, v in base.items()}), device)

                def step(i: int, t: dict = t) -> None:
                    for opt in opts:
                        opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        out = model(t, sampler.sample(i), sampler.log_q)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logit"].float(), t["label"])
                    (loss + 0.1 * out["aux"].float()).backward()
                    for opt in opts:
                        opt.step()

                for i in range(3):
                    step(i)
                _sync(device)
                t0 = time.perf_counter()
                for i in range(args.speed_steps):
                    step(i)
                _sync(device)
                rate = args.speed_steps / (time.perf_counter() - t0)
                checks.add("speed", f"train step/s at batch {batch_size} (after warm-up)", f"{rate:,.1f}")
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                checks.add("speed", "peak CUDA memory allocated (GiB)", f"{peak:.2f}")
            else:
                checks.add("speed", "peak CUDA memory allocated", SKIP_NO_CUDA)

        def process_group() -> None:
            import torch.distributed as tdist

            backend = "nccl" if cuda else "gloo"
            store = tdist.FileStore(str(tmp / "pg.store"), 1)
            tdist.init_process_group(backend, store=store, rank=0, world_size=1)
            try:

                class Forced(Dist):
                    active = True  # one rank, but through every collective a larger world would run

                d = Forced(0, 1, device)
                b = bundle.load(run, device=args.device)
                model = b.model.train()
                # the global batch norm over one rank is the plain batch norm
                x = torch.randn(64, model.input_norm.num_features, device=device)
                bn = model.input_norm
                want = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                got = _global_batch_norm(x, bn)
                diff = float((got - want).detach().abs().max())
                checks.add("pg", f"{backend}: global batch norm vs batch norm", f"{diff:.2e}", diff <= 1e-4)
                # gradients averaged over one rank are the gradients; sparse ones after all-gather too
                for p in model.parameters():
                    p.grad = None
                table = model.tables[model.match_table]
                ids = torch.tensor([1, 2, 2, 3], device=device)
                (table(ids).sum() + sum(p.sum() for p in model.mlp.parameters())).backward()
                dense_before = model.mlp[0].weight.grad.clone()
                sparse_before = table.weight.grad.coalesce().to_dense()
                d.average_gradients(model)
                dd = float((model.mlp[0].weight.grad - dense_before).abs().max())
                ds = float((table.weight.grad.to_dense() - sparse_before).abs().max())
                checks.add("pg", f"{backend}: gradient all-reduce, one rank", f"{dd:.2e}", dd == 0.0)
                checks.add("pg", f"{backend}: sparse all-gather, one rank", f"{ds:.2e}", ds <= 1e-6)
                gathered = d.gather({"a": np.arange(3)})["a"]
                checks.add(
                    "pg", f"{backend}: all_gather_object", str(gathered.tolist()), gathered.tolist() == [0, 1, 2]
                )
            finally:
                tdist.destroy_process_group()

        def scoring() -> None:
            ref = tmp / "cand.cpu.fp32.h5"
            score_file(tmp / "candidates.h5", model=run, out=ref, backend="torch", device="cpu")
            cpu_scores = _scores(ref)
            for precision in ("fp32", "fp16", "bf16"):
                if not cuda and precision != "fp32":
                    checks.add("score", f"score torch {precision}", SKIP_NO_CUDA)
                    continue
                path = Scorer(run, backend="torch", precision=precision, device=args.device).describe()["path"]
                checks.add("score", f"score torch {precision} {args.device}: path", path)
                out = tmp / f"cand.{precision}.h5"
                s = score_file(
                    tmp / "candidates.h5", model=run, out=out, backend="torch", precision=precision, device=args.device
                )
                diff = float(np.abs(_scores(out) - cpu_scores).max())
                tol = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}[precision]
                checks.add("score", f"score torch {precision}: rows/s", f"{s['rows_per_s']:,.0f}")
                checks.add("score", f"score torch {precision}: max |ctr - cpu fp32|", f"{diff:.2e}", diff <= tol)
                if precision != "fp32":
                    test_out = tmp / f"test.{precision}.h5"
                    score_file(
                        tmp / "test.h5", model=run, out=test_out, backend="torch", precision=precision, device="cuda"
                    )
                    base_out = tmp / "test.cpu.h5"
                    if not base_out.exists():
                        score_file(tmp / "test.h5", model=run, out=base_out, backend="torch", device="cpu")
                    gap = abs(_auc_of_scores(test_out, tmp / "test.h5") - _auc_of_scores(base_out, tmp / "test.h5"))
                    auc_tol = {"fp16": 0.0005, "bf16": 0.002}[precision]
                    checks.add("score", f"score torch {precision}: |AUC - cpu fp32 AUC|", f"{gap:.5f}", gap <= auc_tol)

        def tensorrt_engines() -> None:
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                checks.add("tensorrt", "tensorrt", "not installed: engines not built or run")
                return
            if not cuda:
                checks.add("tensorrt", "tensorrt", SKIP_NO_CUDA)
                return
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
                checks.add("tensorrt", f"score tensorrt {precision}: rows/s", f"{s['rows_per_s']:,.0f}")

        checks.run("data", 120, data)
        checks.run("train", 300, training)
        trained = (run / "manifest.json").exists()
        stages = [
            ("parity", 60, parity, True),
            ("lazyadam", 30, lazy_adam, False),
            ("speed", 180, speed, True),
            ("pg", 60, process_group, True),
            ("score", 240, scoring, True),
            ("tensorrt", 300, tensorrt_engines, True),
        ]
        for stage, budget, fn, needs_run in stages:
            if needs_run and not trained:
                checks.add(stage, stage, "skipped: training failed", None)
                checks.write()
                continue
            checks.run(stage, budget, fn)
        # the LazyAdam, parity and scoring differences on the CPU compare the CPU with itself
        if not cuda:
            checks.add("cuda", "CUDA-only checks", SKIP_NO_CUDA + " (dry run on the CPU)")
            checks.write()

    rows = checks.rows
    failed = [r for r in rows if r["ok"] is False]
    if args.json:
        print(json.dumps({**checks.meta, "checks": rows}, indent=2))
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
