"""Running TensorRT engines: the import guard and `Engine`, a plan run on torch CUDA tensors.

Written for the TensorRT 10.12+ / 11 Python API (set_input_shape / set_tensor_address / execute_async_v3 on
the current torch stream). TensorRT is an optional dependency (`pip install dmrx[trt]`): everything here is
import-guarded and `require()` says plainly what is missing. Building engines is dmrx.export.tensorrt's job.
NOT verified on a machine with TensorRT in this repository's test runs (the package's libraries download
from a host the build machines cannot reach); the tests that need it skip with that reason.
"""

from __future__ import annotations

import os
from pathlib import Path

from dmrx.errors import DmrxError


def _import_trt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        return None
    return trt


def unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable, else why not (one line)."""
    trt = _import_trt()
    if trt is None:
        return "TensorRT is not installed (pip install 'dmrx[trt]', TensorRT >= 10.12, needs NVIDIA's package host)"
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    if (major, minor) < (10, 12):
        return f"TensorRT {trt.__version__} is too old: dmrx builds strongly typed engines with TensorRT >= 10.12"
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (TensorRT engines run on a GPU)"
    return None


def require():
    reason = unavailable_reason()
    if reason:
        raise DmrxError(f"--engine tensorrt: {reason}")
    return _import_trt()


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


class Engine:
    """A deserialised plan run on torch CUDA tensors (execute_async_v3 on the current torch stream)."""

    def __init__(self, plan_path: str | os.PathLike):
        trt = require()
        import torch  # noqa: PLC0415

        self._trt, self._torch = trt, torch
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise DmrxError(f"{plan_path}: not a TensorRT plan for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str):
        t = self._torch
        dt = self.engine.get_tensor_dtype(name)
        return {
            self._trt.float32: t.float32,
            self._trt.float16: t.float16,
            self._trt.int64: t.int64,
            self._trt.int32: t.int32,
            self._trt.bool: t.bool,
            self._trt.int8: t.int8,
        }[dt]

    def __call__(self, feeds: dict) -> dict:
        """feeds: input name -> torch tensor (moved to CUDA and cast to the engine's dtype if needed)."""
        torch = self._torch
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise DmrxError(f"TensorRT engine inputs missing: {missing}")
        keep = {}
        for name in self.inputs:
            x = feeds[name]
            x = torch.as_tensor(x).to("cuda", dtype=self._torch_dtype(name), non_blocking=True).contiguous()
            keep[name] = x
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DmrxError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return outs
