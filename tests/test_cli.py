"""Contracts every command keeps: choices refused by the parser, renamed options' old names, strict JSON,
tables that survive a pipe, export --force."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.cli.common import kv_table, print_json, print_table

runner = CliRunner()
TINY = {
    "model": {"embed_dim": 8, "attn_hidden": 16, "mlp": [32, 16], "num_negatives": 50, "max_len": 20},
    "train": {"batch_size": 64, "max_steps": 6, "log_every": 2, "patience": 0},
}


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as a strict JSON parser does."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "args, option",
    [
        (["score", "c.h5", "--backend", "tensorflow"], "--backend"),
        (["score", "c.h5", "--precision", "fp64"], "--precision"),
        (["score", "c.h5", "--device", "tpu"], "--device"),
        (["train", "--arch", "transformer"], "--arch"),
        (["train", "--model", "transformer"], "--model"),
        (["train", "--device", "tpu"], "--device"),
        (["retrieve", "--user", "1", "--search", "ivf"], "--search"),
        (["retrieve", "--user", "1", "--format", "xml"], "--format"),
        (["retrieve", "--eval", "--backend", "tensorrt"], "--backend"),
        (["index", "build", "--ann", "ivf"], "--ann"),
        (["export", "--engine", "openvino"], "--engine"),
        (["export", "--calib-method", "median"], "--calib-method"),
    ],
)
def test_bad_choice_is_a_usage_error_before_any_work(args, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no run, no data: any work started would fail differently
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"Invalid value for '{option}'" in text and "Traceback" not in text
    assert list(tmp_path.iterdir()) == []


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.mark.parametrize("option", ["--arch", "--model"])
def test_train_kind_by_arch_and_by_its_old_name(option, tiny_data, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data / "train.h5"),
            "--config",
            str(_config(tmp_path)),
            "--out",
            str(out),
            option,
            "lr",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["model"]["model"] == "lr"
    assert ("--model is now --arch" in " ".join(res.stderr.split())) == (option == "--model")
    assert strict_loads(res.stdout)["run"] == str(out)


def test_train_refuses_both_names_of_the_kind(tiny_data, tmp_path):
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data / "train.h5"),
            "--out",
            str(tmp_path / "r"),
            "--arch",
            "lr",
            "--model",
            "din",
        ],
    )
    assert res.exit_code == 2 and "--arch" in res.output
    assert not (tmp_path / "r").exists()


def test_renamed_data_options_keep_their_old_names(tmp_path):
    res = runner.invoke(app, ["data", "synthetic", "--out", str(tmp_path), "--users", "40", "--items", "700", "--json"])
    assert res.exit_code == 0, res.output
    assert "--users is now --n-users" in " ".join(res.stderr.split())
    with h5py.File(tmp_path / "train.h5") as f:
        assert len(np.unique(f["examples/user"][:])) <= 40


def test_print_json_is_strict_and_null_for_undefined_numbers(capsys):
    print_json(
        {
            "auc": float("nan"),
            "x": [np.float32("inf"), np.float64(-np.inf), np.int64(3)],
            "nested": {"a": (np.array([1.5, np.nan]),), "ok": np.bool_(True)},
            "path": Path("a/b"),
        }
    )
    out = strict_loads(capsys.readouterr().out)
    assert out == {"auc": None, "x": [None, None, 3], "nested": {"a": [[1.5, None]], "ok": True}, "path": "a/b"}


def test_evaluate_without_positives_prints_null_auc(tiny_run, tiny_data, tmp_path):
    data = tmp_path / "negatives.h5"
    shutil.copyfile(tiny_data / "test.h5", data)
    with h5py.File(data, "r+") as f:
        f["examples/label"][...] = 0
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    metrics = strict_loads(res.stdout)
    assert metrics["auc"] is None  # undefined without positives: null, not NaN
    assert math.isfinite(metrics["logloss"])


def test_evaluate_defaults_to_the_runs_test_file_from_any_directory(tiny_run, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no test.h5 here: the run's own, beside its training file, is used
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--json"])
    assert res.exit_code == 0, res.output
    metrics = strict_loads(res.stdout)
    assert Path(metrics["data"]) == tiny_data / "test.h5" and 0.0 <= metrics["auc"] <= 1.0
    given = strict_loads(runner.invoke(app, ["evaluate", str(tiny_run), "--data", metrics["data"], "--json"]).stdout)
    assert given == metrics


def test_piped_table_prints_long_numbers_whole(tiny_data, tmp_path):
    data = tmp_path / "d.h5"
    shutil.copyfile(tiny_data / "test.h5", data)
    long_number = "0.78412345678901234567" * 8
    with h5py.File(data, "r+") as f:
        f.attrs["note"] = long_number
    res = runner.invoke(app, ["data", "info", str(data)])  # CliRunner's stdout is no terminal, like a pipe
    assert res.exit_code == 0, res.output
    assert long_number in res.stdout and "…" not in res.stdout


def test_narrow_terminal_folds_numbers_instead_of_cutting_them():
    buf = io.StringIO()
    narrow = Console(file=buf, width=30, force_terminal=True, color_system=None)
    value = 0.78412345678901234567
    table = kv_table("t", {"a rather long metric name": value, "rows": 123456789012345})
    print_table(table, to=narrow)
    text = buf.getvalue()
    assert "…" not in text
    assert re.sub(r"[\s│]", "", text).count("123456789012345") == 1  # folded onto two lines, whole


def test_print_table_leaves_a_plain_table_whole_in_a_pipe(capsys):
    table = Table("k", "v")
    table.add_row("x" * 150, "9" * 150)
    print_table(table)  # pytest's captured stdout is a pipe
    out = capsys.readouterr().out
    assert "9" * 150 in out and "x" * 150 in out


@pytest.mark.slow
def test_export_force_replaces_an_existing_export(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export", "index"))
    out = run / "export"
    assert runner.invoke(app, ["export", str(run), "--json"]).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    (out / "stale").write_text("from the first export")
    res = runner.invoke(app, ["export", str(run)])
    assert res.exit_code == 2 and "--force" in res.output  # says how to replace it
    assert (out / "stale").exists()
    res = runner.invoke(app, ["export", str(run), "--force", "--json"])
    assert res.exit_code == 0, res.output
    second = strict_loads(res.stdout)
    assert not (out / "stale").exists() and (out / "manifest.json").exists()
    assert second["artifacts"].keys() == first["artifacts"].keys()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".export")) == []  # no temporaries left


def test_export_force_never_replaces_the_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export", "index"))
    res = runner.invoke(app, ["export", str(run), "--out", str(run), "--force"])
    assert res.exit_code == 2 and "would replace the run" in res.output
    assert (run / "model.safetensors").exists()
