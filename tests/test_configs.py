"""Configs: the shipped files load, bad values are one-line errors naming file and option, and runs saved
with an older config layout load as they were trained (dmrx.models.migrations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dmrx.artifacts.atomic import write_json
from dmrx.errors import DmrxError
from dmrx.models.dmr import DMRConfig
from dmrx.models.migrations import CONFIG_VERSION, migrate
from dmrx.training.trainer import TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.json"))


def test_configs_are_shipped_with_distinct_names():
    names = [p.stem for p in SHIPPED]
    assert len(names) >= 16 and len(set(names)) == len(names)  # benchmarks/quality.py names variants by file
    assert {"dmr", "lr", "din", "no_position", "shared_double", "dmr_sigmoid_ns"} <= set(names)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path):
    model_cfg, train_cfg = load_config(path, {})
    # the file's options, nothing else: all the rest are the defaults
    overrides = json.loads(path.read_text())["model"]
    assert model_cfg == DMRConfig(**overrides)
    assert train_cfg == TrainConfig()


@pytest.mark.parametrize(
    "cfg, key, message",
    [
        ({"model": {"embed_dim": "32"}}, "embed_dim", "must be an integer, got '32'"),
        ({"train": {"batch_size": 1.5}}, "batch_size", "must be an integer, got 1.5"),
        ({"model": {"use_u2i": 1}}, "use_u2i", "must be true or false"),
        ({"model": {"max_len": True}}, "max_len", "must be an integer"),
        ({"model": {"mlp": [64, "32"]}}, "mlp", "entry must be an integer"),
        ({"model": {"mlp": 64}}, "mlp", "must be a list"),
        ({"model": {"attention": 2}}, "attention", "must be a string"),
        ({"train": {"lr": "fast"}}, "lr", "must be a number"),
        ({"model": {"attn_hidden": 0}}, "attn_hidden", "must be positive"),
        ({"model": {"beta": float("nan")}}, "beta", "must be >= 0"),
        ({"train": {"epochs": 0}}, "epochs", "must be positive"),
        ({"model": {"colour": 1}}, "colour", "unknown model option"),
        ({"model": [1, 2]}, "model", "must be a table"),
    ],
)
def test_a_bad_value_names_the_file_and_the_option(tmp_path, cfg, key, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(DmrxError) as e:
        load_config(path, {})
    text = str(e.value)
    assert text.startswith(f"{path}: ") and key in text and message in text and "\n" not in text


def test_ints_serve_for_floats_and_flags_override_the_file(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"model": {"beta": 0, "attn_hidden": None}, "train": {"lr": 1, "epochs": 3}}))
    model_cfg, train_cfg = load_config(path, {"epochs": 5, "seed": None})
    assert model_cfg.beta == 0.0 and model_cfg.attn_hidden_size == 64
    assert train_cfg.lr == 1.0 and train_cfg.epochs == 5


def test_the_din_unit_takes_attn_hidden():
    from dmrx.models.baselines import DIN
    from dmrx.models.dmr import DMR
    from tests.test_model import SIZES, _batch, _spec

    dmr = DMR(
        DMRConfig(embed_dim=8, mlp=(16,), max_len=12, num_negatives=10, attention="din", attn_hidden=24), _spec(), SIZES
    )
    assert (dmr.att_i2i.l1.out_features, dmr.att_i2i.l2.out_features) == (24, 12)
    assert dmr(_batch())["logit"].shape == (6,)
    default = DMR(DMRConfig(embed_dim=8, mlp=(16,), max_len=12, attention="din"), _spec(), SIZES)
    assert (default.att_u2i.l1.out_features, default.att_u2i.l2.out_features) == (80, 40)  # the authors' size
    din = DIN(DMRConfig(model="din", embed_dim=8, mlp=(16,), max_len=12, attn_hidden=24), _spec(), SIZES)
    assert din.unit[0].out_features == 24
    assert DMRConfig(model="din").to_json()["attn_hidden"] == 80  # a run records the width it was built with


# ---- saved runs from older versions ------------------------------------------------------------------------
def test_migrate_fills_what_older_runs_were_trained_with_and_refuses_newer_ones():
    v1 = {"model": {"model": "din", "attn_hidden": 64}, "train": {"lr": 0.01}}
    out = migrate(v1)
    assert out["config_version"] == CONFIG_VERSION and "config_version" not in v1  # the input is left alone
    assert out["model"] == {"model": "din", "attn_hidden": 80, "target_product": False, "mlp_batchnorm": False}
    assert out["train"] == {"lr": 0.01, "sparse_lr": 0.0}
    assert migrate(out) == out  # a current config passes through
    current = {"config_version": CONFIG_VERSION, "model": {"attention": "din", "attn_hidden": 16}, "train": {}}
    assert migrate(current) == current
    with pytest.raises(DmrxError, match="newer than this dmrx reads"):
        migrate({"config_version": CONFIG_VERSION + 1, "model": {}})


def _tiny_run(tiny_data, run: Path, **model) -> None:
    from dmrx.training.trainer import train

    cfg = DMRConfig(**{"embed_dim": 8, "attn_hidden": 16, "mlp": (16,), "num_negatives": 20, "max_len": 20, **model})
    train(tiny_data / "train.h5", None, run, cfg, TrainConfig(epochs=1, batch_size=128, max_steps=6, sparse_lr=0.0))


def _predictions(run: Path, tiny_data) -> tuple[DMRConfig, dict[str, np.ndarray]]:
    from dmrx.data.reader import DataFile
    from dmrx.evaluation.predict import predict
    from dmrx.models import bundle

    b = bundle.load(run)
    with DataFile(tiny_data / "valid.h5") as f:
        return b.model.cfg, predict(b.model, b.encoder(), f)


def _as_version_1(model: dict, train: dict, drop: tuple[str, ...] = (), din_hidden: int | None = None) -> None:
    """The config as dmrx wrote it before config_version existed (and before the dropped options did)."""
    for key in drop:
        model.pop(key, None)
        train.pop(key, None)
    if din_hidden is not None:  # the DIN unit ignored attn_hidden; the config held whatever was set
        model["attn_hidden"] = din_hidden


@pytest.mark.parametrize(
    "model, drop, din_hidden",
    [
        ({}, (), None),  # a run as dmrx saved it before config_version was recorded
        ({"target_product": False, "mlp_batchnorm": False}, ("target_product", "mlp_batchnorm", "sparse_lr"), None),
        ({"attention": "din", "attn_hidden": 80}, (), 16),
        ({"model": "din", "attn_hidden": 80}, (), 64),
    ],
    ids=["unversioned", "before-options", "din-attention", "din-baseline"],
)
def test_a_run_saved_by_an_older_version_loads_with_identical_predictions(
    tiny_data, tmp_path, monkeypatch, model, drop, din_hidden
):
    from dmrx.models import bundle

    monkeypatch.chdir(tmp_path)  # training marks ./runs/LATEST
    run = tmp_path / "run"
    _tiny_run(tiny_data, run, **model)
    cfg, before = _predictions(run, tiny_data)
    saved = json.loads((run / "config.json").read_text())
    assert saved["config_version"] == CONFIG_VERSION
    del saved["config_version"]
    _as_version_1(saved["model"], saved["train"], drop, din_hidden)
    write_json(run / "config.json", saved)
    bundle.write_manifest(run)  # the old run's manifest hashes its config as it is
    if drop or din_hidden:  # read as it stands, the old config would build another model
        assert DMRConfig.from_json(saved["model"]) != cfg
    old_cfg, after = _predictions(run, tiny_data)
    assert old_cfg == cfg
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_a_damaged_saved_config_names_the_run_file(tiny_run, tmp_path):
    import shutil

    from dmrx.models import bundle

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["embed_dim"] = "8"
    write_json(run / "config.json", saved)
    bundle.write_manifest(run)
    with pytest.raises(DmrxError, match=r"config\.json: model option embed_dim must be an integer"):
        bundle.load(run)
