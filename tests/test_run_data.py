"""The run's own data (bundle.run_data): which file each command takes by default, and one error naming the
option to pass when it is not there."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.errors import DmrxError
from dmrx.models import bundle
from dmrx.models.bundle import run_data

runner = CliRunner()


def _run_dir(tmp_path, train, valid):
    """A directory holding only the config.json that training writes (all run_data reads)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"data": {"train": str(train) if train else None, "valid": str(valid) if valid else None}})
    )
    return run


@pytest.fixture
def split(tmp_path):
    """train.h5, valid.h5 and test.h5 in one directory (empty files: run_data only looks for them)."""
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.h5", "valid.h5", "test.h5"):
        (d / name).touch()
    return d


def test_each_role_and_the_first_that_exists(tmp_path, split):
    other = tmp_path / "elsewhere.h5"
    other.touch()
    run = _run_dir(tmp_path, split / "train.h5", other)
    assert run_data(run, "train") == split / "train.h5"
    assert run_data(run, "valid") == other  # the recorded validation file, not valid.h5 beside train
    assert run_data(run, "valid.h5") == split / "valid.h5"
    assert run_data(run, "test.h5") == split / "test.h5"
    assert run_data(run, "valid", "test.h5") == other
    other.unlink()
    assert run_data(run, "valid", "test.h5") == split / "test.h5"  # the next role when one is gone
    config = json.loads((run / "config.json").read_text())
    assert run_data(tmp_path / "not-read", "train", config=config) == split / "train.h5"  # a loaded config
    with pytest.raises(ValueError, match="unknown data role"):
        run_data(run, "test")


def test_a_run_without_validation_file_has_none(tmp_path, split):
    run = _run_dir(tmp_path, split / "train.h5", None)
    assert run_data(run, "valid") is None
    assert run_data(run, "valid", "test.h5") == split / "test.h5"


@pytest.mark.parametrize("option", ["--data", "--eval-data", "--calib-data"])
def test_every_missing_file_names_itself_and_the_option(tmp_path, option):
    gone = tmp_path / "moved"
    run = _run_dir(tmp_path, gone / "train.h5", gone / "v.h5")
    for roles, files in (
        (("train",), ["train.h5"]),
        (("valid",), ["v.h5"]),
        (("test.h5",), ["test.h5"]),
        (("valid", "valid.h5", "test.h5"), ["v.h5", "valid.h5", "test.h5"]),
    ):
        with pytest.raises(DmrxError) as e:
            run_data(run, *roles, option=option)
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith(f"pass the data with {option}")
        assert all(str(gone / f) in msg for f in files), msg
        assert run_data(run, *roles, option=option, missing_ok=True) is None


def test_a_run_that_records_no_training_file(tmp_path):
    run = _run_dir(tmp_path, None, None)
    with pytest.raises(DmrxError, match=r"config.json records no training file; pass the data with --data"):
        run_data(run, "train")
    with pytest.raises(DmrxError, match="records no training file; pass the data with --eval-data"):
        run_data(run, "valid", "test.h5", option="--eval-data")
    assert run_data(run, "test.h5", missing_ok=True) is None
    (run / "config.json").unlink()
    with pytest.raises(DmrxError, match="config.json: missing.*--data"):
        run_data(run, "train")
    (run / "config.json").write_text("{not json")
    with pytest.raises(DmrxError, match="config.json: damaged.*--calib-data"):
        run_data(run, "train", option="--calib-data")


@pytest.fixture
def moved_run(tiny_run, tmp_path):
    """A copy of the tiny run whose training and validation files have moved away."""
    run = tmp_path / "moved-run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    config["data"] = {"train": str(tmp_path / "gone" / "train.h5"), "valid": str(tmp_path / "gone" / "valid.h5")}
    (run / "config.json").write_text(json.dumps(config))
    bundle.write_manifest(run)  # config.json changed: hash it again so the run still loads
    return run


@pytest.mark.parametrize(
    "args, option",
    [
        (["report"], "--data"),
        (["index", "build"], "--data"),
        (["export", "--fp16"], "--eval-data"),
        (["export", "--int8", "--eval-data", "{test}"], "--calib-data"),
        (["train", "--resume", "--out"], "--data"),
    ],
)
def test_commands_name_their_option_when_the_run_data_moved(moved_run, tiny_data, args, option):
    args = [a.format(test=tiny_data / "test.h5") for a in args]
    if args[0] == "train":  # make it an interrupted run: a finished one is refused before its data is looked for
        (moved_run / "checkpoints").mkdir()
        (moved_run / "checkpoints" / "LATEST").write_text("step-000000000\n")
    res = runner.invoke(app, [*args, str(moved_run)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "gone" in res.output and f"pass the data with {option}" in res.output
    assert not (moved_run / "export").exists() and not (moved_run / "report").exists()
