"""dmrx's own TensorRT logic (engine build, caches, Engine, the scoring backend) against a FAKE TensorRT.

TensorRT cannot be installed on the machines these tests run on (and they have no GPU), so `FakeTensorRT`
below stands in for the `tensorrt` module and `FakeStream` for torch CUDA streams; tensors stay on the CPU
(dmrx.runtime.tensorrt.DEVICE). The fake runs each "engine" with onnxruntime on the ONNX file it was
"built" from, honours the optimisation profile the way TensorRT does (set_input_shape returns False beyond
it), and can be told to fail any call the way TensorRT reports failure (False or None). What these tests
prove is dmrx's handling around TensorRT, never TensorRT itself: see docs/what-ran-where.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dmrx.errors import DmrxError
from dmrx.export import tensorrt as build
from dmrx.runtime import tensorrt as rt

_MAGIC = b"FAKE-TRT-PLAN\n"
_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 3: "int8"}


def _view(ptr: int, shape, dtype) -> np.ndarray:
    """The numpy view of `shape` elements of `dtype` at a (CPU) address."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * max(count * np.dtype(dtype).itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class FakeStream:
    """A FAKE torch.cuda.Stream (no CUDA here): records what dmrx asks of it."""

    made = 0

    def __init__(self):
        FakeStream.made += 1
        self.cuda_stream = FakeStream.made
        self.waited = 0

    def wait_stream(self, other):
        self.waited += 1

    def synchronize(self):
        pass


class FakeTensorRT:
    """A FAKE standing in for the `tensorrt` module, which cannot be installed here (see the module doc).

    fail: names of calls that report failure (return False, None or -1) as TensorRT does.
    during_build: called inside build_serialized_network (to act as another process meanwhile).
    """

    def __init__(self, version="10.12.0"):
        self.__version__ = version
        self.fail: set[str] = set()
        self.during_build = None
        self.loggers = 0
        self.rows_seen: list[int] = []
        for name in _DTYPES.values():
            setattr(self, name, name)
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                fake.loggers += 1

        self.Logger = Logger
        self.TensorIOMode = type("TensorIOMode", (), {"INPUT": "input", "OUTPUT": "output"})
        self.NetworkDefinitionCreationFlag = type("Flag", (), {"STRONGLY_TYPED": 0})
        self.MemoryPoolType = type("Pool", (), {"WORKSPACE": 0})
        self.Builder = lambda logger: _Builder(fake)
        self.OnnxParser = lambda network, logger: _Parser(network)
        self.Runtime = lambda logger: _Runtime(fake)


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _Network:
    model: onnx.ModelProto | None = None

    @property
    def num_inputs(self):
        return len(self.model.graph.input)

    def get_input(self, i):
        v = self.model.graph.input[i]
        return _Tensor(v.name, [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])


class _Parser:
    def __init__(self, network):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        try:
            self.network.model = onnx.load(path)
        except Exception as e:  # noqa: BLE001 -- the fake parser reports like the real one
            self.errors = [f"cannot parse: {e.__class__.__name__}"]
            return False
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _TimingCache:
    def __init__(self, fake, entries):
        self.fake, self.entries = fake, set(entries)

    def combine(self, other, ignore_mismatch):
        if "combine" in self.fake.fail:
            return False
        self.entries |= other.entries
        return True

    def serialize(self):
        return json.dumps({"version": self.fake.__version__, "entries": sorted(self.entries)}).encode()


class _Config:
    def __init__(self, fake):
        self.fake, self.profile, self.timing = fake, None, None

    def set_memory_pool_limit(self, pool, size):
        pass

    def add_optimization_profile(self, profile):
        self.profile = profile
        return -1 if "add_optimization_profile" in self.fake.fail else 0

    def create_timing_cache(self, data):
        if "create_timing_cache" in self.fake.fail:
            return None
        if not data:
            return _TimingCache(self.fake, [])
        try:
            got = json.loads(bytes(data))
        except ValueError:
            return None
        return _TimingCache(self.fake, got["entries"]) if got["version"] == self.fake.__version__ else None

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache
        return "set_timing_cache" not in self.fake.fail

    def get_timing_cache(self):
        return None if "get_timing_cache" in self.fake.fail else self.timing


class _Builder:
    def __init__(self, fake):
        self.fake = fake

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config(self.fake)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        if self.fake.during_build:
            self.fake.during_build()
        if "build_serialized_network" in self.fake.fail:
            return None
        data = network.model.SerializeToString()
        config.timing.entries.add(hashlib.sha256(data).hexdigest()[:8])
        return _MAGIC + json.dumps(config.profile.shapes).encode() + b"\n" + data


class _Runtime:
    def __init__(self, fake):
        self.fake = fake

    def deserialize_cuda_engine(self, plan):
        if "deserialize_cuda_engine" in self.fake.fail or not plan.startswith(_MAGIC):
            return None
        head, data = plan[len(_MAGIC) :].split(b"\n", 1)
        return _Engine(self.fake, json.loads(head), data)


class _Engine:
    def __init__(self, fake, profile, data):
        self.fake, self.profile = fake, profile
        model = onnx.load_from_string(data)
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.io = {}
        for mode, values in (("input", model.graph.input), ("output", model.graph.output)):
            for v in values:
                tt = v.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
                self.io[v.name] = (mode, _DTYPES[tt.elem_type], dims)
        self.names = list(self.io)

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return list(self.io[name][2])

    def get_tensor_profile_shape(self, name, index):
        return self.profile[name]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.results = engine, {}, {}, None

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile.get(name, [shape, shape, shape])
        if len(shape) != len(hi) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name], self.results = tuple(shape), None
        self.engine.fake.rows_seen.append(shape[0])
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def _run(self):
        if self.results is None:
            feeds = {
                n: _view(self.addr[n], self.shapes[n], self.engine.io[n][1]).copy()
                for n, (mode, *_) in self.engine.io.items()
                if mode == "input"
            }
            outs = [n for n, (mode, *_) in self.engine.io.items() if mode == "output"]
            self.results = dict(zip(outs, self.engine.session.run(outs, feeds), strict=True))
        return self.results

    def get_tensor_shape(self, name):
        return list(self._run()[name].shape)

    def execute_async_v3(self, stream):
        if "execute_async_v3" in self.engine.fake.fail:
            return False
        for name, value in self._run().items():
            _view(self.addr[name], value.shape, value.dtype)[...] = value
        return True


@pytest.fixture
def fake_trt(monkeypatch):
    """TensorRT and CUDA replaced by the fakes above, at dmrx.runtime.tensorrt's boundary functions."""
    fake = FakeTensorRT()
    monkeypatch.setattr(rt, "_import_trt", lambda: fake)
    monkeypatch.setattr(rt, "_cuda_available", lambda: True)
    monkeypatch.setattr(rt, "gpu", lambda: ("Fake GPU H200", "9.0"))
    monkeypatch.setattr(rt, "_new_stream", FakeStream)
    monkeypatch.setattr(rt, "_current_stream", FakeStream)
    monkeypatch.setattr(rt, "DEVICE", "cpu")
    rt._logger.cache_clear()
    yield fake
    rt._logger.cache_clear()


@pytest.fixture(scope="module")
def graphs(tiny_run, tmp_path_factory):
    """The tiny run's FP32 graphs."""
    from dmrx.export.pipeline import ExportOptions, export_run

    out = tmp_path_factory.mktemp("trt-graphs") / "export"
    export_run(tiny_run, ExportOptions(out=out, gate=False, timing=False))
    return out


SMALL = (1, 4, 7)  # a profile far below the batches scored, so that splitting is exercised


def test_set_input_shape_false_is_a_clear_error(fake_trt, graphs, tmp_path):
    plan = tmp_path / "ranking.plan"
    build.build_engine(graphs / "ranking.onnx", plan, profile=SMALL)
    engine = rt.Engine(plan)
    assert engine.max_rows(engine.inputs[0]) == 7
    feeds = _ranking_feeds(graphs, 8)
    outside = r"ranking\.plan: input .* outside the engine's optimisation profile \(at most 7 rows"
    with pytest.raises(DmrxError, match=outside):
        engine(feeds)
    got = engine({k: v[:7] for k, v in feeds.items()})["ctr"]
    assert got.shape[0] == 7


def _ranking_feeds(graphs, n):
    import torch

    s = ort.InferenceSession(str(graphs / "ranking.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in s.get_inputs():
        shape = [n if not isinstance(d, int) else d for d in i.shape]
        if "int64" in i.type:
            hi = 3 if i.name != "hist_len" else 5
            feeds[i.name] = torch.from_numpy(rng.integers(1, hi, size=shape).astype(np.int64))
        else:
            feeds[i.name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    return feeds


@pytest.mark.parametrize(
    "call,message",
    [
        ("build_serialized_network", "ranking.onnx: TensorRT could not build an engine"),
        ("create_timing_cache", r"timing-.*\.cache: TensorRT could not load the timing cache"),
        ("set_timing_cache", r"timing-.*\.cache: TensorRT refused the timing cache"),
        ("get_timing_cache", r"timing-.*\.cache: TensorRT returned no timing cache"),
        ("combine", r"timing-.*\.cache: TensorRT could not merge"),
        ("add_optimization_profile", "ranking.onnx: TensorRT refused the optimisation profile"),
    ],
)
def test_every_build_failure_is_one_line_naming_the_file(fake_trt, graphs, tmp_path, call, message):
    fake_trt.fail = {call}
    with pytest.raises(DmrxError, match=message) as e:
        build.build_engine(graphs / "ranking.onnx", tmp_path / "out" / "ranking.plan", cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "ranking.plan").exists() or call in ("get_timing_cache", "combine")


@pytest.mark.parametrize("call", ["deserialize_cuda_engine", "execute_async_v3"])
def test_every_run_failure_is_one_line_naming_the_plan(fake_trt, graphs, tmp_path, call):
    plan = tmp_path / "ranking.plan"
    build.build_engine(graphs / "ranking.onnx", plan)
    fake_trt.fail = {call}
    with pytest.raises(DmrxError, match=r"ranking\.plan: ") as e:
        rt.Engine(plan)(_ranking_feeds(graphs, 3))
    assert "\n" not in str(e.value)


def test_not_a_plan_is_a_clear_error(fake_trt, tmp_path):
    (tmp_path / "x.plan").write_bytes(b"not a plan")
    with pytest.raises(DmrxError, match=r"x\.plan: not a TensorRT plan for this TensorRT version and GPU"):
        rt.Engine(tmp_path / "x.plan")


def test_timing_cache_is_per_version_and_gpu_and_merged(fake_trt, graphs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = build.timing_cache_path(cache)
    assert "10.12.0" in path.name and "Fake-GPU-H200" in path.name and "sm9.0" in path.name
    monkeypatch.setattr(rt, "gpu", lambda: ("Fake GPU L4", "8.9"))
    assert build.timing_cache_path(cache) != path
    monkeypatch.setattr(rt, "gpu", lambda: ("Fake GPU H200", "9.0"))
    fake_trt.__version__ = "10.13.0"
    assert build.timing_cache_path(cache) != path
    fake_trt.__version__ = "10.12.0"

    # another build writes its timings while this one builds: both sets survive
    def other_process():
        with open(path, "wb") as f:
            f.write(json.dumps({"version": "10.12.0", "entries": ["other"]}).encode())

    build.build_engine(graphs / "ranking.onnx", tmp_path / "a.plan", cache_dir=cache)
    first = set(json.loads(path.read_bytes())["entries"])
    fake_trt.during_build = other_process
    build.build_engine(graphs / "user_encoder.onnx", tmp_path / "b.plan", cache_dir=cache)
    entries = set(json.loads(path.read_bytes())["entries"])
    assert len(first) == 1 and first < entries and "other" in entries and len(entries) == 3
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    # the engine cache: same graph, version and GPU -> a hit; another GPU -> a fresh build
    fake_trt.during_build = None
    assert build.build_engine(graphs / "ranking.onnx", tmp_path / "c.plan", cache_dir=cache)["cache_hit"]
    monkeypatch.setattr(rt, "gpu", lambda: ("Fake GPU L4", "8.9"))
    assert not build.build_engine(graphs / "ranking.onnx", tmp_path / "d.plan", cache_dir=cache)["cache_hit"]


def test_one_logger_and_one_stream_per_engine(fake_trt, graphs, tmp_path):
    for g in ("user_encoder", "candidate_scorer"):
        build.build_engine(graphs / f"{g}.onnx", tmp_path / f"{g}.plan")
    a, b = rt.Engine(tmp_path / "user_encoder.plan"), rt.Engine(tmp_path / "candidate_scorer.plan")
    assert fake_trt.loggers == 1
    assert a.stream is not b.stream and isinstance(a.stream, FakeStream)


def test_scoring_splits_batches_beyond_the_profile(fake_trt, tiny_run, tiny_data, tmp_path, monkeypatch):
    """A whole export with engines (fake TensorRT, a 7-row profile) scores 64-row batches exactly as the
    onnxruntime backend does: each batch goes through the engines in pieces of at most 7 rows."""
    from dmrx.export.pipeline import ExportOptions, export_run
    from dmrx.scoring import score_file

    monkeypatch.setattr(build, "DEFAULT_PROFILE", SMALL)
    out = tmp_path / "export"
    export_run(tiny_run, ExportOptions(out=out, gate=False, timing=False, engine="tensorrt"))
    cand = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", cand)
    t = score_file(cand, out, tmp_path / "t.h5", backend="tensorrt", batch_size=64)
    score_file(cand, out, tmp_path / "o.h5", backend="onnxruntime", batch_size=64)
    assert t["backend"] == "tensorrt" and t["max_rows"] == 7
    with h5py.File(tmp_path / "t.h5") as a, h5py.File(tmp_path / "o.h5") as b:
        got, want = a["score"][:], b["score"][:]
    assert len(got) == len(want) > 64
    assert np.abs(got - want).max() <= 1e-6
    assert max(fake_trt.rows_seen) == 7 and len(fake_trt.rows_seen) > 2 * len(want) // 7
