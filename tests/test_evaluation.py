"""The inference loop over a data file (predict) with its per-slot attention sums, and the relevance means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmrx.data.reader import DataFile
from dmrx.evaluation.metrics import relevance_means
from dmrx.evaluation.predict import predict, to_tensors
from dmrx.models import bundle


def test_relevance_means_by_label():
    res = {
        "label": np.array([1.0, 0.0, 1.0, 0.0, 0.0], np.float32),
        "prob": np.zeros(5),
        "r": np.array([2.0, -1.0, 4.0, 0.5, 3.5], np.float32),
        "r_hat": np.array([1, 1, 1, 0, 2], np.float32),
    }
    assert relevance_means(res) == {"mean_r_pos": 3.0, "mean_r_neg": 1.0, "mean_r_hat_pos": 1.0, "mean_r_hat_neg": 1.0}
    assert relevance_means({"label": res["label"], "prob": res["prob"]}) == {}  # a model without units
    only_clicks = relevance_means({"label": np.ones(3), "r": np.array([1.0, 2.0, 6.0])})
    assert only_clicks["mean_r_pos"] == 3.0 and math.isnan(only_clicks["mean_r_neg"])


def test_predict_per_row_outputs_and_attention_by_slot(tiny_run, tiny_data):
    b = bundle.load(tiny_run)
    enc, model, T = b.encoder(), b.model, b.model.cfg.max_len
    with DataFile(tiny_data / "test.h5") as f:
        plain = predict(model, enc, f, batch_size=4096)
        res = predict(model, enc, f, batch_size=37, i2i_by_slot=True)  # batches cut anywhere
        keys = ["seq", "end"] + sorted(set(enc.spec.batch_keys()))
        (whole,) = f.batches(f.n_rows, T, encoder=enc, keys=keys, behavior_fields=enc.spec.behaviors)
        cols = f.read_columns(0, f.n_rows, ["user", "label", "prob"])
    assert not {"i2i_sum", "i2i_count", "i2i_uniform"} & set(plain)
    assert {"prob", "r", "r_hat", "label", "prob_true", "user"} <= set(res)
    for k in plain:  # the extra outputs change nothing else
        np.testing.assert_allclose(res[k], plain[k], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res["user"], cols["user"])
    np.testing.assert_array_equal(res["label"], cols["label"])
    np.testing.assert_array_equal(res["prob_true"], cols["prob"])

    # the same sums from one forward pass over every row at once, by hand
    with torch.inference_mode():
        out = model(to_tensors(enc.finish(dict(whole))))
    np.testing.assert_allclose(res["prob"], torch.sigmoid(out["logit"]).numpy(), rtol=0, atol=1e-6)
    w, n = out["i2i_weights"].numpy(), np.minimum(whole["hist_len"], T)
    real = np.arange(T)[None, :] >= T - n[:, None]
    np.testing.assert_allclose(res["i2i_sum"], (w * real).sum(0), rtol=1e-5, atol=1e-6)
    assert res["i2i_count"].tolist() == real.sum(0).tolist()
    np.testing.assert_allclose(res["i2i_uniform"], (real / np.maximum(n, 1)[:, None]).sum(0), rtol=1e-9)
    # each row with a history spreads weight 1 over its real behaviours; padding gets none
    assert res["i2i_count"].sum() == n.sum() and res["i2i_count"][-1] == (n > 0).sum()
    assert res["i2i_sum"].sum() == pytest.approx((n > 0).sum(), rel=1e-4)
    assert res["i2i_uniform"].sum() == pytest.approx((n > 0).sum(), rel=1e-9)


def test_predict_on_a_row_range_without_rows(tiny_run, tiny_data):
    b = bundle.load(tiny_run)
    with DataFile(tiny_data / "test.h5") as f:
        res = predict(b.model, b.encoder(), f, row_range=(5, 5), i2i_by_slot=True)
    assert len(res["prob"]) == len(res["user"]) == 0 and "i2i_sum" not in res
