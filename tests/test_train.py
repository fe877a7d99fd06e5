"""Training end to end on tiny data: determinism, resume after a kill, the bundle, evaluate, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmrx.cli.app import app

runner = CliRunner()
TINY = {
    "model": {"embed_dim": 8, "attn_hidden": 16, "mlp": [32, 16], "num_negatives": 50, "max_len": 20},
    # the CPU: bitwise determinism and the two-process gloo run (CUDA's bf16 autocast would change both)
    "train": {"batch_size": 64, "log_every": 5, "checkpoint_every": 7, "patience": 0, "device": "cpu"},
}


def _config(tmp_path: Path, **train) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(train)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def _train(tiny_data, tmp_path, out: Path, *extra, **train):
    args = [
        "train",
        "--data",
        str(tiny_data / "train.h5"),
        "--valid",
        str(tiny_data / "valid.h5"),
        "--config",
        str(_config(tmp_path, **train)),
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    return runner.invoke(app, args)


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_train_writes_a_verified_bundle_and_is_deterministic(tiny_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        res = _train(tiny_data, tmp_path, out, "--epochs", "2", "--seed", "3")
        assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["steps"] > 0 and 0.0 <= summary["best_val_auc"] <= 1.0
    for name in (
        "model.safetensors",
        "vocab.safetensors",
        "config.json",
        "schema.json",
        "metrics.jsonl",
        "summary.json",
        "manifest.json",
    ):
        assert (a / name).exists(), name
    assert not (a / "checkpoints").exists()
    manifest = json.loads((a / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "vocab.safetensors"}
    assert manifest["versions"]["torch"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    log = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_loss" in r and r["aux_loss"] > 0 for r in log)
    assert any("val_auc" in r for r in log)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_data, tmp_path):
    full = tmp_path / "full"
    assert _train(tiny_data, tmp_path, full, "--epochs", "2").exit_code == 0

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "dmrx",
        "train",
        "--data",
        str(tiny_data / "train.h5"),
        "--valid",
        str(tiny_data / "valid.h5"),
        "--config",
        str(_config(tmp_path)),
        "--out",
        str(killed),
        "--epochs",
        "2",
        "--json",
    ]
    # one thread, like this process (conftest): float reductions must run in the same order to compare bits
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    deadline = time.time() + 120
    pointer = killed / "checkpoints" / "LATEST"
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step-000000014":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert not (killed / "manifest.json").exists()
    res = runner.invoke(app, ["train", "--resume", "--out", str(killed), "--json"])
    assert res.exit_code == 0, res.output
    wf, wk = _weights(full), _weights(killed)
    assert all((wf[k] == wk[k]).all() for k in wf)
    assert (
        json.loads((full / "summary.json").read_text())["best_val_auc"]
        == json.loads((killed / "summary.json").read_text())["best_val_auc"]
    )
    steps = [
        json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)
    ]
    assert steps == sorted(set(steps)), "the log repeats steps after resume"


def test_evaluate_reports_metrics(tiny_run, tiny_data):
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--data", str(tiny_data / "test.h5"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    for k in ("auc", "gauc", "gauc_user_mean", "logloss", "rows", "oracle_auc", "mean_r_pos", "mean_r_hat_pos"):
        assert k in m, k
    assert m["oracle_auc"] > 0.6 and 0 < m["logloss"] < 1
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--data", str(tiny_data / "test.h5")])
    assert res.exit_code == 0 and "gauc" in res.output


def test_damaged_bundle_is_refused(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    res = runner.invoke(app, ["evaluate", str(copy), "--data", "x.h5"])
    assert res.exit_code == 2 and "model.safetensors" in res.output and "sha256" in res.output
    assert "Traceback" not in res.output
    (copy / "manifest.json").unlink()
    res = runner.invoke(app, ["evaluate", str(copy)])
    assert res.exit_code == 2 and "manifest.json is missing" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such run" in res.output


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"model": {"beta": -1}}, "beta must be >= 0"),
        ({"model": {"embed_dim": -4}}, "embed_dim must be positive"),
        ({"model": {"colour": 1}}, "unknown model option"),
        ({"model": {"embed_dim": "32"}}, "model option embed_dim must be an integer"),
        ({"train": {"batch_size": 1.5}}, "train option batch_size must be an integer"),
        ({"train": {"lr": 0}}, "lr must be positive"),
        ({"optimiser": {}}, "unknown section"),
    ],
)
def test_bad_config_is_one_line_error(tiny_data, tmp_path, cfg, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", str(tiny_data / "train.h5"), "--config", str(path), "--out", str(out)])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_data_without_the_models_fields_is_refused(tiny_run, tmp_path):
    from dmrx.data.format import write_dataset

    other = tmp_path / "other.h5"
    write_dataset(
        other, {"item": [1, 2]}, [2], {"seq": [0], "end": [2], "user": [1], "label": [1], "target": {"item": [3]}}
    )
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--data", str(other)])
    assert res.exit_code == 2 and str(other) in res.output and "behaviors/cate" in res.output
