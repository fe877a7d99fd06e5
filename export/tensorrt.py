"""Building TensorRT engines from the FP16 and the Q/DQ INT8 ONNX graphs (running them: dmrx.runtime.tensorrt).

Written for the TensorRT 10.12+ / 11 Python API:
- strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11 accepts and ignores
  it, strong typing being always on): the precision lives in the ONNX file (FP16 casts, Q/DQ nodes), so
  no BuilderFlag.FP16/INT8 and no calibrator (both removed in TensorRT 11);
- one optimisation profile over the dynamic batch axis (min 1, opt and max configurable);
- a timing cache beside the engine cache, one per TensorRT version and GPU (a cache from another card or
  release is refused by TensorRT), merged with what other builds wrote meanwhile under a file lock;
- an engine cache keyed on TensorRT version + GPU name + compute capability + the ONNX file's sha256
  + the profile, so a different card, TensorRT or graph never reuses a stale plan;

Every call that reports failure by returning False or None is checked: a one-line DmrxError naming the
ONNX file or the cache file. TensorRT is an optional dependency (`pip install dmrx[trt]`): everything here
is import-guarded and `require()` says plainly what is missing. NOT verified on a machine with TensorRT in
this repository's test runs (TensorRT cannot be installed on them); tests/test_tensorrt.py runs this
module's logic against a fake `tensorrt` module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
from pathlib import Path

from dmrx.artifacts.atomic import atomic_file
from dmrx.artifacts.manifests import sha256
from dmrx.errors import DmrxError
from dmrx.runtime import tensorrt as rt

DEFAULT_PROFILE = (1, 1024, 8192)  # (min, opt, max) rows on the dynamic batch axes
_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
    "INT8": "int8",
}


def require():
    return rt.require()


def _machine(trt) -> dict:
    name, sm = rt.gpu()
    return {"tensorrt": trt.__version__, "gpu": name, "sm": sm}


def timing_cache_path(cache_dir: Path) -> Path:
    """The timing cache for this TensorRT version and GPU: TensorRT refuses caches from another of either."""
    m = _machine(rt.require())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{m['tensorrt']}-{m['gpu']}-sm{m['sm']}").strip("-")
    return Path(cache_dir) / f"timing-{slug}.cache"


def engine_key(onnx_path: Path, profile=None) -> dict:
    ident = {
        **_machine(rt.require()),
        "onnx_sha256": sha256(onnx_path),
        "profile": list(profile or DEFAULT_PROFILE),
    }
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return ident


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    cache_dir: Path | None = None,
    profile=None,
    workspace_bytes: int = 1 << 30,
) -> dict:
    """Build (or fetch from the engine cache) a plan for onnx_path; write it to plan_path.

    profile: (min, opt, max) rows on the dynamic batch axes, DEFAULT_PROFILE when None."""
    trt = rt.require()
    profile = tuple(profile or DEFAULT_PROFILE)
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
    logger = rt._logger(trt)
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
    if config.add_optimization_profile(opt_profile) < 0:
        raise DmrxError(f"{onnx_path}: TensorRT refused the optimisation profile {profile} (see its log above)")
    timing_path = timing_cache_path(cache_dir) if cache_dir is not None else None
    timing = config.create_timing_cache(_read_timing(timing_path))
    if timing is None:
        raise DmrxError(f"{timing_path or onnx_path}: TensorRT could not load the timing cache; delete it")
    if not config.set_timing_cache(timing, ignore_mismatch=False):
        raise DmrxError(f"{timing_path or onnx_path}: TensorRT refused the timing cache; delete it")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DmrxError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    with atomic_file(plan_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if timing_path is not None:
        _merge_timing(config, timing_path)
    if cached is not None:
        with atomic_file(cached) as tmp:
            shutil.copyfile(plan_path, tmp)
    return {**ident, "cache_hit": False, "bytes": plan_path.stat().st_size, "sha256": sha256(plan_path)}


def _read_timing(path: Path | None) -> bytes:
    return path.read_bytes() if path is not None and path.is_file() else b""


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (created if needed), held for the block: one writer at a time."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _merge_timing(config, timing_path: Path) -> None:
    """Write this build's timings into the cache file, keeping what builds in other processes wrote since
    this one read it (under a lock; the file itself is replaced atomically)."""
    built = config.get_timing_cache()
    if built is None:
        raise DmrxError(f"{timing_path}: TensorRT returned no timing cache after the build")
    with _locked(timing_path.with_name(timing_path.name + ".lock")):
        merged = config.create_timing_cache(_read_timing(timing_path))
        if merged is None:
            raise DmrxError(f"{timing_path}: TensorRT could not load the timing cache; delete it")
        if not merged.combine(built, False):
            raise DmrxError(f"{timing_path}: TensorRT could not merge this build's timings into the cache; delete it")
        with atomic_file(timing_path) as tmp:
            tmp.write_bytes(bytes(merged.serialize()))
