"""The baselines of the paper's Table 1 (LR, Wide&Deep, PNN, DIN, DIEN), trained by the same trainer on
the same batches as DMR and evaluated by the same code.

Shared conventions, the same as DMR's (dmrx.models.dmr):
- Embedding tables are `nn.Embedding(sparse=True, padding_idx=0)` in `self.tables`, a ModuleDict in sorted
  table order, one per spec table: a behaviour field and the same-named target field look up one table
  (spec.table_of()). The trainer puts them in SparseAdam, everything else in Adam.
- Every table has cfg.embed_dim columns (DMR-only options such as shared_output, use_u2i, positions,
  attention, beta and the auxiliary loss are ignored); the MLPs are cfg.mlp with PReLU, as DMR's.
- forward(batch, negatives=None, log_q=None) -> {"logit": [B]}; negatives are ignored (no auxiliary task).
  Histories arrive right-aligned with 0 padding: slot T-1 is the most recent behaviour.
- Dense fields enter every model as they are (the encoder standardises them); profile keys include the user
  id when spec.use_user_id.

Choices, model by model:
- LR: a weight per one-hot feature (the profile, target and context ids, and the behaviour ids as a
  multi-hot bag normalised by the history length) plus a linear term over the dense fields. The paper adds
  "the cross-product of User Behavior and Target Item"; an explicit weight per (target id, behaviour id)
  pair does not fit in memory, so each shared field f (a behaviour field with the same table as a target
  field) gets CROSS_BUCKETS hashed pair weights: pair (t, b) reads bucket 1 + (t * 1000003 + b) mod
  (CROSS_BUCKETS - 1), averaged over the real behaviours like the bag. Bucket 0 is padding (padding slots
  and unknown ids read it, and it stays 0). This is the usual hashed cross feature of wide models: it
  memorises exact pairs, unlike a factorised (FM-like) product. LR's weights are per feature, so hist/item
  and target/item have separate weights (one table size, two features): sharing would make "clicked item
  i before" and "is shown item i" the same feature.
- Wide&Deep: the wide part is the LR above (its own weights, cross features included, as the paper says);
  the deep part is an MLP over [x_p, x_t, x_c, dense, mean of the behaviours' embeddings].
- PNN: the inner-product PNN. Field vectors: each profile, target and context id, and each behaviour field
  mean-pooled over the history; the MLP reads [all field vectors, every pairwise inner product, dense].
- DIN: the DIN activation unit, an MLP h-h/2-1 (h = cfg.attn_hidden_size, by default 80 as in the DIN paper)
  with PReLU (not Dice: Dice keeps batch statistics, which would make a prediction depend on its batch)
  over [q, k, q - k, q * k], where q is the target's shared fields and k the behaviour's same fields;
  weights are not normalised (DIN's sum pooling keeps the intensity) and are zero on padding; the pooled
  vector is the weighted sum of the behaviours' full embeddings. The MLP reads [x_p, x_t, x_c, dense, pooled].
- DIEN: a GRU interest extractor over the behaviours (hidden size = the behaviour vector's size), run
  packed over the real behaviours only so padding never moves it; attention a_t = softmax over real behaviours of
  h_t . W x_t; an AUGRU (update gate scaled by a_t) evolves the interest; its final state enters the MLP
  with [x_p, x_t, x_c, dense]. DIEN's auxiliary next-behaviour loss is off (not implemented).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmrx.data.features import FeatureSpec
from dmrx.errors import DmrxError
from dmrx.models.dmr import PReLU, _mlp, masked_softmax

BASELINES = ("lr", "widedeep", "pnn", "din", "dien")
CROSS_BUCKETS = 1 << 18  # hashed (target id, behaviour id) pair weights per shared field (LR and wide part)
_HASH_PRIME = 1_000_003


def shared_fields(spec: FeatureSpec) -> list[str]:
    """Behaviour fields whose target field of the same name uses the same table (item, cate, brand...)."""
    table_of = spec.table_of()
    return [f for f in spec.behaviors if f in spec.target and table_of.get(f"hist/{f}") == table_of.get(f"target/{f}")]


def _hist_mask(batch: dict[str, Tensor], T: int) -> Tensor:
    """[B, T] True on real behaviours (right-aligned histories)."""
    slots = torch.arange(T, device=batch["hist_len"].device)
    return slots.unsqueeze(0) >= (T - batch["hist_len"]).unsqueeze(1)


def _dense(batch: dict[str, Tensor], spec: FeatureSpec, like: Tensor) -> list[Tensor]:
    if not spec.dense:
        return []
    return [torch.stack([batch[f"dense/{f}"] for f in spec.dense], dim=-1).to(like.dtype)]


def _key_name(key: str) -> str:
    return key.replace("/", "__")  # module names cannot hold "." and read better without "/"


class _Embedded(nn.Module):
    """The embedding side every deep baseline shares: tables, lookups, the history and its mask."""

    def __init__(self, cfg, spec: FeatureSpec, sizes: dict[str, int]):
        super().__init__()
        cfg.validate()
        self.cfg, self.spec = cfg, spec
        self.table_of = spec.table_of()
        d = cfg.embed_dim
        self.tables = nn.ModuleDict({t: nn.Embedding(sizes[t], d, padding_idx=0, sparse=True) for t in sorted(sizes)})
        for emb in self.tables.values():
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()
        self.d = d
        self.d_e = d * len(spec.behaviors)
        self.d_t = d * len(spec.target)
        self.d_base = d * (len(spec.profile_keys()) + len(spec.target) + len(spec.context)) + len(spec.dense)

    def _embed(self, batch: dict[str, Tensor], keys: list[str]) -> Tensor:
        return torch.cat([self.tables[self.table_of[k]](batch[k]) for k in keys], dim=-1)

    def history(self, batch: dict[str, Tensor], fields: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """(behaviour vectors [B, T, d * fields], real-behaviour mask [B, T] bool)."""
        e = self._embed(batch, [f"hist/{f}" for f in (fields or self.spec.behaviors)])
        return e, _hist_mask(batch, e.shape[1])

    def base(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """([x_p, x_t, x_c, dense] [B, d_base], x_t [B, d_t])."""
        x_t = self._embed(batch, [f"target/{f}" for f in self.spec.target])
        parts = [self._embed(batch, self.spec.profile_keys())] if self.spec.profile_keys() else []
        parts.append(x_t)
        if self.spec.context:
            parts.append(self._embed(batch, [f"context/{f}" for f in self.spec.context]))
        parts += _dense(batch, self.spec, x_t)
        return torch.cat(parts, dim=-1), x_t

    @staticmethod
    def mean_pool(e: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(e.dtype).unsqueeze(-1)
        return (e * m).sum(1) / m.sum(1).clamp_min(1.0)


class LR(nn.Module):
    """Logistic regression over one-hot features, the behaviour bag and hashed behaviour x target crosses."""

    def __init__(self, cfg, spec: FeatureSpec, sizes: dict[str, int]):
        super().__init__()
        cfg.validate()
        self.cfg, self.spec = cfg, spec
        table_of = spec.table_of()
        self.one_hot = (
            spec.profile_keys() + [f"target/{f}" for f in spec.target] + [f"context/{f}" for f in spec.context]
        )
        self.bags = [f"hist/{f}" for f in spec.behaviors]
        self.crosses = shared_fields(spec)
        weights = {
            _key_name(k): nn.Embedding(sizes[table_of[k]], 1, padding_idx=0, sparse=True)
            for k in self.one_hot + self.bags
        }
        weights.update(
            {f"cross__{f}": nn.Embedding(CROSS_BUCKETS, 1, padding_idx=0, sparse=True) for f in self.crosses}
        )
        self.tables = nn.ModuleDict({k: weights[k] for k in sorted(weights)})
        for emb in self.tables.values():
            nn.init.zeros_(emb.weight)
        self.dense = nn.Linear(len(spec.dense), 1, bias=False) if spec.dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    @staticmethod
    def cross_index(target: Tensor, hist: Tensor, mask: Tensor) -> Tensor:
        """Bucket of each (target id, behaviour id) pair, [B, T]; 0 on padding and unknown ids."""
        h = (target.unsqueeze(1) * _HASH_PRIME + hist) % (CROSS_BUCKETS - 1) + 1
        return torch.where(mask & (hist > 0) & (target.unsqueeze(1) > 0), h, torch.zeros_like(h))

    def forward(
        self, batch: dict[str, Tensor], negatives: Tensor | None = None, log_q: Tensor | None = None
    ) -> dict[str, Tensor]:
        B = batch["hist_len"].shape[0]
        logit = self.bias.expand(B)
        for k in self.one_hot:
            logit = logit + self.tables[_key_name(k)](batch[k]).squeeze(-1)
        T = batch[self.bags[0]].shape[1]
        mask = _hist_mask(batch, T)
        n = mask.sum(-1).clamp_min(1).to(logit.dtype)
        for k in self.bags:  # padding reads row 0, which stays 0
            logit = logit + self.tables[_key_name(k)](batch[k]).squeeze(-1).sum(-1) / n
        for f in self.crosses:
            idx = self.cross_index(batch[f"target/{f}"], batch[f"hist/{f}"], mask)
            logit = logit + self.tables[f"cross__{f}"](idx).squeeze(-1).sum(-1) / n
        if self.dense is not None:
            logit = logit + self.dense(_dense(batch, self.spec, logit)[0]).squeeze(-1)
        return {"logit": logit}


class WideDeep(_Embedded):
    def __init__(self, cfg, spec: FeatureSpec, sizes: dict[str, int]):
        super().__init__(cfg, spec, sizes)
        self.wide = LR(cfg, spec, sizes)
        self.mlp = _mlp(self.d_base + self.d_e, tuple(cfg.mlp))

    def forward(self, batch, negatives=None, log_q=None):
        x, _ = self.base(batch)
        e, mask = self.history(batch)
        deep = self.mlp(torch.cat([x, self.mean_pool(e, mask)], dim=-1)).squeeze(-1)
        return {"logit": self.wide(batch)["logit"] + deep}


class PNN(_Embedded):
    """Inner-product PNN: field vectors and all their pairwise inner products feed the MLP."""

    def __init__(self, cfg, spec: FeatureSpec, sizes: dict[str, int]):
        super().__init__(cfg, spec, sizes)
        self.field_keys = (
            spec.profile_keys() + [f"target/{f}" for f in spec.target] + [f"context/{f}" for f in spec.context]
        )
        n = len(self.field_keys) + len(spec.behaviors)
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.mlp = _mlp(n * self.d + len(rows) + len(spec.dense), tuple(cfg.mlp))

    def forward(self, batch, negatives=None, log_q=None):
        e, mask = self.history(batch)
        pooled = self.mean_pool(e, mask).unflatten(-1, (len(self.spec.behaviors), self.d))  # [B, n_b, d]
        ids = torch.stack([self.tables[self.table_of[k]](batch[k]) for k in self.field_keys], dim=1)
        fields = torch.cat([ids, pooled.to(ids.dtype)], dim=1)  # [B, n, d]
        gram = torch.bmm(fields, fields.transpose(1, 2))
        inner = gram[:, self.pair_rows, self.pair_cols]
        parts = [fields.flatten(1), inner] + _dense(batch, self.spec, fields)
        return {"logit": self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)}


class DIN(_Embedded):
    """Target attention with the DIN activation unit, weighted sum pooling."""

    def __init__(self, cfg, spec: FeatureSpec, sizes: dict[str, int]):
        super().__init__(cfg, spec, sizes)
        self.shared = shared_fields(spec)
        d_s = self.d * len(self.shared)
        h = cfg.attn_hidden_size
        self.unit = nn.Sequential(
            nn.Linear(4 * d_s, h),
            PReLU(h, 0.1),
            nn.Linear(h, max(1, h // 2)),
            PReLU(max(1, h // 2), 0.1),
            nn.Linear(max(1, h // 2), 1),
        )
        self.mlp = _mlp(self.d_base + self.d_e, tuple(cfg.mlp))

    def attention(self, batch: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Unnormalised DIN weights [B, T], zero on padding."""
        k = self._embed(batch, [f"hist/{f}" for f in self.shared])
        q = self._embed(batch, [f"target/{f}" for f in self.shared]).unsqueeze(1).expand_as(k)
        w = self.unit(torch.cat([q, k, q - k, q * k], dim=-1)).squeeze(-1)
        return w * mask.to(w.dtype)

    def forward(self, batch, negatives=None, log_q=None):
        x, _ = self.base(batch)
        e, mask = self.history(batch)
        w = self.attention(batch, mask)
        pooled = torch.bmm(w.unsqueeze(1), e).squeeze(1)
        return {"logit": self.mlp(torch.cat([x, pooled], dim=-1)).squeeze(-1), "din_weights": w}


class AUGRU(nn.Module):
    """GRU whose update gate is scaled by an attention score a_t (DIEN's AUGRU): h' = (1 - a u) h + a u n.

    Where a_t = 0 (padding) the state does not move. The input projections of all steps are one matmul;
    only the recurrent part loops.
    """

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.x2h = nn.Linear(d_in, 3 * hidden)
        self.h2h = nn.Linear(hidden, 3 * hidden)
        self.hidden = hidden

    def forward(self, x: Tensor, a: Tensor, first: int = 0) -> Tensor:
        """x [B, T, d_in], a [B, T] -> final state [B, hidden]; steps before `first` are skipped (all a = 0)."""
        gx = self.x2h(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(first, x.shape[1]):
            xr, xu, xn = gx[:, t].chunk(3, dim=-1)
            hr, hu, hn = self.h2h(h).chunk(3, dim=-1)
            r = torch.sigmoid(xr + hr)
            u = torch.sigmoid(xu + hu) * a[:, t : t + 1].to(h.dtype)
            h = ((1 - u) * h + u * torch.tanh(xn + r * hn)).to(x.dtype)
        return h


def _roll_rows(x: Tensor, shift: Tensor) -> Tensor:
    """Row b of x [B, T, d] rotated left by shift[b] along T: out[b, j] = x[b, (j + shift[b]) mod T]."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device).unsqueeze(0) + shift.unsqueeze(1)) % T
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class DIEN(_Embedded):
    """GRU interest extractor, target attention over its states, AUGRU interest evolution."""

    def __init__(self, cfg, spec: FeatureSpec, sizes: dict[str, int]):
        super().__init__(cfg, spec, sizes)
        self.hidden = self.d_e
        self.extractor = nn.GRU(self.d_e, self.hidden, batch_first=True)
        self.att = nn.Linear(self.d_t, self.hidden, bias=False)
        self.evolution = AUGRU(self.hidden, self.hidden)
        self.mlp = _mlp(self.d_base + self.hidden, tuple(cfg.mlp))

    def interest_states(self, e: Tensor, length: Tensor) -> Tensor:
        """h_t [B, T, H] of the GRU run over the real behaviours only (right-aligned, 0 on padding).

        The histories are rotated to the left, packed so the GRU never sees padding, and rotated back."""
        T = e.shape[1]
        length = length.clamp(0, T)
        left = _roll_rows(e, T - length)  # real behaviours first, padding after
        packed = nn.utils.rnn.pack_padded_sequence(
            left, length.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.extractor(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        states = _roll_rows(out, (length - T) % T)  # back to right-aligned
        return states * (torch.arange(T, device=e.device).unsqueeze(0) >= (T - length).unsqueeze(1)).unsqueeze(-1).to(
            states.dtype
        )

    def forward(self, batch, negatives=None, log_q=None):
        x, x_t = self.base(batch)
        e, mask = self.history(batch)
        T = e.shape[1]
        states = self.interest_states(e, batch["hist_len"])
        scores = (states * self.att(x_t).unsqueeze(1).to(states.dtype)).sum(-1)
        a = masked_softmax(scores, mask)  # zero on padding: the AUGRU's update gate is shut there
        first = T - int(batch["hist_len"].clamp(0, T).max()) if len(mask) else T
        g = self.evolution(states, a, first)
        return {"logit": self.mlp(torch.cat([x, g.to(x.dtype)], dim=-1)).squeeze(-1), "dien_weights": a}


_CLASSES = {"lr": LR, "widedeep": WideDeep, "pnn": PNN, "din": DIN, "dien": DIEN}


def build_baseline(cfg, spec: FeatureSpec, sizes: dict[str, int]) -> nn.Module:
    """The baseline named by cfg.model, over the tables `sizes` (table name -> rows)."""
    if cfg.model not in _CLASSES:
        raise DmrxError(f"model option model: no baseline {cfg.model!r}; baselines are {', '.join(BASELINES)}")
    if not shared_fields(spec) and cfg.model in ("din",):
        raise DmrxError("the din baseline needs a behaviour field that shares its table with a target field")
    return _CLASSES[cfg.model](cfg, spec, sizes)
