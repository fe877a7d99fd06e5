"""TensorRT engines from the FP16 and the Q/DQ INT8 ONNX graphs, and a runtime over torch CUDA tensors.

Written for the TensorRT 10.12+ / 11 Python API:
- strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 accepts and ignores
  it, strong typing being always on): the precision lives in the ONNX file (FP16 casts, Q/DQ nodes), so
  no BuilderFlag.FP16/INT8 and no calibrator (both removed in TensorRT 11);
- one optimisation profile over the dynamic batch axis (min 1, opt and max configurable);
- a timing cache (kept beside the engine cache and reused across builds);
- an engine cache keyed on TensorRT version + GPU name + compute capability + the ONNX file's sha256
  + the profile, so a different card, TensorRT or graph never reuses a stale plan;
- `Engine`: deserialises a plan and runs it on torch CUDA tensors with set_input_shape /
  set_tensor_address / execute_async_v3 on the current torch stream.

TensorRT is an optional dependency (`pip install dmrx[trt]`): everything here is import-guarded and
`require()` says plainly what is missing. NOT verified on a machine with TensorRT in this repository's
test runs (the package's libraries download from a host the build machines cannot reach); the tests
that need it skip with that reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dmrx.errors import DmrxError
from dmrx.models.bundle import sha256

DEFAULT_PROFILE = (1, 1024, 8192)  # (min, opt, max) rows on the dynamic batch axes
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool",
                "INT8": "int8"}


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


def engine_key(onnx_path: Path, profile=DEFAULT_PROFILE) -> dict:
    trt = require()
    import torch  # noqa: PLC0415

    dev = torch.cuda.current_device()
    ident = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(dev),
             "sm": ".".join(map(str, torch.cuda.get_device_capability(dev))), "onnx_sha256": sha256(onnx_path),
             "profile": list(profile)}
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return ident


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, plan_path: Path, cache_dir: Path | None = None, profile=DEFAULT_PROFILE,
                 workspace_bytes: int = 1 << 30) -> dict:
    """Build (or fetch from the engine cache) a plan for onnx_path; write it to plan_path."""
    trt = require()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    ident = engine_key(onnx_path, profile)
    cached = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / f"{ident['key']}.plan"
        if cached.is_file():
            shutil.copyfile(cached, plan_path)
            return {**ident, "cache_hit": True, "bytes": plan_path.stat().st_size, "sha256": sha256(plan_path)}
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DmrxError(f"{onnx_path}: the ONNX-TensorRT parser rejected the graph: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    opt_profile = builder.create_optimization_profile()
    lo, opt, hi = profile
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        dims = [(d if d >= 0 else None) for d in shape]
        if all(d is not None for d in dims):
            continue

        def at(n, dims=dims):
            return tuple(n if d is None else d for d in dims)

        opt_profile.set_shape(t.name, at(lo), at(opt), at(hi))
    config.add_optimization_profile(opt_profile)
    timing_path = (cache_dir / "timing.cache") if cache_dir is not None else None
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path and timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DmrxError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    if timing_path is not None:
        tmp = timing_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_path)
    if cached is not None:
        tmp = cached.with_suffix(".tmp")
        shutil.copyfile(plan_path, tmp)
        os.replace(tmp, cached)
    return {**ident, "cache_hit": False, "bytes": plan_path.stat().st_size, "sha256": sha256(plan_path)}


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
        return {self._trt.float32: t.float32, self._trt.float16: t.float16, self._trt.int64: t.int64,
                self._trt.int32: t.int32, self._trt.bool: t.bool, self._trt.int8: t.int8}[dt]

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
