"""Faults that need a process of their own: kill -9 at seeded random moments, then a rerun or --resume that
ends identical to an uninterrupted run; and a full disk (RLIMIT_FSIZE) under every writer, which must end in
one line naming the output, exit code 2, no partial output, and a resumable run where progress was committed.

RLIMIT_FSIZE stands in for a full disk without root: with SIGXFSZ ignored, a write beyond the limit fails
with EFBIG exactly where ENOSPC would.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # one thread: CPU training is bitwise repeatable
TRAIN = ["--epochs", "1", "--batch-size", "64", "--seed", "3"]


def dmrx(*args, cwd: Path, limit: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    def preexec():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(
        [sys.executable, "-m", "dmrx", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=300,
    )
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def kill_when(args, cwd: Path, ready, delay: float) -> None:
    """Start `dmrx args`, wait until ready() holds, sleep `delay`, then kill -9 (or let it finish)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmrx", *map(str, args)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def one_line_error(res: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def scores(path: Path) -> bytes:
    with h5py.File(path) as h5:
        return h5["score"][()].tobytes()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A small model that checkpoints every 8 steps (an epoch of the tiny data is 39)."""
    path = tmp_path_factory.mktemp("cfg") / "small.json"
    path.write_text(
        json.dumps(
            {
                "model": {"embed_dim": 8, "attn_hidden": 16, "mlp": [16], "num_negatives": 20, "max_len": 20},
                "train": {"checkpoint_every": 8, "log_every": 4},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def reference_run(tiny_data, config, tmp_path_factory) -> Path:
    """The uninterrupted run that interrupted ones must reproduce byte for byte."""
    cwd = tmp_path_factory.mktemp("ref")
    dmrx("train", "--data", tiny_data / "train.h5", "--valid", tiny_data / "valid.h5", "--config", config,
         "--out", "run", *TRAIN, cwd=cwd)  # fmt: skip
    return cwd / "run"


def _checkpoint_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "LATEST").read_text().strip().split("-")[-1])
    except (OSError, ValueError):
        return -1


@pytest.mark.parametrize("after_first_checkpoint", [False, True], ids=["before-checkpoint", "after-checkpoint"])
def test_train_killed_then_resumed_is_identical(after_first_checkpoint, tiny_data, config, reference_run, tmp_path):
    rng = random.Random(11 + after_first_checkpoint)
    run = tmp_path / "run"
    args = ["train", "--data", tiny_data / "train.h5", "--valid", tiny_data / "valid.h5", "--config", config,
            "--out", "run", *TRAIN]  # fmt: skip
    if after_first_checkpoint:
        kill_when(args, tmp_path, lambda: _checkpoint_step(run) > 0, rng.uniform(0, 0.2))
    else:
        kill_when(args, tmp_path, lambda: _checkpoint_step(run) == 0, rng.uniform(0, 0.02))
    assert not (run / "manifest.json").exists(), "the kill came too late to test anything"
    if run.exists():  # the run appeared (with its step-0 checkpoint at least): resume it
        assert _checkpoint_step(run) >= (8 if after_first_checkpoint else 0)
        dmrx("train", "--resume", "--out", "run", cwd=tmp_path)
    else:  # killed before the run existed: nothing was left, so a plain rerun works
        dmrx(*args, cwd=tmp_path)
    assert (run / "model.safetensors").read_bytes() == (reference_run / "model.safetensors").read_bytes()
    assert not (run / "checkpoints").exists()


def test_score_killed_then_resumed_is_identical(tiny_data, tiny_run, tmp_path):
    cand = tiny_data / "candidates.h5"
    dmrx(
        "score", cand, "--model", tiny_run, "--out", "ref.h5", "--chunk-rows", "64", "--batch-size", "64", cwd=tmp_path
    )
    state = tmp_path / ".out.h5.partial" / "state.json"

    def committed() -> bool:
        try:
            return json.loads(state.read_text())["committed_rows"] > 0
        except (OSError, ValueError, KeyError):
            return False

    args = ["score", cand, "--model", tiny_run, "--out", "out.h5", "--chunk-rows", "64", "--batch-size", "64"]
    kill_when(args, tmp_path, committed, random.Random(5).uniform(0, 0.05))
    dmrx(*args, "--resume", cwd=tmp_path)
    assert scores(tmp_path / "out.h5") == scores(tmp_path / "ref.h5")
    assert not state.parent.exists()


def test_index_build_killed_then_rerun_is_identical(tiny_run, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(tiny_run, ref)
    shutil.copytree(tiny_run, run)
    dmrx("index", "build", ref, cwd=tmp_path)
    kill_when(["index", "build", run], tmp_path, lambda: False, random.Random(3).uniform(2.0, 4.0))
    dmrx("index", "build", run, cwd=tmp_path)
    for f in (ref / "index").glob("*.npy"):
        assert (run / "index" / f.name).read_bytes() == f.read_bytes(), f.name


def test_export_killed_then_rerun_completes(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    kill_when(["export", run], tmp_path, lambda: False, random.Random(4).uniform(2.5, 5.0))
    assert not (run / "export").exists() or (run / "export" / "manifest.json").exists()  # all or nothing
    dmrx("export", run, "--force", cwd=tmp_path)
    from dmrx.runtime import export_bundle

    export_bundle.read(run / "export")
    assert (run / "export" / "ranking.onnx").stat().st_size > 0


# ---- a full disk under every writer -------------------------------------------------------------------
def test_full_disk_data_synthetic(tmp_path):
    before = tree(tmp_path)
    res = dmrx("data", "synthetic", "--out", "d", "--n-users", "100", "--n-items", "600", cwd=tmp_path,
               limit=100_000, check=False)  # fmt: skip
    one_line_error(res, "d/train.h5", "File too large")
    assert tree(tmp_path) - before <= {"d"} and not any((tmp_path / "d").iterdir())


def test_full_disk_data_csv(tmp_path):
    def row(u: int, i: int) -> str:
        hist_items = "^".join(str(100 + j) for j in range(i % 9))
        hist_cates = "^".join(str(j % 7) for j in range(i % 9))
        return f"{u},{100 + i},{i % 7},{hist_items},{hist_cates},{i % 2}"

    rows = ["user_id,item_id,cate_id,hist_item_id,hist_cate_id,label"]
    rows += [row(u, i) for u in range(200) for i in range(20)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    before = tree(tmp_path)
    res = dmrx("data", "csv", "t.csv", "o.h5", cwd=tmp_path, limit=20_000, check=False)
    one_line_error(res, "o.h5", "File too large")
    assert tree(tmp_path) == before


def test_full_disk_train_then_resume(tiny_data, config, reference_run, tmp_path):
    """At the run's creation: nothing left. Mid-run (a checkpoint or the log): the run keeps its last
    checkpoint, and --resume with space again ends identical to an uninterrupted run."""
    args = ["train", "--data", tiny_data / "train.h5", "--valid", tiny_data / "valid.h5", "--config", config,
            "--out", "run", *TRAIN]  # fmt: skip
    res = dmrx(*args, cwd=tmp_path, limit=2_000, check=False)
    one_line_error(res, "run", "File too large")
    assert tree(tmp_path) == set()
    # room for every file of the run's creation (its step-0 checkpoint has no optimiser state yet) but not
    # for the optimiser state of the first checkpoint with progress (Adam's two moments per weight)
    sizes = [(reference_run / f).stat().st_size for f in ("model.safetensors", "vocab.safetensors")]
    res = dmrx(*args, cwd=tmp_path, limit=int(1.3 * max(sizes)), check=False)
    line = one_line_error(res, "File too large", "--resume")
    assert "run" in line and _checkpoint_step(tmp_path / "run") == 0
    dmrx("train", "--resume", "--out", "run", cwd=tmp_path)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (reference_run / "model.safetensors").read_bytes()


def test_full_disk_score_then_resume(tiny_data, tiny_run, tmp_path):
    cand = tiny_data / "candidates.h5"
    dmrx(
        "score", cand, "--model", tiny_run, "--out", "ref.h5", "--chunk-rows", "64", "--batch-size", "64", cwd=tmp_path
    )
    args = ["score", cand, "--model", tiny_run, "--out", "out.h5", "--chunk-rows", "64", "--batch-size", "64"]
    res = dmrx(*args, cwd=tmp_path, limit=2_000, check=False)
    one_line_error(res, "out.h5", "File too large", "--resume")
    assert not (tmp_path / "out.h5").exists()
    dmrx(*args, "--resume", cwd=tmp_path)
    assert scores(tmp_path / "out.h5") == scores(tmp_path / "ref.h5")
    assert not (tmp_path / ".out.h5.partial").exists()


@pytest.mark.parametrize("name", ["top.h5", "top.csv", "top.jsonl"])
def test_full_disk_retrieve_all(name, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    dmrx("index", "build", run, cwd=tmp_path)
    before = tree(tmp_path)
    res = dmrx("retrieve", run, "--all", "--topk", "20", "--out", name, cwd=tmp_path, limit=3_000, check=False)
    one_line_error(res, name, "File too large")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", [["index", "build"], ["export"]])
def test_full_disk_run_outputs(command, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    shutil.rmtree(run / "index", ignore_errors=True)
    before = tree(tmp_path)
    res = dmrx(*command, run, cwd=tmp_path, limit=4_000, check=False)
    one_line_error(res, "cannot write")
    assert tree(tmp_path) == before
