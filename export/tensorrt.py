"""Building TensorRT engines from the FP16 and the Q/DQ INT8 ONNX graphs (running them: dmrx.runtime.tensorrt).

Written for the TensorRT 10.12+ / 11 Python API:
- strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 accepts and ignores
  it, strong typing being always on): the precision lives in the ONNX file (FP16 casts, Q/DQ nodes), so
  no BuilderFlag.FP16/INT8 and no calibrator (both removed in TensorRT 11);
- one optimisation profile over the dynamic batch axis (min 1, opt and max configurable);
- a timing cache (kept beside the engine cache and reused across builds);
- an engine cache keyed on TensorRT version + GPU name + compute capability + the ONNX file's sha256
  + the profile, so a different card, TensorRT or graph never reuses a stale plan;

TensorRT is an optional dependency (`pip install dmrx[trt]`): everything here is import-guarded and
`require()` says plainly what is missing. NOT verified on a machine with TensorRT in this repository's
test runs (the package's libraries download from a host the build machines cannot reach); the tests
that need it skip with that reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dmrx.artifacts.atomic import atomic_file
from dmrx.artifacts.manifests import sha256
from dmrx.errors import DmrxError
from dmrx.runtime.tensorrt import _logger, require

DEFAULT_PROFILE = (1, 1024, 8192)  # (min, opt, max) rows on the dynamic batch axes
_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
    "INT8": "int8",
}


def engine_key(onnx_path: Path, profile=DEFAULT_PROFILE) -> dict:
    trt = require()
    import torch  # noqa: PLC0415

    dev = torch.cuda.current_device()
    ident = {
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(dev),
        "sm": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "onnx_sha256": sha256(onnx_path),
        "profile": list(profile),
    }
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return ident


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    cache_dir: Path | None = None,
    profile=DEFAULT_PROFILE,
    workspace_bytes: int = 1 << 30,
) -> dict:
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
            with atomic_file(plan_path) as tmp:
                shutil.copyfile(cached, tmp)
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
    with atomic_file(plan_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if timing_path is not None:
        with atomic_file(timing_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    if cached is not None:
        with atomic_file(cached) as tmp:
            shutil.copyfile(plan_path, tmp)
    return {**ident, "cache_hit": False, "bytes": plan_path.stat().st_size, "sha256": sha256(plan_path)}
