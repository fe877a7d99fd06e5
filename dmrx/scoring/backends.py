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

from pathlib import Path

from dmrx.errors import DmrxError
from dmrx.runtime import export_bundle


def load_model(model) -> tuple:
    """(Bundle, export directory or None, its manifest or None) from a run, an export directory, a Bundle,
    or None (the latest run).

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
        if export_bundle.is_export(path):
            explicit_export = path
            manifest = export_bundle.read(path)
            run = Path(manifest.get("source", {}).get("run", path.parent))
            if not (run / "manifest.json").exists():
                run = path.parent
            if not (run / "manifest.json").exists():
                raise DmrxError(
                    f"{path}: the export's run ({run}) is not available; scoring needs the run for "
                    "its vocabularies and feature spec"
                )
            b = run_bundle.load(run)
        else:
            b = run_bundle.load(path)
    export_dir = explicit_export or b.path / "export"
    if explicit_export is None and not export_bundle.is_export(export_dir):
        return b, None, None
    manifest = export_bundle.read(export_dir)
    made_from = manifest.get("source", {}).get("weights_sha256")
    if made_from != b.weights_hash:
        if explicit_export is not None:
            raise DmrxError(
                f"{export_dir}: exported from other weights ({str(made_from)[:12]}) than the run "
                f"{b.path} ({b.weights_hash[:12]}); export the run again"
            )
        return b, None, None
    return b, export_dir, manifest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _has(manifest: dict | None, names: list[str]) -> bool:
    return manifest is not None and all(n in manifest["files"] for n in names)


def _has_graphs(manifest: dict | None, precision: str) -> bool:
    return _has(manifest, [export_bundle.graph_name(g, precision) for g in export_bundle.SPLIT_GRAPHS])


def _has_engines(manifest: dict | None, precision: str) -> bool:
    return _has(manifest, [export_bundle.engine_name(g, precision) for g in export_bundle.SPLIT_GRAPHS])


def auto_backend(manifest: dict | None, precision: str, device: str | None) -> tuple[str, str | None]:
    """(backend, device) that `auto` resolves to (see the module docstring), given the export's manifest."""
    from dmrx.runtime.tensorrt import unavailable_reason

    gpu = device not in ("cpu",) and _cuda_available()
    if gpu:
        if unavailable_reason() is None and _has_engines(manifest, precision):
            return "tensorrt", "cuda"
        if precision in ("fp32", "fp16", "bf16"):
            return "torch", device or "cuda"
        import onnxruntime as ort

        if _has_graphs(manifest, precision) and "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnxruntime", device or "cuda"
        return "torch", "cpu"  # int8 on the CPU
    if precision in ("fp32", "int8"):
        return "torch", "cpu"
    if precision == "fp16" and _has_graphs(manifest, precision):
        return "onnxruntime", "cpu"
    raise DmrxError(
        f"--precision {precision} on CPU: torch scores fp32 or int8 on CPU, and "
        + (
            "onnxruntime needs the export's FP16 graphs (dmrx export --fp16)"
            if precision == "fp16"
            else "bf16 needs a CUDA GPU"
        )
    )


def make_backend(
    bundle,
    export_dir: Path | None,
    manifest: dict | None,
    backend: str,
    precision: str,
    device: str | None,
    threads: int | None,
):
    if device is not None:
        from dmrx.models.device import pick_device

        pick_device(device)  # a named CUDA device that is not there is an error, as in training
    if backend == "auto":
        backend, device = auto_backend(manifest, precision, device)
    if backend == "torch":
        from dmrx.scoring.torch_backend import TorchBackend

        return TorchBackend(bundle, precision, device, threads)
    if backend in ("onnxruntime", "tensorrt") and export_dir is None:
        raise DmrxError(
            f"--backend {backend} needs the run's export bundle ({bundle.path}/export with manifest.json, "
            f"made from these weights): run `dmrx export {bundle.path}` first"
        )
    if backend == "onnxruntime":
        from dmrx.scoring.ort_backend import OrtBackend

        return OrtBackend(export_dir, manifest, precision, device, threads)
    if backend == "tensorrt":
        from dmrx.scoring.trt_backend import TensorRTBackend

        return TensorRTBackend(export_dir, manifest, precision)
    raise DmrxError(f"unknown backend {backend!r}")
