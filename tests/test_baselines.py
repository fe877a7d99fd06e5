"""Baselines (LR, Wide&Deep, PNN, DIN, DIEN): the same embedding conventions as DMR, trained by the same
trainer, reloaded from their bundles, and invariant to left padding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.data.features import Encoder, declare, fit
from dmrx.data.reader import DataFile
from dmrx.evaluation.predict import predict, to_tensors
from dmrx.models import bundle
from dmrx.models.baselines import BASELINES, CROSS_BUCKETS, LR, shared_fields
from dmrx.models.dmr import DMRConfig
from dmrx.training.trainer import TrainConfig, _optimizers, train

runner = CliRunner()
SMALL = {"embed_dim": 8, "mlp": (32, 16), "max_len": 20, "num_negatives": 50}


@pytest.fixture(scope="module")
def parts(tiny_data):
    """(spec, vocabs, one encoded test batch of 64 rows as tensors)."""
    with DataFile(tiny_data / "train.h5") as data:
        spec = declare(data.fields, "item", True)
        vocabs, _ = fit(spec, data)
    enc = Encoder(spec, vocabs)
    with DataFile(tiny_data / "test.h5") as data:
        batch = next(
            iter(
                data.batches(
                    64,
                    20,
                    encoder=enc,
                    keys=["seq", "end", "label"] + spec.batch_keys(),
                    behavior_fields=spec.behaviors,
                )
            )
        )
        batch = to_tensors(enc.finish(batch))
    return spec, vocabs, batch


@pytest.mark.parametrize("name", BASELINES)
def test_conventions_sparse_shared_tables(name, parts):
    spec, vocabs, batch = parts
    model = bundle.build_model(DMRConfig(model=name, **SMALL), spec, vocabs)
    assert model.cfg.model == name and model.spec is spec
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(m.sparse for m in embeddings)
    if name != "lr":  # deep models: one table per spec table, in sorted order; hist/item and target/item share
        assert list(model.tables) == sorted(spec.tables)
        assert spec.table_of()["hist/item"] == spec.table_of()["target/item"]
    dense_opt, sparse_opt = _optimizers(model, 1e-3)
    n_sparse = sum(len(g["params"]) for g in sparse_opt.param_groups)
    assert n_sparse == len(embeddings)
    out = model(batch)
    assert out["logit"].shape == (64,) and torch.isfinite(out["logit"]).all()


@pytest.mark.parametrize("name", BASELINES)
def test_left_padding_and_empty_histories(name, parts):
    """More left padding changes nothing; a row without behaviours still scores finitely."""
    spec, vocabs, batch = parts
    torch.manual_seed(0)
    model = bundle.build_model(DMRConfig(model=name, **SMALL), spec, vocabs).eval()
    padded = dict(batch)
    for f in spec.behaviors:
        h = batch[f"hist/{f}"]
        padded[f"hist/{f}"] = torch.cat([torch.zeros(len(h), 7, dtype=h.dtype), h], dim=1)
    empty = dict(batch)
    empty["hist_len"] = torch.zeros_like(batch["hist_len"])
    for f in spec.behaviors:
        empty[f"hist/{f}"] = torch.zeros_like(batch[f"hist/{f}"])
    with torch.no_grad():
        a, b, c = model(batch)["logit"], model(padded)["logit"], model(empty)["logit"]
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.isfinite(c).all()


def test_lr_cross_buckets(parts):
    spec, _, _ = parts
    assert set(shared_fields(spec)) == {"item", "cate", "brand"}  # btag is behaviour-only
    target = torch.tensor([5, 0, 7])
    hist = torch.tensor([[0, 3, 4], [0, 3, 4], [9, 0, 2**40]])
    mask = torch.tensor([[False, True, True], [True, True, True], [True, True, True]])
    idx = LR.cross_index(target, hist, mask)
    assert idx[0, 0] == 0 and idx[1].eq(0).all()  # padding, unknown target
    assert idx[2, 1] == 0 and idx[2, 2] > 0  # unknown behaviour; a huge id still lands in range
    assert (idx >= 0).all() and (idx < CROSS_BUCKETS).all()
    assert idx[0, 1] != idx[0, 2]


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_trains_and_bundle_reloads(name, tiny_data, tmp_path):
    run = tmp_path / name
    summary = train(
        tiny_data / "train.h5",
        tiny_data / "valid.h5",
        run,
        DMRConfig(model=name, **SMALL),
        TrainConfig(epochs=1, batch_size=64, max_steps=24, log_every=4, lr=0.01),
    )
    assert summary["steps"] == 24 and summary["aux_loss"] is False
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0]  # from ~0.69 towards the click rate's entropy
    assert all(r["aux_loss"] == 0.0 for r in log if "loss" in r)
    preds = []
    for seed in (1, 2):  # a fresh model under another seed: everything that matters is in the bundle
        torch.manual_seed(seed)
        b = bundle.load(run)
        assert b.model.cfg.model == name
        assert set(load_file(str(run / "model.safetensors"))) == set(b.model.state_dict())
        with DataFile(tiny_data / "test.h5") as f:
            preds.append(predict(b.model, b.encoder(), f, batch_size=100)["prob"])
    assert np.isfinite(preds[0]).all() and ((preds[0] > 0) & (preds[0] < 1)).all()
    assert np.array_equal(preds[0], preds[1])


def test_cli_train_with_config_and_evaluate(tiny_data, tmp_path):
    cfg = tmp_path / "din.json"
    cfg.write_text(
        json.dumps(
            {
                "model": {"model": "din", **SMALL, "mlp": [32, 16]},
                "train": {"batch_size": 64, "max_steps": 12, "log_every": 4},
            }
        )
    )
    out = tmp_path / "din"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data / "train.h5"),
            "--valid",
            str(tiny_data / "valid.h5"),
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["model"]["model"] == "din"
    res = runner.invoke(app, ["evaluate", str(out), "--data", str(tiny_data / "test.h5"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert 0.0 <= m["auc"] <= 1.0 and "mean_r_pos" not in m


def test_unknown_model_is_one_line_error(tiny_data, tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"model": {"model": "xdeepfm"}}))
    res = runner.invoke(
        app, ["train", "--data", str(tiny_data / "train.h5"), "--config", str(cfg), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "xdeepfm" in res.output and "Traceback" not in res.output
