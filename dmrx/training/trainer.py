"""Training: one loop for CPU and GPU, resumable from any checkpoint, writing a self-contained run bundle.

Embedding tables take sparse gradients and a lazy optimiser (dmrx.training.optim.LazyAdam): a step only
touches the rows its batch looks up, so its cost does not grow with the vocabulary. Everything else uses Adam.
Checkpoints hold model, both optimisers, the best weights so far, step and the data position (epoch, batch);
the data order and the negatives depend only on (seed, epoch) and (seed, step), so no RNG state is needed.
They land atomically (a new directory, then a pointer file): a run killed at any moment resumes to the
same result.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

try:
    import tomllib
except ImportError:  # Python 3.10: JSON configs only
    tomllib = None

from dmrx.artifacts import manifests
from dmrx.artifacts.atomic import atomic_dir, atomic_file, check_destination, write_json, writing
from dmrx.choices import DEVICES
from dmrx.data.features import Encoder, declare, fit
from dmrx.data.prefetch import prefetch
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError, OutputError
from dmrx.evaluation.metrics import auc, relevance_means
from dmrx.evaluation.predict import predict, to_tensors
from dmrx.models import bundle
from dmrx.models.device import pick_device
from dmrx.models.dmr import DMR, DMRConfig
from dmrx.models.migrations import CONFIG_VERSION, migrate
from dmrx.options import from_options
from dmrx.training.distributed import Dist, setup
from dmrx.training.optim import LazyAdam

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "dmrx-checkpoint", 1
CHECKPOINT_FILES = ("model.safetensors", "best.safetensors", "optim.safetensors", "state.json")


@dataclass
class TrainConfig:
    epochs: int = 2  # at most; early stopping keeps the best (the paper trains one pass; README: Quality)
    batch_size: int = 256
    lr: float = 1e-3
    sparse_lr: float = 1e-2  # the embedding tables' (0: lr): a rare row gets few updates, so each counts more
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    patience: int = 1  # epochs without a better validation AUC before stopping
    eval_every: int = 0  # also validate every N steps (0: once per epoch)
    checkpoint_seconds: float = 300.0  # a checkpoint at the first log step this long after the last (0: off)
    checkpoint_every: int = 0  # also every N steps (0: off)
    log_every: int = 50  # steps between lines of metrics.jsonl
    min_count: int = 1  # ids seen fewer times in training map to the unknown index
    max_steps: int = 0  # stop after this many steps (0: no limit); for smoke tests

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        return from_options(cls, d, "train")

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "min_count"):
            if getattr(self, name) <= 0:
                raise DmrxError(f"train option {name} must be positive, got {getattr(self, name)}")
        for name in ("patience", "eval_every", "max_steps", "checkpoint_every", "checkpoint_seconds"):
            if getattr(self, name) < 0:
                raise DmrxError(f"train option {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise DmrxError(f"train option lr must be positive, got {self.lr}")
        if not self.sparse_lr >= 0:
            raise DmrxError(f"train option sparse_lr must be >= 0, got {self.sparse_lr}")
        if self.device not in DEVICES:
            raise DmrxError(f"train option device must be auto, cpu or cuda, got {self.device!r}")


def load_config(path: Path | None, overrides: dict) -> tuple[DMRConfig, TrainConfig]:
    """Model and training configs from a JSON or TOML file ({"model": {...}, "train": {...}}) and flags.

    The file is checked first (option names, types, ranges), each problem one error naming the file and
    the option; then the flags that are not None override its train options."""
    raw: dict = {}
    if path is not None:
        if not path.is_file():
            raise DmrxError(f"{path}: no such config file" + (" (it is a directory)" if path.is_dir() else ""))
        if path.suffix == ".toml" and tomllib is None:
            raise DmrxError(f"{path}: TOML configs need Python 3.11 or newer; use a JSON config")
        try:
            raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise DmrxError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
        if not isinstance(raw, dict):
            raise DmrxError(f"{path}: expected a table with 'model' and 'train' sections")
        unknown = sorted(set(raw) - {"model", "train"})
        if unknown:
            raise DmrxError(f"{path}: unknown section(s) {unknown}; expected 'model' and 'train'")
    try:
        model_cfg = DMRConfig.from_json(raw.get("model", {}))
        model_cfg.validate()
        train_cfg = TrainConfig.from_json(raw.get("train", {}))
        train_cfg.validate()
    except DmrxError as e:
        raise DmrxError(f"{path}: {e}" if path is not None else str(e)) from None
    train_cfg = replace(train_cfg, **{k: v for k, v in overrides.items() if v is not None})
    try:
        train_cfg.validate()
    except DmrxError as e:  # a flag's value (the file's were checked above)
        raise DmrxError(str(e).replace("train option ", "--").replace("_", "-")) from None
    return model_cfg, train_cfg


class NegativeSampler:
    """k negatives from the behaviour-frequency distribution of the match field, shared by a batch.

    Sampling is a binary search in a precomputed CDF: O(k log V) per step, whatever the vocabulary. The
    draw depends only on (seed, step): resumed runs and every rank of a distributed run draw the same.
    """

    def __init__(self, counts: np.ndarray, k: int, seed: int, device: torch.device):
        total = counts.sum()
        p = counts / total if total > 0 else np.zeros_like(counts)
        self.usable = total > 0
        self.cdf = torch.from_numpy(np.cumsum(p)).to(device)
        self.log_q = torch.from_numpy(np.log(np.maximum(p, 1e-12))).float().to(device)
        self.k, self.seed, self.device = k, seed, device

    def sample(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(self.k, generator=gen, dtype=torch.float64).to(self.device) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp_max(len(self.cdf) - 1)


def _optimizers(model: DMR, lr: float, sparse_lr: float = 0.0):
    sparse = [p for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.Adam(dense, lr=lr), LazyAdam(sparse, lr=sparse_lr or lr)


# ---- checkpoints --------------------------------------------------------------------------------------
def _optim_tensors(opts) -> tuple[dict[str, torch.Tensor], list]:
    tensors, meta = {}, []
    for i, opt in enumerate(opts):
        sd = opt.state_dict()
        scalars = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt{i}.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _load_optim(opts, tensors: dict[str, torch.Tensor], meta: list) -> None:
    for i, opt in enumerate(opts):
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            o, pid, name = key.split(".", 2)
            if o == f"opt{i}":
                state.setdefault(int(pid), {})[name] = v
        for pid, sc in meta[i]["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        opt.load_state_dict({"state": state, "param_groups": meta[i]["param_groups"]})


def _save_checkpoint(run_dir: Path, model, best_state, opts, progress: dict) -> None:
    ckpts = run_dir / "checkpoints"
    name = f"step-{progress['step']:09d}"
    if (ckpts / name).exists():
        return
    with atomic_dir(ckpts / name) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
        )
        save_file(best_state, str(tmp / "best.safetensors"))
        tensors, meta = _optim_tensors(opts)
        save_file(tensors, str(tmp / "optim.safetensors"))
        write_json(tmp / "state.json", {**progress, "optim": meta})
        manifests.write(tmp, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CHECKPOINT_FILES)
    with atomic_file(ckpts / "LATEST", durable=True) as pointer:
        pointer.write_text(name)
    for old in ckpts.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(run_dir: Path, model, opts) -> tuple[dict, dict]:
    ckpts = run_dir / "checkpoints"
    pointer = ckpts / "LATEST"
    if not pointer.exists():
        raise DmrxError(f"{run_dir}: no checkpoint to resume from")
    path = ckpts / pointer.read_text().strip()
    manifests.verify(path, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,))
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    tensors = load_file(str(path / "optim.safetensors"))
    _load_optim(opts, tensors, state.pop("optim"))
    return state, load_file(str(path / "best.safetensors"))


# ---- the run's lifecycle -------------------------------------------------------------------------------
# A run directory appears complete with its step-0 checkpoint (one atomic rename), so a run killed at any
# moment after it exists can be resumed; a run that fails before it exists leaves nothing.


def check_new_run(run_dir: Path) -> None:
    """A new run can be written at run_dir: absent or empty, with room for a directory."""
    run_dir = Path(run_dir)
    check_destination(run_dir, "dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if (run_dir / "checkpoints" / "LATEST").exists():
            hint = "an interrupted run: continue it with --resume"
        elif (run_dir / "manifest.json").exists():
            hint = "a finished run: choose another --out"
        else:
            hint = "choose another --out"
        raise DmrxError(f"{run_dir}: run directory exists and is not empty ({hint})")


def check_resumable(run_dir: Path) -> None:
    """run_dir is an interrupted run that --resume can continue."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DmrxError(f"{run_dir}: no such run directory to resume")
    if (run_dir / "checkpoints" / "LATEST").exists() and (run_dir / "config.json").exists():
        return
    if (run_dir / "manifest.json").exists():
        raise DmrxError(f"{run_dir}: training finished already; nothing to resume")
    raise DmrxError(f"{run_dir}: not an interrupted run (no config.json and checkpoints/LATEST); nothing to resume")


# ---- the loop -----------------------------------------------------------------------------------------
def _validate(model, encoder, valid: DataFile, device, dist: Dist) -> dict:
    """Validation metrics over the whole file: each rank predicts its share of rows, then all gather."""
    share = dist.rows(valid.n_rows)
    res = predict(model, encoder, valid, device=device, row_range=(share.start, share.stop))
    res = dist.gather({k: res[k] for k in ("label", "prob", "r") if k in res})
    return {"val_auc": auc(res["label"], res["prob"]), **{f"val_{k}": v for k, v in relevance_means(res).items()}}


def _state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train(
    train_path: Path,
    valid_path: Path | None,
    run_dir: Path,
    model_cfg: DMRConfig,
    train_cfg: TrainConfig,
    resume: bool = False,
    progress: Callable[..., Any] | None = None,
) -> dict:
    """Train a model and write its bundle to run_dir; return the summary.

    progress: start(description, total, completed=..., unit=...) -> task, with task.update(completed, ...)
    (dmrx.progress.progress yields one); None reports nothing. Under torchrun every rank calls this with the
    same arguments; only rank 0 writes files (and reports progress).
    """
    dist = setup(pick_device(train_cfg.device))
    run_dir = Path(run_dir)
    ours = not resume and not (run_dir.is_dir() and any(run_dir.iterdir()))
    try:
        return _train(train_path, valid_path, run_dir, model_cfg, train_cfg, resume, progress, dist)
    except OutputError as e:
        if (run_dir / "checkpoints" / "LATEST").exists():
            raise OutputError(
                f"{e}; the run keeps its last checkpoint: `dmrx train --resume --out {run_dir}` continues it "
                "once the disk has room"
            ) from None
        raise
    except DmrxError:
        if ours and dist.main and _checkpointed_step(run_dir) == 0:
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before a step was trained: nothing worth keeping
        raise
    finally:
        dist.close()


def _checkpointed_step(run_dir: Path) -> int | None:
    pointer = run_dir / "checkpoints" / "LATEST"
    return int(pointer.read_text().strip().split("-")[-1]) if pointer.exists() else None


def _train(train_path, valid_path, run_dir, model_cfg, train_cfg, resume, progress, dist: Dist) -> dict:
    device = dist.device
    torch.manual_seed(train_cfg.seed)
    run_dir = Path(run_dir)
    check_resumable(run_dir) if resume else check_new_run(run_dir)
    data = DataFile(train_path)
    valid = DataFile(valid_path) if valid_path is not None else None
    data.require_labels("training")
    if valid is not None:
        valid.require_labels("validation")

    if resume:
        try:
            saved = migrate(json.loads((run_dir / "config.json").read_text()))
            model_cfg = DMRConfig.from_json(saved["model"])
            train_cfg = replace(TrainConfig.from_json(saved["train"]), device=train_cfg.device)
        except (DmrxError, ValueError, KeyError, TypeError) as e:
            raise DmrxError(f"{run_dir / 'config.json'}: not a usable run config ({e})") from None
        spec = bundle.FeatureSpec.from_json(json.loads((run_dir / "schema.json").read_text()))
        vocabs, counts = bundle.load_vocabs(run_dir / "vocab.safetensors")
    else:
        spec = declare(data.fields, model_cfg.match_field, model_cfg.use_user_id)
        vocabs, counts = fit(spec, data, train_cfg.min_count)
    encoder = Encoder(spec, vocabs)
    encoder.check_file(data)
    if valid is not None:
        encoder.check_file(valid)

    model = bundle.build_model(model_cfg, spec, vocabs).to(device)
    opts = _optimizers(model, train_cfg.lr, train_cfg.sparse_lr)
    sampler = NegativeSampler(counts, model_cfg.num_negatives, train_cfg.seed, device)
    use_aux = model_cfg.model == "dmr" and model_cfg.use_u2i and model_cfg.beta > 0 and sampler.usable
    amp = device.type == "cuda"
    log_path = run_dir / "metrics.jsonl"
    state = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "best_auc": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "log_bytes": 0,
        "train_seconds": 0.0,
        "examples": 0,
        "done": False,
    }
    best_state = _state_copy(model)
    if resume:
        state, best_state = _load_checkpoint(run_dir, model, opts)
        if dist.main:
            with open(log_path, "a+b") as f:  # drop log lines written after that checkpoint
                f.truncate(state["log_bytes"])
    elif dist.main:
        # everything checked: the run appears, resumable from its first instant
        with atomic_dir(run_dir) as tmp:
            write_json(
                tmp / "config.json",
                {
                    "config_version": CONFIG_VERSION,
                    "model": model_cfg.to_json(),
                    "train": asdict(train_cfg),
                    "world_size": dist.world,
                    # absolute: later commands (export's calibration, index build) may run from elsewhere
                    "data": {
                        "train": str(Path(train_path).resolve()),
                        "valid": str(Path(valid_path).resolve()) if valid_path else None,
                    },
                },
            )
            write_json(tmp / "schema.json", spec.to_json())
            bundle.save_vocabs(tmp / "vocab.safetensors", vocabs, counts)
            _save_checkpoint(tmp, model, best_state, opts, state)
    dist.barrier()

    keys = ["seq", "end", "label"] + spec.batch_keys()
    n_batches = data.n_batches(train_cfg.batch_size)
    log = open(log_path, "a") if dist.main else None

    def write_log(record: dict) -> None:
        if log is not None:
            with writing(log_path):
                log.write(json.dumps(record) + "\n")
                log.flush()

    def checkpoint() -> None:
        if dist.main:
            state["log_bytes"] = log.tell()
            _save_checkpoint(run_dir, model, best_state, opts, state)
        dist.barrier()

    def end_epoch_validation() -> bool:
        """Validate, keep the best weights; True when early stopping says stop (the same on every rank)."""
        if valid is None:
            best_state.update(_state_copy(model))
            return False
        metrics = _validate(model, encoder, valid, device, dist)
        write_log({"step": state["step"], "epoch": state["epoch"], **metrics})
        if metrics["val_auc"] > state["best_auc"]:
            state.update(best_auc=metrics["val_auc"], best_epoch=state["epoch"], bad_epochs=0)
            best_state.update(_state_copy(model))
        else:
            state["bad_epochs"] += 1
        return bool(train_cfg.patience) and state["bad_epochs"] >= train_cfg.patience

    pin = device.type == "cuda"

    def prepare(batches):
        """This rank's rows of each global batch as CPU tensors (pinned for CUDA), with the row counts the
        loss weights need, computed from numpy so that no step waits on the device for them. Runs in the
        prefetch thread, ahead of the step."""
        for batch in batches:
            n_all = len(batch["label"])
            aux_rows = batch["hist_len"] >= 2
            mine = dist.rows(n_all)
            t = to_tensors(encoder.finish({k: v[mine] for k, v in batch.items()}))
            if pin:
                t = {k: v.pin_memory() for k, v in t.items()}
            yield n_all, int(aux_rows.sum()), mine.stop - mine.start, int(aux_rows[mine].sum()), t

    def step(item) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a global batch; this rank computes its slice of the rows.

        A rank whose slice is empty (a file's last batch can have fewer rows than there are ranks) still
        runs a zero-row forward and backward pass: every rank must issue the same collectives in the same
        order (the global batch norm's all-reduces, then the gradient averaging). Returns this rank's mean
        losses as device tensors; reading them waits for the device, so the loop reads them at log steps."""
        n_all, n_aux, n_mine, aux_mine, t = item
        t = {k: v.to(device, non_blocking=True) for k, v in t.items()}
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(t, *((sampler.sample(state["step"]), sampler.log_q) if use_aux else ()))
        loss_sum = F.binary_cross_entropy_with_logits(out["logit"].float(), t["label"], reduction="sum")
        loss_aux = out["aux"].float() if use_aux else torch.zeros((), device=device)
        # weights so that averaging over ranks gives the global batch's mean losses
        w_aux = dist.world * aux_mine / max(n_aux, 1)
        (dist.world / n_all * loss_sum + model_cfg.beta * w_aux * loss_aux).backward()
        dist.average_gradients(model)
        for opt in opts:
            opt.step()
        return loss_sum.detach() / max(n_mine, 1), loss_aux.detach()

    # one bar, restarted at each epoch; under torchrun rank 0 alone reports
    bar = (
        progress(f"epoch {state['epoch'] + 1}", n_batches, completed=state["batch"], unit="batches").update
        if progress is not None and dist.main
        else lambda completed=None, **kwargs: None
    )
    model.train()
    t_last, ex_last = time.perf_counter(), state["examples"]
    t_checkpoint = t_last
    sums = {"loss": 0.0, "aux": 0.0, "n": 0}
    while not state["done"] and state["epoch"] < train_cfg.epochs:
        t0 = time.perf_counter()
        batches = data.batches(
            train_cfg.batch_size,
            model_cfg.max_len,
            shuffle=True,
            seed=train_cfg.seed,
            epoch=state["epoch"],
            start_batch=state["batch"],
            encoder=encoder,
            keys=keys,
            behavior_fields=spec.behaviors,
        )
        with prefetch(prepare(batches), depth=2, name="dmrx-train-reader") as items:
            for item in items:
                loss_t, loss_aux = step(item)
                state["step"] += 1
                state["batch"] += 1
                state["examples"] += item[0]
                sums["loss"] += loss_t
                sums["aux"] += loss_aux
                sums["n"] += 1
                due = bool(train_cfg.checkpoint_every) and state["step"] % train_cfg.checkpoint_every == 0
                if state["step"] % train_cfg.log_every == 0:
                    now = time.perf_counter()
                    speed = (state["examples"] - ex_last) / max(now - t_last, 1e-9)
                    t_last, ex_last = now, state["examples"]
                    loss, aux = float(sums["loss"]) / sums["n"], float(sums["aux"]) / sums["n"]
                    rec = {
                        "step": state["step"],
                        "epoch": state["epoch"],
                        "loss": loss,
                        "aux_loss": aux,
                        "beta_aux": model_cfg.beta * aux,
                        "examples_per_s": speed,
                    }
                    write_log(rec)
                    bar(state["batch"], info=f"{speed:,.0f} ex/s  loss {loss:.4f}  aux {aux:.3f}")
                    sums = {"loss": 0.0, "aux": 0.0, "n": 0}
                    # rank 0's clock decides, so that every rank joins the checkpoint's barrier
                    late = bool(train_cfg.checkpoint_seconds) and now - t_checkpoint >= train_cfg.checkpoint_seconds
                    due = dist.broadcast(due or late)
                if train_cfg.eval_every and valid is not None and state["step"] % train_cfg.eval_every == 0:
                    write_log(
                        {
                            "step": state["step"],
                            "epoch": state["epoch"],
                            **_validate(model, encoder, valid, device, dist),
                        }
                    )
                if train_cfg.max_steps and state["step"] >= train_cfg.max_steps:
                    state["done"] = True
                    break
                if due:
                    state["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint()
                    t_checkpoint = time.perf_counter()
        state["train_seconds"] += time.perf_counter() - t0
        if state["batch"] >= n_batches or state["done"]:
            stop = end_epoch_validation()
            state["epoch"] += 1
            state["batch"] = 0
            state["done"] = state["done"] or stop
            checkpoint()
            bar(0, description=f"epoch {min(state['epoch'] + 1, train_cfg.epochs)}")
    data.close()
    if valid is not None:
        valid.close()
    summary = {
        "best_val_auc": state["best_auc"] if valid is not None else None,
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "examples": state["examples"],
        "train_seconds": state["train_seconds"],
        "examples_per_s": state["examples"] / max(state["train_seconds"], 1e-9),
        "device": str(device),
        "world_size": dist.world,
        "aux_loss": bool(use_aux),
    }
    if dist.main:
        with writing(log_path):
            log.close()
        model.load_state_dict(best_state)
        bundle.save_weights(model, run_dir / "model.safetensors")
        write_json(run_dir / "summary.json", summary)
        bundle.write_manifest(run_dir)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        bundle.mark_latest(run_dir)
    dist.barrier()
    return summary
