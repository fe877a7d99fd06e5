"""The benchmark scripts still run end to end (small sizes; their figures are not checked here).

gpu_check.py is meant to be run once on a lent GPU with a few minutes of device time: a script that breaks
there wastes the loan, so its CPU dry run is exercised here. quality.py's --results cache must reuse runs
rather than train them again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run_on_cpu_passes_every_check(tmp_path):
    table = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--steps", "30", "--users", "400", "--speed-steps", "2", "--json-out", str(table)]
    p = _run("gpu_check.py", *args, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)  # --json: stdout is strict JSON, progress went to stderr
    assert json.loads(table.read_text()) == out  # the file written after every stage holds the whole table
    names = [c["check"] for c in out["checks"]]
    for prefix in ("train: loss", "parity", "LazyAdam", "train step/s at batch 4096", "gloo: sparse", "score torch"):
        assert any(k.startswith(prefix) for k in names), prefix
    assert all(c["ok"] is not False for c in out["checks"])
    assert not any(k.endswith(": error") for k in names)
    skipped = {c["check"] for c in out["checks"] if c["result"].startswith("skipped: no CUDA")}
    assert {"score torch fp16", "score torch bf16", "peak CUDA memory allocated"} <= skipped


def _quality_args(tmp_path: Path, results: Path) -> list[str]:
    """benchmarks/quality.py at the smallest size: one seed of the LR baseline, one epoch, 300 users."""
    data = str(tmp_path / "data")
    size = ["--users", "300", "--seeds", "1", "--epochs", "1", "--variants", "lr"]
    return [*size, "--json", "--data-dir", data, "--results", str(results)]


def test_quality_results_file_reuses_finished_runs(tmp_path):
    results = tmp_path / "runs.jsonl"
    args = _quality_args(tmp_path, results)
    first = _run("quality.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(results.read_text().splitlines()) == 1
    # a second invocation adds one seed: it trains seed 1 only and reports seed 0 from the file as it was
    second = _run("quality.py", *args[:3], "2", *args[4:])
    assert second.returncode == 0, second.stderr[-2000:]
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["key"]["seed"] for x in lines] == [0, 1]
    runs = json.loads(second.stdout)["results"]["lr"]["runs"]
    assert runs[0] == json.loads(first.stdout)["results"]["lr"]["runs"][0] == lines[0]["metrics"]


def test_quality_synthetic_overrides_shape_the_data_and_the_key(tmp_path):
    results = tmp_path / "runs.jsonl"
    args = [*_quality_args(tmp_path, results), "--synthetic", '{"cates": 7}']
    p = _run("quality.py", *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(results.read_text())["key"]["synthetic"] == {"cates": 7}
    from dmrx.data.reader import DataFile

    with DataFile(tmp_path / "data" / "train.h5") as f:
        assert f.read_columns(0, f.n_rows, ["target/cate"])["target/cate"].max() <= 7
    bad = _run("quality.py", *args[:-1], '{"seed": 3}')
    assert bad.returncode != 0 and "--synthetic" in bad.stderr


def test_edge_runs_at_a_tiny_size_and_reports_every_configuration(tmp_path):
    args = ["--rows", "3000", "--per-user", "20", "--rounds", "1", "--calls", "5", "--candidates", "200"]
    args += ["--threads", "1", "--file", str(tmp_path / "c.h5"), "--run", str(tmp_path / "run"), "--json"]
    p = _run("edge.py", *args)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    got = {(c["backend"], c["precision"]) for c in out["configs"]}
    assert got == {("torch", "fp32"), ("torch", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")} | {
        ("onnxruntime", "int8"),
        ("onnxruntime", "int8-qdq"),
    }
    for c in out["configs"]:
        assert c["threads"]["1"]["rows_per_s"] > 0 and c["latency"]["200"]["model"]["p50_ms"] > 0
    paths = {c["precision"]: c["path"] for c in out["configs"] if c["backend"] == "onnxruntime"}
    assert "int8-cpu" in paths["int8"] and "int8-cpu" not in paths["int8-qdq"]
    assert out["goals"]["1_threads"]["int8_vs_fp32_artifact"] > 0
