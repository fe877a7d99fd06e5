"""Running TensorRT engines: the import guard and `Engine`, a plan run on torch CUDA tensors.

Written for the TensorRT 10.12+ / 11 Python API (set_input_shape / set_tensor_address / execute_async_v3).
TensorRT is an optional dependency (`pip install dmrx[trt]`): everything here is import-guarded and
`require()` says plainly what is missing. Building engines is dmrx.export.tensorrt's job.

Every TensorRT call that reports failure by its return value (False or None) is checked and turned into a
one-line DmrxError naming the plan file: a batch beyond the optimisation profile, for one, makes
set_input_shape return False, after which the output shapes would be wrong. `Engine.max_rows` says how
many rows one call may take; callers split bigger batches (dmrx.scoring.trt_backend does).

NOT verified on a machine with TensorRT in this repository's test runs (TensorRT cannot be installed on
them). tests/test_tensorrt.py runs this module's own logic against a fake `tensorrt` module and fake CUDA
streams, standing in at the boundaries `_import_trt`, `_cuda_available`, `gpu`, `_new_stream`,
`_current_stream` and `DEVICE`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from dmrx.errors import DmrxError

DEVICE = "cuda"  # where Engine puts its tensors


def _import_trt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        return None
    return trt


def _cuda_available() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def _new_stream():
    """A CUDA stream of one Engine's own, so that engines in one process do not queue behind each other."""
    import torch  # noqa: PLC0415

    return torch.cuda.Stream()


def _current_stream():
    import torch  # noqa: PLC0415

    return torch.cuda.current_stream()


def gpu() -> tuple[str, str]:
    """(name, compute capability) of the current CUDA device: what engines and timing caches are keyed on."""
    import torch  # noqa: PLC0415

    dev = torch.cuda.current_device()
    return torch.cuda.get_device_name(dev), ".".join(map(str, torch.cuda.get_device_capability(dev)))


def unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable, else why not (one line)."""
    trt = _import_trt()
    if trt is None:
        return "TensorRT is not installed (pip install 'dmrx[trt]', TensorRT >= 10.12, needs NVIDIA's package host)"
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    if (major, minor) < (10, 12):
        return f"TensorRT {trt.__version__} is too old: dmrx builds strongly typed engines with TensorRT >= 10.12"
    if not _cuda_available():
        return "no CUDA GPU is visible to torch (TensorRT engines run on a GPU)"
    return None


def require():
    reason = unavailable_reason()
    if reason:
        raise DmrxError(f"--engine tensorrt: {reason}")
    return _import_trt()


@functools.cache
def _logger(trt):
    """The process's one TensorRT logger: TensorRT expects a single logger for every builder and runtime."""
    return trt.Logger(trt.Logger.WARNING)


class Engine:
    """A deserialised plan run on torch CUDA tensors, on a CUDA stream of its own (execute_async_v3)."""

    def __init__(self, plan_path: str | os.PathLike):
        trt = require()
        import torch  # noqa: PLC0415

        self.path = Path(plan_path)
        self._trt, self._torch = trt, torch
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise DmrxError(f"{self.path}: not a TensorRT plan for this TensorRT version and GPU; build it again")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DmrxError(f"{self.path}: TensorRT could not create an execution context (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = _new_stream()

    def max_rows(self, name: str) -> int | None:
        """The most rows (leading axis) input `name` takes: its profile's maximum; None when the axis is fixed."""
        if self.engine.get_tensor_shape(name)[0] >= 0:
            return None
        return int(self.engine.get_tensor_profile_shape(name, 0)[2][0])

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
        """feeds: input name -> tensor (moved to the GPU and cast to the engine's dtype if needed); each
        within the optimisation profile (max_rows), else a DmrxError."""
        torch = self._torch
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise DmrxError(f"{self.path}: TensorRT engine inputs missing: {missing}")
        keep = {}
        for name in self.inputs:
            x = torch.as_tensor(feeds[name]).to(DEVICE, dtype=self._torch_dtype(name), non_blocking=True)
            x = keep[name] = x.contiguous()
            if not self.context.set_input_shape(name, tuple(x.shape)):
                hi = self.max_rows(name)
                within = f" (at most {hi} rows per call)" if hi is not None else ""
                raise DmrxError(
                    f"{self.path}: input {name} of shape {tuple(x.shape)} is outside the engine's "
                    f"optimisation profile{within}"
                )
            self._address(name, x)
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise DmrxError(f"{self.path}: output {name} has a data-dependent shape {shape}; dmrx cannot bind it")
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=DEVICE)
            self._address(name, outs[name])
        # the inputs were copied on the caller's stream: this engine's stream waits for them, and its
        # outputs are complete when __call__ returns
        self.stream.wait_stream(_current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DmrxError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.stream.synchronize()
        return outs

    def _address(self, name: str, x) -> None:
        if not self.context.set_tensor_address(name, x.data_ptr()):
            raise DmrxError(f"{self.path}: TensorRT refused the buffer of {name} (see the TensorRT log above)")
