"""`dmrx report`: every figure is written and is a real picture, index.html shows them, bad input is one line."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.evaluation.report import reliability, roc_curve

pytest.importorskip("matplotlib")
runner = CliRunner()
ALL = ["fig2_relevance.png", "fig3_learning_curves.png", "fig4_i2i_position.png", "roc.png", "calibration.png"]


@pytest.fixture
def dmr_run(tiny_run, tmp_path):
    """A private copy of the session's tiny DMR run (the report writes into the run directory)."""
    run = tmp_path / "dmr"
    shutil.copytree(tiny_run, run)
    return run


def _strict_json(text: str):
    def no_nan(c):
        raise AssertionError(f"non-finite number {c} in JSON")

    return json.loads(text, parse_constant=no_nan)


def _is_picture(path) -> None:
    from matplotlib.image import imread

    assert path.stat().st_size > 8_000, path
    img = imread(str(path))[..., :3]
    assert img.ndim == 3 and min(img.shape[:2]) > 200
    assert float(img.var()) > 1e-3, f"{path} is (nearly) a single colour"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, path


def test_report_writes_every_figure_and_the_page(dmr_run):
    res = runner.invoke(app, ["report", str(dmr_run), "--json"])
    assert res.exit_code == 0, res.output
    out = _strict_json(res.output)
    assert out["figures"] == ALL and out["skipped"] == {}
    report = dmr_run / "report"
    for name in ALL:
        _is_picture(report / name)
    page = (report / "index.html").read_text()
    for name in ALL:
        assert f'src="{name}"' in page
    assert "auc" in page and "best_val_auc" in page and "test.h5" in page
    metrics = _strict_json((report / "metrics.json").read_text())
    assert {"mean_r_pos", "mean_r_neg", "mean_r_hat_pos", "mean_r_hat_neg", "ece"} <= set(metrics["test"])
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    assert not [p for p in dmr_run.iterdir() if p.name.startswith(".report")]  # no temporary left behind

    # again, on named data: the report is replaced whole
    (report / "stale.txt").write_text("x")
    res = runner.invoke(app, ["report", str(dmr_run), "--data", str(_train_dir(dmr_run) / "valid.h5")])
    assert res.exit_code == 0, res.output
    assert not (report / "stale.txt").exists() and "valid.h5" in (report / "index.html").read_text()


def _train_dir(run):
    from pathlib import Path

    return Path(json.loads((run / "config.json").read_text())["data"]["train"]).parent


def test_report_of_a_baseline_skips_what_it_lacks(tiny_data, tmp_path):
    from dmrx.models.dmr import DMRConfig
    from dmrx.training.trainer import TrainConfig, train

    run = tmp_path / "lr"
    train(
        tiny_data / "train.h5",
        tiny_data / "valid.h5",
        run,
        DMRConfig(model="lr", max_len=20),
        TrainConfig(epochs=1, batch_size=64, max_steps=10, log_every=2, lr=0.01),
    )
    res = runner.invoke(app, ["report", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = _strict_json(res.output)
    assert out["figures"] == ["fig3_learning_curves.png", "roc.png", "calibration.png"]
    assert set(out["skipped"]) == {"fig2_relevance.png", "fig4_i2i_position.png"}
    for name in out["figures"]:
        _is_picture(run / "report" / name)
    assert "Not drawn" in (run / "report" / "index.html").read_text()


def test_bad_input_is_one_line(dmr_run, tmp_path, monkeypatch):
    res = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such run directory" in res.output and "Traceback" not in res.output

    res = runner.invoke(app, ["report", str(dmr_run), "--data", str(_train_dir(dmr_run) / "candidates.h5")])
    assert res.exit_code == 2 and "label" in res.output and not (dmr_run / "report").exists()

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = runner.invoke(app, ["report", str(dmr_run)])
    assert res.exit_code == 2 and "matplotlib" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_missing_test_file_names_the_option(dmr_run, tmp_path):
    from dmrx.errors import DmrxError
    from dmrx.models import bundle

    b = bundle.load(dmr_run)
    b.config["data"]["train"] = str(tmp_path / "train.h5")  # moved away: no test.h5 beside it
    with pytest.raises(DmrxError, match="--data"):  # the default report data
        bundle.run_data(b.path, "test.h5", config=b.config)


def test_a_failed_drawing_leaves_no_partial_report(dmr_run, monkeypatch):
    from dmrx.evaluation import report

    def broken(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "_fig_calibration", broken)
    with pytest.raises(RuntimeError):
        report.build_report(dmr_run)
    assert not (dmr_run / "report").exists()
    assert not [p for p in dmr_run.iterdir() if p.name.startswith(".report")]


def test_roc_and_reliability_helpers():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.1
    s = np.where(y, rng.normal(1, 1, 2000), rng.normal(0, 1, 2000)).round(1)  # ties included
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    from dmrx.evaluation.metrics import auc

    assert abs(np.trapezoid(tpr, fpr) - auc(y, s)) < 1e-9  # ties: the trapezoid is the average-rank AUC
    p = rng.random(5000) * 0.2
    rel = reliability(rng.random(5000) < p, p, 10)
    assert len(rel["pred"]) == 10 and rel["n"].sum() == 5000 and rel["ece"] < 0.03
