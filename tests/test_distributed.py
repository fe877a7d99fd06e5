"""Two gloo processes under torchrun train like one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

from tests.test_train import _config


def _run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def test_two_gloo_ranks_match_one_process(tiny_data, tmp_path):
    cfg = _config(tmp_path, batch_size=128)
    args = [
        "train",
        "--data",
        str(tiny_data / "train.h5"),
        "--valid",
        str(tiny_data / "valid.h5"),
        "--config",
        str(cfg),
        "--epochs",
        "2",
        "--json",
    ]
    _run([sys.executable, "-m", "dmrx", *args, "--out", str(tmp_path / "single")], tmp_path)
    _run(
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
    )
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
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
