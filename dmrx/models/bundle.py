"""The run directory as a self-contained model bundle.

    runs/<name>/
      model.safetensors   weights (the best checkpoint by validation AUC)
      vocab.safetensors   per table: the sorted raw ids (row i+1 of the table); "sampler": match counts
      config.json         the resolved model and training configs, the data it was trained on, and the
                          config_version that dmrx.models.migrations reads older runs by
      schema.json         the feature spec
      metrics.jsonl       training log (one JSON object per line)
      summary.json        best validation metrics, step counts, timings
      manifest.json       format name and version, sha256 of every file above, library versions

Never pickle: safetensors and JSON only. Loading verifies the format version and every hash.

Importing this module needs no torch (only `load`, `build_model` and `save_weights` do), so that torch-free
inference can resolve and verify runs.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from dmrx import __version__
from dmrx.artifacts import manifests
from dmrx.artifacts.atomic import atomic_file
from dmrx.data.features import FeatureSpec
from dmrx.data.vocab import Vocab
from dmrx.errors import DmrxError
from dmrx.models.migrations import migrate

if TYPE_CHECKING:
    from torch import nn

    from dmrx.models.dmr import DMRConfig

FORMAT = "dmrx-run"
VERSION = 1
RUNS_DIR = Path("runs")
BUNDLE_FILES = ("model.safetensors", "vocab.safetensors", "config.json", "schema.json", "metrics.jsonl", "summary.json")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that made an artifact (None for one not installed: torch-free inference)."""
    import importlib.metadata

    versions = {"dmrx": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "h5py", "safetensors", "onnx", "onnxruntime"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def save_vocabs(path: Path, vocabs: dict[str, Vocab], sampler: np.ndarray) -> None:
    tensors = {f"vocab.{t}": v.ids for t, v in vocabs.items()}
    tensors["sampler"] = sampler.astype(np.float64)
    with atomic_file(path) as tmp:
        save_np(tensors, str(tmp))


def load_vocabs(path: Path) -> tuple[dict[str, Vocab], np.ndarray]:
    t = load_np(str(path))
    return {k[6:]: Vocab(v) for k, v in t.items() if k.startswith("vocab.")}, t["sampler"]


def write_manifest(run_dir: Path) -> dict:
    """The manifest lands last: its presence marks a complete run."""
    present = [name for name in BUNDLE_FILES if (run_dir / name).exists()]
    return manifests.write(run_dir, FORMAT, VERSION, present, versions=library_versions())


def verify(run_dir: Path) -> dict:
    """The run's manifest, after checking its format and every file's hash."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DmrxError(f"{run_dir}: no such run directory")
    unfinished = (
        " (training did not finish: resume it with `dmrx train --resume --out RUN`)"
        if (run_dir / "checkpoints").exists()
        else ""
    )
    return manifests.verify(run_dir, FORMAT, (VERSION,), missing=unfinished)


@dataclass
class Bundle:
    """A loaded run: everything needed to encode data and score it."""

    path: Path
    model: nn.Module  # DMR, or a baseline
    spec: FeatureSpec
    vocabs: dict[str, Vocab]
    sampler: np.ndarray
    config: dict
    manifest: dict

    @property
    def weights_hash(self) -> str:
        return self.manifest["files"]["model.safetensors"]

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_len

    @property
    def use_u2i(self) -> bool:
        """Whether the model has a User-to-Item network (a user vector u and V'); the baselines have none."""
        return self.model.cfg.model == "dmr" and self.model.cfg.use_u2i

    def encoder(self):
        from dmrx.data.features import Encoder

        return Encoder(self.spec, self.vocabs)


def build_model(cfg: DMRConfig, spec: FeatureSpec, vocabs: dict[str, Vocab]) -> nn.Module:
    from dmrx.models.dmr import DMR

    sizes = {t: len(v) for t, v in vocabs.items()}
    if cfg.model != "dmr":
        from dmrx.models.baselines import build_baseline

        return build_baseline(cfg, spec, sizes)
    return DMR(cfg, spec, sizes)


def load(run_dir: str | os.PathLike | None = None, device: str = "cpu") -> Bundle:
    from safetensors.torch import load_file

    from dmrx.models.dmr import DMRConfig

    run_dir = resolve_run(run_dir)
    manifest = verify(run_dir)
    try:
        try:
            config = migrate(json.loads((run_dir / "config.json").read_text()))
            cfg = DMRConfig.from_json(config["model"])
            cfg.validate()
        except DmrxError as e:
            raise DmrxError(f"{run_dir / 'config.json'}: {e}") from None
        spec = FeatureSpec.from_json(json.loads((run_dir / "schema.json").read_text()))
        vocabs, sampler = load_vocabs(run_dir / "vocab.safetensors")
        model = build_model(cfg, spec, vocabs)
        state = load_file(str(run_dir / "model.safetensors"))
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise DmrxError(
            f"{run_dir}: incompatible run bundle ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    model.to(device).eval()
    return Bundle(run_dir, model, spec, vocabs, sampler, config, manifest)


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def resolve_run(run: str | os.PathLike | None) -> Path:
    """A named run directory, or the most recent complete run under ./runs."""
    if run is not None:
        return Path(run)
    latest = RUNS_DIR / "LATEST"
    if latest.exists():
        path = RUNS_DIR / latest.read_text().strip()  # an absolute path stays as it is
        if path.is_dir():
            return path
    raise DmrxError(f"no run found under {RUNS_DIR.resolve()}: train one with `dmrx train` or name a run directory")


# What each role of run_data names, for its error message.
DATA_ROLES = {
    "train": "training file",
    "valid": "validation file",
    "valid.h5": "valid.h5 beside its training file",
    "test.h5": "test.h5 beside its training file",
}


def run_data(
    run_dir: str | os.PathLike,
    *roles: str,
    config: dict | None = None,
    option: str = "--data",
    missing_ok: bool = False,
) -> Path | None:
    """The first of the run's own data files, in the order of `roles`, that exists.

    Roles: "train" and "valid", the training and validation files the run's config.json records (training
    writes them as absolute paths), and "valid.h5" and "test.h5", the files of those names beside the training
    file. A run trained without a validation file has no "valid": that role is skipped, not an error. When none
    of the files is there (or the run records no training file), the DmrxError names each missing file and
    `option`, the command's option for giving the data instead; with missing_ok, the answer is None.
    `config` is the run's parsed config.json when the caller has it (a loaded Bundle's config).
    """
    run_dir = Path(run_dir)
    if config is None:
        path = run_dir / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise DmrxError(f"{path}: missing, so the run's data is unknown; pass the data with {option}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DmrxError(f"{path}: damaged (not valid JSON); pass the data with {option}") from None
    recorded = config.get("data") or {}
    missing = []
    for role in roles:
        if role not in DATA_ROLES:
            raise ValueError(f"unknown data role {role!r}: one of {', '.join(DATA_ROLES)}")
        name = role if role in ("train", "valid") else "train"
        if not recorded.get(name):
            if name == "valid":
                continue
            if missing_ok:
                return None
            raise DmrxError(f"{run_dir}/config.json records no training file; pass the data with {option}")
        path = Path(recorded[name]) if role == name else Path(recorded["train"]).parent / role
        if path.is_file():
            return path
        missing.append(f"{path} (the run's {DATA_ROLES[role]})")
    if missing_ok or not missing:
        return None
    raise DmrxError(f"{' and '.join(missing)}: no such file; pass the data with {option}")


def mark_latest(run_dir: Path) -> None:
    """Record run_dir as the run later commands use when none is named (./runs/LATEST)."""
    inside = run_dir.resolve().parent == RUNS_DIR.resolve()
    with atomic_file(RUNS_DIR / "LATEST") as tmp:
        tmp.write_text((run_dir.name if inside else str(run_dir.resolve())) + "\n")
