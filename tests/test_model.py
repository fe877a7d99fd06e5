"""The DMR module: shapes, masking, the split inference path, the auxiliary loss reaching the optimiser."""

from __future__ import annotations

import pytest
import torch

from dmrx.data.features import FeatureSpec
from dmrx.models.dmr import DMR, DMRConfig, masked_softmax

T = 12


def _spec(use_user_id=True) -> FeatureSpec:
    tables = {
        "item": ["hist/item", "target/item"],
        "cate": ["hist/cate", "target/cate"],
        "btag": ["hist/btag"],
        "profile_age": ["profile/age"],
        "context_pid": ["context/pid"],
    }
    if use_user_id:
        tables["user"] = ["user_index"]
    return FeatureSpec(
        behaviors=["item", "cate", "btag"],
        target=["item", "cate"],
        profile=["age"],
        context=["pid"],
        dense=["price"],
        match_field="item",
        use_user_id=use_user_id,
        tables=tables,
        dense_mean={"price": 0.0},
        dense_std={"price": 1.0},
    )


SIZES = {"item": 50, "cate": 8, "btag": 5, "profile_age": 4, "context_pid": 3, "user": 20}


def _model(**kw) -> DMR:
    torch.manual_seed(0)
    cfg = DMRConfig(embed_dim=8, attn_hidden=16, mlp=(16, 8), max_len=T, num_negatives=10, **kw)
    return DMR(cfg, _spec(), SIZES)


def _batch(B=6, lengths=None, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths if lengths is not None else torch.randint(0, T + 1, (B,), generator=g).tolist())
    B = len(lengths)
    mask = torch.arange(T).unsqueeze(0) >= (T - lengths).unsqueeze(1)
    batch = {f"hist/{f}": torch.randint(1, SIZES[f], (B, T), generator=g) * mask for f in ("item", "cate", "btag")}
    batch.update(
        {
            "hist_len": lengths,
            "target/item": torch.randint(1, 50, (B,), generator=g),
            "target/cate": torch.randint(1, 8, (B,), generator=g),
            "profile/age": torch.randint(1, 4, (B,), generator=g),
            "context/pid": torch.randint(1, 3, (B,), generator=g),
            "dense/price": torch.randn(B, generator=g),
            "user_index": torch.randint(1, 20, (B,), generator=g),
            "label": torch.ones(B),
        }
    )
    return batch


def test_masked_softmax_ignores_padding_and_handles_empty_rows():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0], [1e4, -1e4, 7.0]])
    mask = torch.tensor([[True, True, True], [False, False, False], [False, True, True]])
    w = masked_softmax(scores, mask)
    assert torch.allclose(w[0], torch.softmax(scores[0], 0))
    assert torch.equal(w[1], torch.zeros(3))
    assert w[2, 0] == 0 and torch.allclose(w[2, 1:], torch.softmax(scores[2, 1:], 0))
    assert torch.isfinite(masked_softmax(scores.half(), mask)).all()


@pytest.mark.parametrize("attention", ["additive", "din"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_history_gives_finite_sensible_output(attention, dtype):
    model = _model(attention=attention).to(dtype).eval()
    batch = _batch(lengths=[0, 0, T, 3])
    batch["dense/price"] = batch["dense/price"].to(dtype)
    with torch.no_grad():
        out = model(batch)
    for k in ("logit", "r", "r_hat"):
        assert torch.isfinite(out[k]).all(), k
    assert (out["r_hat"][:2] == 0).all()  # no real behaviour: nothing to sum
    assert (out["i2i_weights"][:2] == 0).all()


def test_padding_content_does_not_change_the_output():
    model = _model().eval()
    batch = _batch(lengths=[3, 7, 0])
    noisy = dict(batch)
    pad = torch.arange(T).unsqueeze(0) < (T - batch["hist_len"]).unsqueeze(1)
    noisy["hist/item"] = torch.where(pad, torch.randint(1, 50, (3, T)), batch["hist/item"])
    with torch.no_grad():
        assert torch.allclose(model(batch)["logit"], model(noisy)["logit"], atol=1e-6)


def test_positions_count_back_from_the_most_recent_behaviour():
    """Right-aligned histories of different lengths: the most recent behaviour always gets position 0,
    so a history's last k behaviours weigh the same whatever came before them (with U2I attention)."""
    model = _model(use_i2i=False).eval()
    short = _batch(lengths=[4])
    long = {k: v.clone() for k, v in short.items()}
    long["hist_len"] = torch.tensor([4])
    assert torch.equal(model.positions[-1:], torch.tensor([0]))
    with torch.no_grad():
        assert torch.allclose(model.encode_user(short)["u"], model.encode_user(long)["u"])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attention": "din"},
        {"use_u2i": False},
        {"use_i2i": False},
        {"use_position": False},
        {"shared_output": True},
    ],
)
def test_split_inference_equals_the_full_forward(kw):
    model = _model(**kw).eval()
    batch = _batch(B=8)
    with torch.no_grad():
        full = model(batch)
        users = model.encode_user(batch)
        # candidates point at their user's row: here every row is its own user, listed in reverse
        order = torch.arange(8).flip(0)
        user_rows = {k: v[order] for k, v in users.items()}
        grouped = model.score_grouped(user_rows, order.argsort(), batch)
    assert torch.allclose(full["logit"], grouped["logit"], atol=1e-6)


def test_auxiliary_loss_reaches_the_optimiser():
    """V' is trained by the auxiliary task: with beta > 0 the negatives' rows of V' get gradients and move
    after one optimiser step; with the task switched off they do not (a port once dropped this loss)."""
    from dmrx.training.trainer import _optimizers

    for beta, expect_moved in ((0.1, True), (0.0, False)):
        model = _model(beta=beta)
        model.train()
        opts = _optimizers(model, 1e-2)
        negatives = torch.tensor([40, 41, 42])
        before = model.v_out.weight[40:43].detach().clone()
        batch = _batch(B=8, lengths=[T] * 8)
        batch["target/item"] = torch.full((8,), 1)  # the CTR loss touches V' only at row 1
        out = model(batch, negatives, torch.zeros(SIZES["item"]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logit"], batch["label"]) + beta * out["aux"]
        loss.backward()
        for o in opts:
            o.step()
        moved = not torch.equal(before, model.v_out.weight[40:43].detach())
        assert moved == expect_moved, beta


@pytest.mark.parametrize("aux_loss", ["sampled_softmax", "sigmoid_ns"])
def test_auxiliary_loss_ignores_rows_without_a_previous_state(aux_loss):
    model = _model(aux_loss=aux_loss)
    neg = torch.tensor([3, 4, 5])
    batch = _batch(lengths=[0, 1, 5, 9])
    out = model(batch, neg, torch.zeros(SIZES["item"]))
    keep = {k: v[2:] for k, v in batch.items()}
    out_kept = model(keep, neg, torch.zeros(SIZES["item"]))
    assert torch.allclose(out["aux"], out_kept["aux"])
    short = {k: v[:2] for k, v in batch.items()}
    assert model(short, neg, torch.zeros(SIZES["item"]))["aux"] == 0


def test_config_rejects_impossible_values():
    from dmrx.errors import DmrxError

    for bad in (
        {"embed_dim": -1},
        {"beta": -0.1},
        {"mlp": ()},
        {"attention": "dot"},
        {"aux_loss": "nce"},
        {"use_u2i": False, "use_i2i": False},
    ):
        with pytest.raises(DmrxError):
            DMRConfig(**bad).validate()
    with pytest.raises(DmrxError, match="unknown model option"):
        DMRConfig.from_json({"embed_size": 3})


def test_match_product_pairs_the_columns_of_the_same_field():
    """u_hat * x_t multiplies item by item and cate by cate (btag, a behaviour-only field, is left out),
    whatever order the fields are concatenated in."""
    m = _model()
    d = m.cfg.embed_dim
    u_hat = torch.arange(3 * d, dtype=torch.float32).unsqueeze(0)  # e_t = [item | cate | btag]
    x_t = torch.arange(100, 100 + 2 * d, dtype=torch.float32).unsqueeze(0)  # x_t = [item | cate]
    assert torch.equal(m.match_product(u_hat, x_t), u_hat[:, : 2 * d] * x_t)
    off = _model(target_product=False)
    assert off.mlp[0].in_features == m.mlp[0].in_features - 2 * d


def test_input_norm_trains_on_batch_statistics_and_infers_with_its_running_affine():
    m = _model()
    x = torch.randn(64, m.mlp[0].in_features) * 5 + 3
    m.train()
    y = m.normalise_input(x)
    assert torch.allclose(y.mean(0), torch.zeros(y.shape[1]), atol=1e-4)  # batch statistics
    scale, shift = m.input_affine()  # one row has no batch statistics: the running ones serve
    assert torch.allclose(m.normalise_input(x[:1]), x[:1] * scale + shift)
    m.eval()
    assert torch.allclose(m.normalise_input(x), m.input_norm(x), atol=1e-5)  # eval: the running statistics
    # the model trains with a one-row batch (an epoch's last) without error
    m.train()
    assert torch.isfinite(m(_batch(lengths=[3]))["logit"]).all()


def test_a_run_saved_before_the_new_options_loads_as_it_was_trained():
    from dmrx.models.migrations import migrate

    old = {
        k: v
        for k, v in _model(target_product=False, mlp_batchnorm=False).cfg.to_json().items()
        if k not in ("target_product", "mlp_batchnorm")
    }
    cfg = DMRConfig.from_json(migrate({"model": old, "train": {}})["model"])  # version 1: no config_version
    assert not cfg.target_product and not cfg.mlp_batchnorm
    legacy = DMR(cfg, _spec(), SIZES)
    legacy.load_state_dict(_model(target_product=False, mlp_batchnorm=False).state_dict())  # same shapes
    assert DMRConfig.from_json(old).mlp_batchnorm  # a user's config file gets today's defaults
