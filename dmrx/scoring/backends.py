"""Scoring backends behind one interface: `score(work) -> float32 CTRs` and `describe() -> dict`.

- torch (dmrx.scoring.torch_backend): the run's model; CPU fp32/int8, CUDA fp32/fp16/bf16.
- onnxruntime: the export bundle's user_encoder + candidate_scorer graphs (FP32, FP16 or INT8 files);
  CPU provider, and the CUDA / TensorRT execution providers when onnxruntime has them and a GPU is asked
  for. describe() reports the providers the session actually runs (session.get_providers()).
- tensorrt: the export bundle's engines (engines/<graph>.<precision>.plan), through
  dmrx.export.tensorrt.Engine; import-guarded, a one-line error when TensorRT or a GPU is missing.

`auto` picks, for the machine and precision, what benchmarks/score.py measured fastest: TensorRT engines
when TensorRT, a GPU and engines exist; torch on CUDA; on CPU the torch grouped path (fp32, int8), and
onnxruntime for fp16 (torch has no CPU fp16 path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmrx.errors import DmrxError

EXPORT_FORMAT = "dmrx-export"
USER_PREFIX = "user__"


def _export_manifest(path: Path) -> dict | None:
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("format") == EXPORT_FORMAT else None


def load_model(model) -> tuple:
    """(Bundle, export directory or None) from a run, an export directory, a Bundle, or None (latest run).

    An export bundle made from other weights than the run's is ignored when found beside the run, and an
    error when named explicitly.
    """
    from dmrx.models import bundle as run_bundle

    explicit_export = None
    if isinstance(model, run_bundle.Bundle):
        b = model
    else:
        path = run_bundle.resolve_run(model)
        if not path.exists():
            raise DmrxError(f"{path}: no such run or export directory")
        manifest = _export_manifest(path)
        if manifest is not None:
            explicit_export = path
            run = Path(manifest.get("source", {}).get("run", path.parent))
            if not (run / "manifest.json").exists():
                run = path.parent
            if not (run / "manifest.json").exists():
                raise DmrxError(f"{path}: the export's run ({run}) is not available; scoring needs the run for "
                                "its vocabularies and feature spec")
            b = run_bundle.load(run)
        else:
            b = run_bundle.load(path)
    export_dir = explicit_export or b.path / "export"
    manifest = _export_manifest(export_dir)
    if manifest is None:
        if explicit_export is not None:
            raise DmrxError(f"{explicit_export}: damaged export manifest")
        return b, None
    made_from = manifest.get("source", {}).get("weights_sha256")
    if made_from != b.weights_hash:
        if explicit_export is not None:
            raise DmrxError(f"{export_dir}: exported from other weights ({str(made_from)[:12]}) than the run "
                            f"{b.path} ({b.weights_hash[:12]}); export the run again")
        return b, None
    return b, export_dir


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _trt_reason() -> str | None:
    try:
        from dmrx.export import tensorrt as trt_mod
    except ImportError:  # pragma: no cover - the export package is part of dmrx
        return "dmrx.export.tensorrt is missing"
    return trt_mod.unavailable_reason()


def _engines(export_dir: Path | None, precision: str) -> dict[str, Path] | None:
    if export_dir is None:
        return None
    paths = {g: export_dir / "engines" / f"{g}.{precision}.plan" for g in ("user_encoder", "candidate_scorer")}
    return paths if all(p.exists() for p in paths.values()) else None


def _onnx_files(export_dir: Path | None, precision: str) -> dict[str, Path] | None:
    if export_dir is None:
        return None
    suffix = "" if precision == "fp32" else f".{precision}"
    paths = {g: export_dir / f"{g}{suffix}.onnx" for g in ("user_encoder", "candidate_scorer")}
    return paths if all(p.exists() for p in paths.values()) else None


def auto_backend(export_dir: Path | None, precision: str, device: str | None) -> tuple[str, str | None]:
    """(backend, device) that `auto` resolves to (see the module docstring)."""
    gpu = device not in ("cpu",) and _cuda_available()
    if gpu:
        if _trt_reason() is None and _engines(export_dir, precision):
            return "tensorrt", "cuda"
        if precision in ("fp32", "fp16", "bf16"):
            return "torch", device or "cuda"
        import onnxruntime as ort

        if _onnx_files(export_dir, precision) and "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnxruntime", device or "cuda"
        return "torch", "cpu"  # int8 on the CPU
    if precision in ("fp32", "int8"):
        return "torch", "cpu"
    if precision == "fp16" and _onnx_files(export_dir, precision):
        return "onnxruntime", "cpu"
    raise DmrxError(f"--precision {precision} on CPU: torch scores fp32 or int8 on CPU, and "
                    + ("onnxruntime needs the export's FP16 graphs (dmrx export --fp16)" if precision == "fp16"
                       else "bf16 needs a CUDA GPU"))


def make_backend(bundle, export_dir: Path | None, backend: str, precision: str, device: str | None,
                 threads: int | None):
    if backend == "auto":
        backend, device = auto_backend(export_dir, precision, device)
    if backend == "torch":
        from dmrx.scoring.torch_backend import TorchBackend

        return TorchBackend(bundle, precision, device, threads)
    if backend == "onnxruntime":
        return OrtBackend(bundle, export_dir, precision, device, threads)
    if backend == "tensorrt":
        return TensorRTBackend(bundle, export_dir, precision)
    raise DmrxError(f"unknown backend {backend!r}")


def _need_export(bundle, export_dir: Path | None, what: str) -> dict:
    if export_dir is None:
        raise DmrxError(f"--backend {what} needs the run's export bundle ({bundle.path}/export with manifest.json, "
                        f"made from these weights): run `dmrx export {bundle.path}` first")
    return _export_manifest(export_dir)


class OrtBackend:
    """The exported user_encoder and candidate_scorer graphs under onnxruntime."""

    name = "onnxruntime"
    _NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}

    def __init__(self, bundle, export_dir: Path | None, precision: str, device: str | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        from dmrx.models.bundle import sha256

        manifest = _need_export(bundle, export_dir, "onnxruntime")
        if precision not in manifest.get("precisions", ["fp32"]) or precision == "bf16":
            raise DmrxError(f"--backend onnxruntime --precision {precision}: {export_dir} has "
                            f"{', '.join(manifest.get('precisions', ['fp32']))} graphs (export with --fp16 / --int8)")
        files = _onnx_files(export_dir, precision)
        if files is None:
            raise DmrxError(f"{export_dir}: the {precision} user_encoder/candidate_scorer graphs are missing")
        for f in files.values():
            want = manifest.get("artifacts", {}).get(f.name, {}).get("sha256")
            if want is not None and sha256(f) != want:
                raise DmrxError(f"{f}: damaged, its sha256 does not match {export_dir}/manifest.json")
        self.precision = precision
        self.names = dict(manifest.get("input_names", {}))  # batch key -> ONNX input name
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device not in (None, "cpu"):
            for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")[::-1]:
                if p in available:
                    providers.insert(0, p)
            if len(providers) == 1:
                raise DmrxError(f"--backend onnxruntime --device {device}: this onnxruntime has no CUDA or "
                                f"TensorRT execution provider (has {', '.join(available)})")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        gpu = any(p != "CPUExecutionProvider" for p in providers)
        # as torch: `threads` workers, each session.run on one thread (sessions are thread-safe)
        from dmrx.scoring.torch_backend import available_cores

        self.workers = 1 if gpu else int(threads or available_cores())
        so.intra_op_num_threads = 1 if not gpu else 0
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        def session(path: Path):
            if precision == "int8" and not gpu:
                # as every dmrx CPU consumer: INT8 graphs arranged for the CPU kernels at load (gather INT8
                # rows then dequantize; float-bias Gemm weights dequantized once), integer matmuls that do not
                # saturate on x86 without VNNI - dmrx.export.int8.cpu_session
                from dmrx.export.int8 import cpu_session

                return cpu_session(path, so)
            return ort.InferenceSession(str(path), so, providers=providers)

        try:
            self.user = session(files["user_encoder"])
            self.cand = session(files["candidate_scorer"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise DmrxError(f"{export_dir}: onnxruntime cannot load the {precision} graphs "
                            f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
        self.threads = self.workers
        self.providers = self.cand.get_providers()
        self.files = files
        key_of = {v: k for k, v in self.names.items()}
        self.user_in = [(i.name, key_of.get(i.name, i.name.replace("__", "/")), self._NP.get(i.type, np.float32))
                        for i in self.user.get_inputs()]
        self.user_out = [o.name for o in self.user.get_outputs()]
        self.cand_in = [(i.name, key_of.get(i.name, i.name.replace("__", "/")), self._NP.get(i.type, np.float32))
                        for i in self.cand.get_inputs()]
        outs = [o.name for o in self.cand.get_outputs()]
        if "ctr" not in outs:
            raise DmrxError(f"{files['candidate_scorer']}: no 'ctr' output (has {outs})")

    def score(self, work) -> np.ndarray:
        if work.n_candidates == 0:
            return np.zeros(0, np.float32)
        src = dict(work.hist)
        src["hist_len"] = work.hist_len
        feeds = {}
        for name, key, dt in self.user_in:
            if key not in src:
                raise DmrxError(f"{self.files['user_encoder']}: input {name} is not a history column")
            feeds[name] = np.ascontiguousarray(src[key], dtype=dt)
        user = dict(zip(self.user_out, self.user.run(None, feeds), strict=False))
        feeds = {}
        for name, key, dt in self.cand_in:
            if name.startswith(USER_PREFIX):
                x = user[name[len(USER_PREFIX):]]
            elif name == "user_row":
                x = work.user_row
            elif key in work.cand:
                x = work.cand[key]
            else:
                raise DmrxError(f"{self.files['candidate_scorer']}: input {name} is not a candidate column")
            feeds[name] = np.ascontiguousarray(x, dtype=dt)
        return np.asarray(self.cand.run(["ctr"], feeds)[0], dtype=np.float32).reshape(-1)

    def describe(self) -> dict:
        return {"backend": "onnxruntime", "precision": self.precision, "providers": list(self.providers),
                "device": "cuda" if any(p != "CPUExecutionProvider" for p in self.providers) else "cpu",
                "threads": self.threads,
                "path": f"{self.files['user_encoder'].name} + {self.files['candidate_scorer'].name}"}


class TensorRTBackend:
    """The export bundle's TensorRT engines (user_encoder + candidate_scorer) on the GPU."""

    name = "tensorrt"

    def __init__(self, bundle, export_dir: Path | None, precision: str):
        reason = _trt_reason()
        if reason:
            raise DmrxError(f"--backend tensorrt: {reason}")
        _need_export(bundle, export_dir, "tensorrt")
        engines = _engines(export_dir, precision)
        if engines is None:
            raise DmrxError(f"--backend tensorrt --precision {precision}: {export_dir}/engines has no "
                            f"{precision} engines (dmrx export --engine tensorrt)")
        from dmrx.export.tensorrt import Engine

        self.precision = precision
        self.user = Engine(engines["user_encoder"])
        self.cand = Engine(engines["candidate_scorer"])
        self.engines = engines
        manifest = _export_manifest(export_dir)
        self.names = dict(manifest.get("input_names", {}))

    def score(self, work) -> np.ndarray:
        import torch

        if work.n_candidates == 0:
            return np.zeros(0, np.float32)
        key_of = {v: k for k, v in self.names.items()}
        src = dict(work.hist)
        src["hist_len"] = work.hist_len
        feeds = {n: torch.from_numpy(np.ascontiguousarray(src[key_of.get(n, n.replace("__", "/"))]))
                 for n in self.user.inputs}
        user = self.user(feeds)
        feeds = {}
        for n in self.cand.inputs:
            if n.startswith(USER_PREFIX):
                feeds[n] = user[n[len(USER_PREFIX):]]
            elif n == "user_row":
                feeds[n] = torch.from_numpy(work.user_row)
            else:
                feeds[n] = torch.from_numpy(np.ascontiguousarray(work.cand[key_of.get(n, n.replace("__", "/"))]))
        return self.cand(feeds)["ctr"].float().cpu().numpy().reshape(-1)

    def describe(self) -> dict:
        import torch

        return {"backend": "tensorrt", "precision": self.precision, "device": "cuda",
                "gpu": torch.cuda.get_device_name(0), "path": ", ".join(p.name for p in self.engines.values())}
