"""Backends agree: onnxruntime (exported graphs) vs torch, CUDA and TensorRT where present."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from dmrx.errors import DmrxError
from dmrx.scoring import Scorer, score_file


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    """The tiny run exported (FP32 and FP16 graphs)."""
    from dmrx.export.pipeline import ExportOptions, export_run

    out = tmp_path_factory.mktemp("score_export") / "export"
    export_run(tiny_run, ExportOptions(out=out, fp16=True, gate=False))
    return out


@pytest.fixture(scope="module")
def export_int8(tiny_run, tmp_path_factory):
    from dmrx.export.pipeline import ExportOptions, export_run

    out = tmp_path_factory.mktemp("score_export_int8") / "export"
    export_run(tiny_run, ExportOptions(out=out, int8=True, gate=False))
    return out


def test_onnxruntime_fp32_matches_torch(tiny_data, tiny_run, export_dir, tmp_path):
    cand = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", cand)
    score_file(cand, tiny_run, tmp_path / "t.h5", backend="torch", batch_size=256)
    o = score_file(cand, export_dir, tmp_path / "o.h5", backend="onnxruntime", batch_size=256)
    assert o["backend"] == "onnxruntime" and o["providers"] == ["CPUExecutionProvider"]
    with h5py.File(tmp_path / "t.h5") as a, h5py.File(tmp_path / "o.h5") as b:
        diff = np.abs(a["score"][:] - b["score"][:]).max()
        assert a.attrs["model_hash"] == b.attrs["model_hash"]
    assert diff <= 1e-5


def test_onnxruntime_reports_the_provider_that_runs(tiny_run, export_dir):
    s = Scorer(export_dir, backend="onnxruntime")
    assert s.describe()["providers"] == s.backend.cand.get_providers()
    with pytest.raises(DmrxError, match="bf16"):
        Scorer(export_dir, backend="onnxruntime", precision="bf16")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_onnxruntime_reduced_precision_close_to_fp32(tiny_data, tiny_run, request, tmp_path, precision):
    """The export's FP16 / INT8 graphs score close to FP32 (their quality gates are the export's job)."""
    export = request.getfixturevalue("export_dir" if precision == "fp16" else "export_int8")
    cand = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", cand)
    score_file(cand, tiny_run, tmp_path / "t.h5", backend="torch")
    s = score_file(cand, export, tmp_path / "o.h5", backend="onnxruntime", precision=precision)
    assert s["precision"] == precision and precision in s["path"]
    with h5py.File(tmp_path / "t.h5") as a, h5py.File(tmp_path / "o.h5") as b:
        assert b.attrs["precision"] == precision
        assert np.abs(a["score"][:] - b["score"][:]).max() < 0.05


def test_onnxruntime_needs_an_export(tiny_run):
    with pytest.raises(DmrxError, match="dmrx export"):
        Scorer(tiny_run, backend="onnxruntime")


def test_tensorrt_backend(tiny_run, export_dir):
    from dmrx.runtime.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason:
        with pytest.raises(DmrxError, match="tensorrt"):
            Scorer(export_dir, backend="tensorrt")
        pytest.skip(f"TensorRT backend not exercised: {reason}")
    pytest.skip("TensorRT present: engines need `dmrx export --engine tensorrt` (exercised on GPU machines)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 5e-3), ("bf16", 3e-2)])
def test_torch_cuda_matches_cpu(tiny_data, tiny_run, tmp_path, precision, tol):
    cand = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", cand)
    score_file(cand, tiny_run, tmp_path / "cpu.h5", backend="torch", device="cpu")
    s = score_file(cand, tiny_run, tmp_path / "gpu.h5", backend="torch", precision=precision, device="cuda")
    assert s["device"].startswith("cuda")
    with h5py.File(tmp_path / "cpu.h5") as a, h5py.File(tmp_path / "gpu.h5") as b:
        assert np.abs(a["score"][:] - b["score"][:]).max() <= tol
