"""Scoring backends behind one interface: `score(work) -> float32 CTRs` and `describe() -> dict`.

- torch (dmrx.scoring.torch_backend): the run's model; CPU fp32/int8, CUDA fp32/fp16/bf16.
- onnxruntime: the export bundle's user_encoder + candidate_scorer graphs (FP32, FP16 or INT8 files);
  CPU provider, and the CUDA / TensorRT execution providers when onnxruntime has them and a GPU is asked
  for. describe() reports the providers the session actually runs (session.get_providers()).
- tensorrt: the export bundle's engines (engines/<graph>.<precision>.plan), through
  dmrx.runtime.tensorrt.Engine; import-guarded, a one-line error when TensorRT or a GPU is missing.

`auto` picks, for the machine and precision, what benchmarks/score.py measured fastest: TensorRT engines
when TensorRT, a GPU and engines exist; torch on CUDA; on CPU the torch grouped path (fp32, int8), and
onnxruntime for fp16 (torch has no CPU fp16 path).
"""

from __future__ import annotations

from dmrx.errors import DmrxError
from dmrx.runtime import export_bundle


def load_model(model, backend: str = "auto") -> tuple:
    """(what scores, the export to use or None) for a run, an export directory, a Bundle, or None (the most
    recent run).

    A run scores with its own weights (torch) or through the export beside it (RUN/export) when that was
    made from the same weights; an export beside a run from other weights is ignored. An export directory
    named on its own needs nothing else (onnxruntime, TensorRT): it carries its vocabularies and feature
    spec. The torch backend needs the run's weights, found when the export sits in its run.
    """
    from dmrx.models import bundle as run_bundle

    if isinstance(model, run_bundle.Bundle):
        return model, _export_beside(model)
    path = run_bundle.resolve_run(model)
    if not path.exists():
        raise DmrxError(f"{path}: no such run or export directory")
    if not export_bundle.is_export(path):
        run = run_bundle.load(path)
        return run, _export_beside(run)
    export = export_bundle.load(path)
    if backend != "torch":
        return export, export
    if not (path.parent / "manifest.json").exists():
        raise DmrxError(
            f"{path}: --backend torch scores with the run's weights, and this export is not inside its run; "
            "score the export with --backend onnxruntime (or tensorrt)"
        )
    run = run_bundle.load(path.parent)
    if run.weights_hash != export.weights_hash:
        raise DmrxError(
            f"{path}: exported from other weights ({export.weights_hash[:12]}) than the run {run.path} "
            f"({run.weights_hash[:12]}); export the run again"
        )
    return run, export


def _export_beside(run):
    """RUN/export when it was made from the run's weights, else None."""
    path = run.path / "export"
    if not export_bundle.is_export(path):
        return None
    export = export_bundle.load(path)
    return export if export.weights_hash == run.weights_hash else None


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def auto_backend(export, precision: str, device: str | None, have_run: bool = True) -> tuple[str, str | None]:
    """(backend, device) that `auto` resolves to (see the module docstring); without a run, only the
    export's backends."""
    from dmrx.runtime.tensorrt import unavailable_reason

    gpu = device not in ("cpu",) and _cuda_available()
    has_graphs = export is not None and export.split_graphs(precision) is not None
    if not have_run:
        if gpu and unavailable_reason() is None and export.engines(precision):
            return "tensorrt", "cuda"
        return "onnxruntime", device
    if gpu:
        if unavailable_reason() is None and export is not None and export.engines(precision):
            return "tensorrt", "cuda"
        if precision in ("fp32", "fp16", "bf16"):
            return "torch", device or "cuda"
        import onnxruntime as ort

        if has_graphs and "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnxruntime", device or "cuda"
        return "torch", "cpu"  # int8 on the CPU
    if precision in ("fp32", "int8"):
        return "torch", "cpu"
    if precision == "fp16" and has_graphs:
        return "onnxruntime", "cpu"
    raise DmrxError(
        f"--precision {precision} on CPU: torch scores fp32 or int8 on CPU, and "
        + (
            "onnxruntime needs the export's FP16 graphs (dmrx export --fp16)"
            if precision == "fp16"
            else "bf16 needs a CUDA GPU"
        )
    )


def make_backend(source, export, backend: str, precision: str, device: str | None, threads: int | None):
    """The backend that scores with `source` (a run's Bundle, or an ExportBundle) and `export` (or None)."""
    if str(device).startswith("cuda"):
        from dmrx.models.device import pick_device

        pick_device(device)  # a named CUDA device that is not there is an error, as in training
    have_run = source is not export
    if backend == "auto":
        backend, device = auto_backend(export, precision, device, have_run)
    if backend == "torch":
        from dmrx.scoring.torch_backend import TorchBackend

        return TorchBackend(source, precision, device, threads)
    if export is None:
        raise DmrxError(
            f"--backend {backend} needs the run's export bundle ({source.path}/export, made from these "
            f"weights): run `dmrx export {source.path}` first"
        )
    if backend == "onnxruntime":
        from dmrx.scoring.ort_backend import OrtBackend

        return OrtBackend(export, precision, device, threads)
    if backend == "tensorrt":
        from dmrx.scoring.trt_backend import TensorRTBackend

        return TensorRTBackend(export, precision)
    raise DmrxError(f"unknown backend {backend!r}")
