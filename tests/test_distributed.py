"""Two gloo processes under torchrun train like one process with the same global batch.

The runs name the CPU (tests.test_train's config says device "cpu"; conftest hides CUDA from the processes):
on a one-GPU machine auto-selection would otherwise ask the second rank for cuda:1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dmrx.errors import DmrxError
from tests.test_train import _config


def _run(cmd, cwd, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _single_and_two_ranks(tiny_data, tmp_path, batch_size: int, epochs: int, timeout: int = 600):
    cfg = _config(tmp_path, batch_size=batch_size)
    args = [
        "train",
        "--data",
        str(tiny_data / "train.h5"),
        "--valid",
        str(tiny_data / "valid.h5"),
        "--config",
        str(cfg),
        "--epochs",
        str(epochs),
        "--json",
    ]
    _run([sys.executable, "-m", "dmrx", *args, "--out", str(tmp_path / "single")], tmp_path, timeout)
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "dmrx",
            *args,
            "--out",
            str(tmp_path / "ddp"),
        ],
        tmp_path,
        timeout,
    )


def test_two_gloo_ranks_match_one_process(tiny_data, tmp_path):
    res = _single_and_two_ranks(tiny_data, tmp_path, batch_size=128, epochs=2)
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert json.loads(res.stdout) == {**ddp, "run": str(tmp_path / "ddp")}  # rank 0 alone prints, one document
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"] and ddp["examples"] == single["examples"]
    assert abs(ddp["best_val_auc"] - single["best_val_auc"]) <= 0.01
    # the bundle is written once, by rank 0: one log line per logged step, a verified manifest
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert steps == sorted(set(steps))
    from dmrx.models import bundle

    bundle.verify(tmp_path / "ddp")
    # the same global batches and negatives: weights agree up to float rounding
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def test_a_last_batch_smaller_than_the_ranks_neither_hangs_nor_diverges(tiny_data, tmp_path):
    """The last global batch has one row: rank 0's slice is empty. It must still join the global batch
    norm's all-reduces and the gradient averaging, in the same order as rank 1 (else gloo hangs or pairs
    mismatched collectives), and a one-row global batch normalises as one process does."""
    from dmrx.data.reader import DataFile

    with DataFile(tiny_data / "train.h5") as f:
        n = f.n_rows
    batch_size = next(b for b in range(64, n) if n % b == 1)  # a few large batches, then one row
    _single_and_two_ranks(tiny_data, tmp_path, batch_size=batch_size, epochs=1, timeout=300)
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["steps"] == single["steps"] == -(-n // batch_size) and ddp["examples"] == single["examples"] == n
    assert abs(ddp["best_val_auc"] - single["best_val_auc"]) <= 0.01
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    # the one-row batch took the running statistics, as in one process, and did not update them
    assert int(a["input_norm.num_batches_tracked"]) == int(b["input_norm.num_batches_tracked"]) == n // batch_size
    for k in ("input_norm.running_mean", "input_norm.running_var"):
        assert float((a[k] - b[k]).abs().max()) < 1e-3, k
    # Adam's first steps move a row by about the learning rate whatever its gradient's size, so the
    # rounding differences of a split batch show in rarely seen embedding rows at a few 1e-3
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-2


_CLOSE = """
import os, torch
from dmrx.training.distributed import setup

d = setup(torch.device("cpu"))
import torch._dynamo  # what the first optimizer step imports, after the group exists
d.close()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(n for n in names if "gloo" in n))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_close_leaves_no_gloo_threads(tmp_path):
    """Gloo threads that outlive the group die with the interpreter, which now and then aborts a run
    that has finished and written its bundle (SIGABRT at exit, torchrun reports the job failed)."""
    script = tmp_path / "close.py"
    script.write_text(_CLOSE)
    res = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)], tmp_path
    )
    assert res.stdout.split() == ["[]", "[]"]


def test_more_ranks_than_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    from dmrx.training.distributed import setup

    with pytest.raises(DmrxError, match=r"LOCAL_RANK=\d+ but this machine has \d+ CUDA device"):
        setup(torch.device("cuda"))
