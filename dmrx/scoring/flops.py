"""Work per candidate, counted from a model's shapes (for the scoring benchmark's share of peak)."""

from __future__ import annotations


def flops_per_candidate(model) -> dict:
    """Multiply-adds x2 per candidate, counted from the model's shapes (embedding lookups not counted).

    full: the whole model for one aligned row (user side + candidate side), as naive per-row scoring does.
    grouped: the candidate side only, as user-grouped scoring runs it (the profile block of the first MLP
    layer moved to once per user run, so it is not counted); user_side: once per distinct history.
    """
    cfg, spec = model.cfg, model.spec
    T, H = cfg.max_len, cfg.attn_hidden_size
    d_e = model.d_e
    tables = model.tables
    d_t = sum(tables[model.table_of[f"target/{f}"]].embedding_dim for f in spec.target)
    d_p = sum(tables[model.table_of[k]].embedding_dim for k in spec.profile_keys())
    lin = [m for m in model.mlp if hasattr(m, "in_features")]
    mlp = sum(m.in_features * m.out_features for m in lin)
    h1 = lin[0].out_features
    user = 0
    cand_attn = 0
    if cfg.use_u2i:
        user += T * d_e * H + T * H + T * d_e + d_e * model.d_v  # projection, scores, weighted sum, g
        cand_attn += model.d_v  # r = u . v'
    if cfg.use_i2i:
        user += T * d_e * H  # W_e e_t
        cand_attn += d_t * H + T * H + T * H + T * d_e + T  # W_q x_t, + keys, z.tanh(.), alpha e, r_hat
    grouped = 2 * (cand_attn + mlp - d_p * h1)
    return {
        "full": 2 * (user + cand_attn + mlp),
        "grouped": grouped,
        "user_side": 2 * user,
        "tanh_per_candidate": T * H if cfg.use_i2i else 0,
    }
