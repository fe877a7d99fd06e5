"""The Deep Match to Rank model (Lyu et al., AAAI 2020) in one file.

Notation follows the paper. e_t: a behaviour's feature vector (its fields' embeddings concatenated);
p_t: position embedding, position 0 = the most recent behaviour; V: input embeddings shared by behaviours
and target; V': the separate output table of the match field (items, or categories for Alimama data).

- User-to-Item network (Eq. 2-5): attention with the positional encoding as query over the behaviours,
  u = g(sum_t alpha_t e_t), r = u . v'_target.
- Auxiliary match network (Eq. 6-9): u_{T-1} (the same network over all but the most recent behaviour)
  predicts the most recent behaviour against V' with k sampled negatives.
- Item-to-Item network (Eq. 10-13): attention between target and behaviours; r_hat = sum of the raw scores
  over real behaviours, u_hat = the softmax-weighted sum.
- MLP over [x_p, x_t, x_c, u_hat, r, r_hat], PReLU, sigmoid. At inference the profile block x_p (the user's
  own features) enters once per user row: the first layer's share of it is added to each of its candidates.

Inference is split in two so a user's history is encoded once for all its candidates: `encode_user`
(everything that does not depend on the target) and `score_candidates` (the target-dependent rest).
Masking never uses infinities: an empty history gives zero attention weights and finite outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmrx.choices import ARCHS as MODELS
from dmrx.data.features import FeatureSpec
from dmrx.errors import DmrxError
from dmrx.options import from_options


@dataclass
class DMRConfig:
    model: str = "dmr"  # or a baseline trained by the same trainer: lr, widedeep, pnn, din, dien
    embed_dim: int = 32  # every embedding table (the match table doubles under shared_output)
    max_len: int = 50  # T: behaviours read per example, most recent kept
    attention: str = "additive"  # "additive": the paper's z^T tanh(W_p p + W_e e + b); "din": authors' scorer
    attn_hidden: int | None = None  # the attention scorer's width; None: 64 additive, 80 DIN (attn_hidden_size)
    mlp: tuple[int, ...] = (512, 256, 128)
    aux_loss: str = "sampled_softmax"  # or "sigmoid_ns" (Eq. 8)
    num_negatives: int = 2000
    beta: float = 0.1
    use_u2i: bool = True  # ablation "I2I only" turns this off (and the auxiliary network with it)
    use_i2i: bool = True  # ablation "U2I only" turns this off
    use_position: bool = True  # ablation "no positional encoding"
    use_r_hat: bool = True  # feed r_hat to the MLP (off, with U2I and positions off: a DIN-like model)
    shared_output: bool = False  # ablation "double-size shared embedding": v' = V[target], match table 2x
    match_field: str = "item"
    use_user_id: bool = False  # embed the user id as a profile field (memorises users with few rows; see README)
    target_product: bool = True  # with I2I, also feed u_hat * x_t (fields both carry) to the MLP; see README
    mlp_batchnorm: bool = True  # batch-normalise the MLP input, as the authors' code does

    @property
    def attn_hidden_size(self) -> int:
        """The attention scorer's hidden width: attn_hidden, or by default d_h = 64 for the additive form and
        80 (an 80-40 MLP, the DIN authors' size) for the DIN unit, in DMR (attention "din") and the DIN baseline."""
        if self.attn_hidden is not None:
            return self.attn_hidden
        return 80 if "din" in (self.model, self.attention) else 64

    def validate(self) -> None:
        """Up-front validation: impossible values are reported before any work starts."""
        c = self
        for name in ("embed_dim", "max_len", "attn_hidden", "num_negatives"):
            if getattr(c, name) is not None and getattr(c, name) <= 0:
                raise DmrxError(f"model option {name} must be positive, got {getattr(c, name)}")
        if not c.mlp or any(int(h) <= 0 for h in c.mlp):
            raise DmrxError(f"model option mlp must be a list of positive sizes, got {list(c.mlp)}")
        if not c.beta >= 0:  # NaN too
            raise DmrxError(f"model option beta must be >= 0, got {c.beta}")
        if c.model not in MODELS:
            raise DmrxError(f"model option model must be one of {', '.join(MODELS)}, got {c.model!r}")
        if c.attention not in ("additive", "din"):
            raise DmrxError(f"model option attention must be 'additive' or 'din', got {c.attention!r}")
        if c.aux_loss not in ("sampled_softmax", "sigmoid_ns"):
            raise DmrxError(f"model option aux_loss must be 'sampled_softmax' or 'sigmoid_ns', got {c.aux_loss!r}")
        if not (c.use_u2i or c.use_i2i):
            raise DmrxError("model options use_u2i and use_i2i cannot both be off")

    def to_json(self) -> dict:
        """The options as a run saves them: the width the scorer was built with, not None, so the run does
        not depend on how a later version picks the default."""
        d = asdict(self)
        d["mlp"] = list(self.mlp)
        d["attn_hidden"] = self.attn_hidden_size
        return d

    @classmethod
    def from_json(cls, d: dict) -> DMRConfig:
        """The options of a config file's model table (or a saved run's, after dmrx.models.migrate)."""
        return from_options(cls, d, "model")


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis restricted to mask; all-zero weights where a row has no real entry.

    The max is taken over real entries only (padding takes the row's minimum, a finite number), so no
    infinity or huge fill constant appears, in any precision.
    """
    floor = scores.amin(dim=-1, keepdim=True)
    real = torch.where(mask, scores, floor)  # padding can hold anything; it must not reach exp
    w = torch.exp(real - real.amax(dim=-1, keepdim=True)) * mask.to(scores.dtype)
    return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-6)


class PReLU(nn.Module):
    """PReLU over the last axis (torch's nn.PReLU takes axis 1 as channels, wrong for [B, T, d] inputs)."""

    def __init__(self, d: int, init: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.full((d,), init))

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self.exported(x)
        return torch.where(x >= 0, x, x * self.weight)

    def exported(self, x: Tensor) -> Tensor:
        """The same function in the ops ONNX Runtime runs fastest: its Where and PRelu kernels took a third
        of the candidate scorer's time (GreaterOrEqual/Mul/Where ~10x, PRelu ~5x the cost of Mul + Max on
        a [256, 512] tensor). Both forms give the same bits as the Where form: with every slope in [0, 1],
        max(x, w x) is x for x >= 0 and w x below; otherwise relu(x) + w min(x, 0) adds an exact zero."""
        w = self.weight
        if bool((w >= 0).all()) and bool((w <= 1).all()):
            return torch.maximum(x, x * w)
        return F.relu(x) + torch.minimum(x, x.new_zeros(())) * w


class AdditiveAttention(nn.Module):
    """a_t = z^T tanh(W_q q + W_p p_t + W_e e_t + b): the paper's Eq. 2 (no q) and Eq. 10 (q = e_c).

    The behaviour side W_p p_t + W_e e_t + b does not depend on the target, so it is computed once per
    user (`keys`) and reused by every candidate (`scores`).
    """

    def __init__(self, d_e: int, d_pos: int, d_q: int, hidden: int):
        super().__init__()
        self.w_e = nn.Linear(d_e, hidden)
        self.w_p = nn.Linear(d_pos, hidden, bias=False) if d_pos else None
        self.w_q = nn.Linear(d_q, hidden, bias=False) if d_q else None
        self.z = nn.Linear(hidden, 1, bias=False)

    def project(self, e: Tensor) -> Tensor:
        return self.w_e(e)

    def keys(self, proj: Tensor, pos: Tensor | None) -> Tensor:
        return proj + self.w_p(pos) if self.w_p is not None else proj

    def scores(self, keys: Tensor, e: Tensor, query: Tensor | None = None) -> Tensor:
        h = keys if query is None else keys + self.w_q(query).unsqueeze(-2)
        return self.z(torch.tanh(h)).squeeze(-1)


class DinAttention(nn.Module):
    """The authors' released scorer: an MLP h-h/2-1 (sigmoid hidden units; theirs is 80-40-1) over
    [q, e, q - e, q * e].

    The query is Dense+PReLU over the position embedding (U2I) or over [target, position] (I2I). The first
    layer splits as W [q, e, q-e, q*e] = (W1 + W3) q + (W2 - W3) e + W4 (q * e); the e-only part is the
    target-independent `keys`.
    """

    def __init__(self, d_e: int, d_pos: int, d_q: int, hidden: int):
        super().__init__()
        self.d_e, self.hidden = d_e, hidden
        self.q_pos = nn.Linear(d_pos, d_e) if d_pos else None
        self.q_target = nn.Linear(d_q, d_e, bias=False) if d_q else None
        self.act = PReLU(d_e, 0.1)
        self.l1 = nn.Linear(4 * d_e, hidden)
        self.l2 = nn.Linear(hidden, max(1, hidden // 2))
        self.l3 = nn.Linear(max(1, hidden // 2), 1)

    def _split(self):
        w = self.l1.weight
        d = self.d_e
        w1, w2, w3, w4 = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        return w1 + w3, w2 - w3, w4

    def project(self, e: Tensor) -> Tensor:
        _, we, _ = self._split()
        return e @ we.T + self.l1.bias

    def keys(self, proj: Tensor, pos: Tensor | None) -> Tensor:
        # the query's position part is target-independent too; carry it with the keys
        shape = (*proj.shape[:-1], self.d_e)
        qpos = self.q_pos(pos).expand(shape) if self.q_pos is not None else proj.new_zeros(shape)
        return torch.cat([proj, qpos], dim=-1)

    def scores(self, keys: Tensor, e: Tensor, query: Tensor | None = None) -> Tensor:
        k, qpos = keys[..., : self.hidden], keys[..., self.hidden :]
        q = qpos if query is None or self.q_target is None else qpos + self.q_target(query).unsqueeze(-2)
        q = self.act(q)
        wq, _, wqe = self._split()
        h = torch.sigmoid(k + q @ wq.T + (q * e) @ wqe.T)
        return self.l3(torch.sigmoid(self.l2(h))).squeeze(-1)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient is summed the same way. torch's
    torch.distributed.nn.functional.all_reduce is deprecated and the replacement it names is private."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def _global_batch_norm(x: Tensor, bn: nn.BatchNorm1d) -> Tensor:
    """Batch norm in training over the global batch of all ranks (each holds a slice of it), so a
    distributed run normalises, and trains, as one process would. torch's SyncBatchNorm does this on
    GPUs only; this works on gloo too. Statistics are summed with an autograd-aware all_reduce.

    Every rank calls this at every step, a rank with no rows too (its sums are zeros): the all-reduce is a
    collective. A global batch of one row has no statistics: like one process, it takes the running ones,
    chosen on the device (torch.where) so that no step waits for the row count."""
    d = x.shape[1]
    stats = _AllReduceSum.apply(torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])]))
    n = stats[-1]
    one = n <= 1
    mean = stats[:d] / n.clamp_min(1.0)
    var = (stats[d : 2 * d] / n.clamp_min(1.0) - mean * mean).clamp_min(0.0)
    # copies: the update below is in place, and backward needs the values this step used
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    scale = bn.weight * torch.rsqrt(running_var + bn.eps)
    running = x * scale + (bn.bias - running_mean * scale)
    with torch.no_grad():
        m = torch.where(one, 0.0, bn.momentum)
        bn.running_mean.mul_(1 - m).add_(mean.detach() * m)
        bn.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1.0)) * m)
        bn.num_batches_tracked.add_((~one).long())
    return torch.where(one, running, (x - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias)


def _in_slots(x: Tensor, R: int) -> Tensor:
    """[R * g, d] as [R, g, d]. An exported graph reads g from its inputs; in torch a batch may be empty."""
    if torch.onnx.is_in_onnx_export():
        return x.reshape(R, -1, x.shape[-1])
    return x.reshape(R, x.shape[0] // max(R, 1), x.shape[-1])


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """Column indices as [start, stop) runs of consecutive columns."""
    runs: list[tuple[int, int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _columns(x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """The columns of x (last axis) in runs, concatenated; x itself when they are all of it, in order."""
    if len(runs) == 1 and runs[0] == (0, x.shape[-1]):
        return x
    return torch.cat([x[..., a:b] for a, b in runs], dim=-1)


def _mlp(d_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), PReLU(h, 0.1)]
        d_in = h
    layers.append(nn.Linear(d_in, 1))
    return nn.Sequential(*layers)


class DMR(nn.Module):
    def __init__(self, cfg: DMRConfig, spec: FeatureSpec, table_sizes: dict[str, int]):
        super().__init__()
        cfg.validate()
        self.cfg, self.spec = cfg, spec
        table_of = spec.table_of()
        self.table_of = table_of
        self.match_table = table_of[f"target/{cfg.match_field}"]
        d = cfg.embed_dim
        dims = {t: d * (2 if cfg.shared_output and t == self.match_table else 1) for t in table_sizes}
        # sparse: a step touches only the rows it looks up, so its cost does not grow with the vocabulary
        # sorted: parameter order (which optimiser state follows) must not depend on where sizes came from
        self.tables = nn.ModuleDict(
            {t: nn.Embedding(table_sizes[t], dims[t], padding_idx=0, sparse=True) for t in sorted(table_sizes)}
        )
        self.d_v = dims[self.match_table]
        if not cfg.shared_output:
            self.v_out = nn.Embedding(table_sizes[self.match_table], self.d_v, padding_idx=0, sparse=True)
        d_e = sum(dims[table_of[f"hist/{f}"]] for f in spec.behaviors)
        d_t = sum(dims[table_of[f"target/{f}"]] for f in spec.target)
        d_p = sum(dims[table_of[k]] for k in spec.profile_keys())
        self.d_p = d_p  # the profile block's width: the first columns of the MLP input
        d_c = sum(dims[table_of[f"context/{f}"]] for f in spec.context) + len(spec.dense)
        self.d_e = d_e
        attn = AdditiveAttention if cfg.attention == "additive" else DinAttention
        d_pos = d if cfg.use_position else 0
        if cfg.use_u2i:
            self.pos_u2i = nn.Embedding(cfg.max_len, d) if cfg.use_position else None
            self.att_u2i = attn(d_e, d_pos, 0, cfg.attn_hidden_size)
            self.g = nn.Sequential(nn.Linear(d_e, self.d_v), PReLU(self.d_v, 0.1))
        if cfg.use_i2i:
            self.pos_i2i = nn.Embedding(cfg.max_len, d) if cfg.use_position else None
            self.att_i2i = attn(d_e, d_pos, d_t, cfg.attn_hidden_size)
        # columns of e_t and x_t looked up in the same table (one space): the pairs target_product multiplies
        cols_e = self._columns([f"hist/{f}" for f in spec.behaviors], dims)
        cols_t = self._columns([f"target/{f}" for f in spec.target], dims)
        shared = [f for f in spec.behaviors if f in spec.target and table_of[f"hist/{f}"] == table_of[f"target/{f}"]]
        # as runs of consecutive columns: slices, not gathers along the feature axis (in an exported graph a
        # Gather on the last axis took ~9% of the INT8 candidate scorer's time)
        self.prod_e = _runs([c for f in shared for c in cols_e[f"hist/{f}"]])
        self.prod_t = _runs([c for f in shared for c in cols_t[f"target/{f}"]])
        d_prod = sum(b - a for a, b in self.prod_e) if cfg.target_product else 0
        d_in = d_p + d_t + d_c + (d_e + cfg.use_r_hat + d_prod if cfg.use_i2i else 0) + cfg.use_u2i
        # The MLP input mixes embeddings (~0.05), products of them (~0.003) and relevance units (up to tens):
        # without a normalisation the products, which carry the target-history match, barely reach it (and
        # one INT8 activation scale cannot serve them all).
        self.input_norm = nn.BatchNorm1d(d_in) if cfg.mlp_batchnorm else None
        self.mlp = _mlp(d_in, cfg.mlp)
        for emb in self.tables.values():
            nn.init.normal_(emb.weight, std=0.05)
        if not cfg.shared_output:
            nn.init.normal_(self.v_out.weight, std=0.05)
        # reverse time order: slot T-1 (most recent) gets position 0
        self.register_buffer("positions", torch.arange(cfg.max_len - 1, -1, -1), persistent=False)

    # ---- pieces -----------------------------------------------------------------------------------
    def _columns(self, keys: list[str], dims: dict[str, int]) -> dict[str, list[int]]:
        """The columns each key's embedding takes in the concatenation of `keys` (see _embed)."""
        out, start = {}, 0
        for k in keys:
            width = dims[self.table_of[k]]
            out[k] = list(range(start, start + width))
            start += width
        return out

    def _embed(self, batch: dict[str, Tensor], keys: list[str]) -> Tensor:
        return torch.cat([self.tables[self.table_of[k]](batch[k]) for k in keys], dim=-1)

    def output_table(self) -> Tensor:
        """V': the rows retrieval searches (the input table itself under the shared_output ablation)."""
        return self.tables[self.match_table].weight if self.cfg.shared_output else self.v_out.weight

    def _v_out(self, index: Tensor) -> Tensor:
        return self.tables[self.match_table](index) if self.cfg.shared_output else self.v_out(index)

    def _pos(self, table: nn.Embedding | None, T: int) -> Tensor | None:
        return None if table is None else table(self.positions[-T:])

    def _user_vector(self, proj: Tensor, e: Tensor, mask: Tensor) -> Tensor:
        """u (Eq. 2-4) from the behaviours' projections W_e e_t, their features e_t and the mask."""
        keys = self.att_u2i.keys(proj, self._pos(self.pos_u2i, e.shape[1]))
        alpha = masked_softmax(self.att_u2i.scores(keys, e), mask)
        return self.g(torch.bmm(alpha.unsqueeze(1), e).squeeze(1))

    def _hist_mask(self, batch: dict[str, Tensor], T: int) -> Tensor:
        slots = torch.arange(T, device=batch["hist_len"].device)
        return slots.unsqueeze(0) >= (T - batch["hist_len"]).unsqueeze(1)

    # ---- inference, split ---------------------------------------------------------------------------
    def encode_user(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Everything that depends on the user's history only: computed once per user."""
        e = self._embed(batch, [f"hist/{f}" for f in self.spec.behaviors])
        mask = self._hist_mask(batch, e.shape[1])
        out = {"hist_emb": e, "mask": mask.to(e.dtype)}
        if self.cfg.use_u2i:
            out["u2i_proj"] = self.att_u2i.project(e)
            out["u"] = self._user_vector(out["u2i_proj"], e, mask)
        if self.cfg.use_i2i:
            out["i2i_keys"] = self.att_i2i.keys(self.att_i2i.project(e), self._pos(self.pos_i2i, e.shape[1]))
        return out

    def score_candidates(self, user: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The target-dependent part. `user` holds R rows and `batch` R * g candidates: candidates
        g * i ... g * i + g - 1 belong to user row i (g = 1: rows aligned, as in training), and the user's
        own features (the profile keys) come once per user row, [R]. The attention then broadcasts one
        user's keys to its g candidates instead of reading a copy per candidate."""
        x_t = self._embed(batch, [f"target/{f}" for f in self.spec.target])
        parts = [x_t]
        if self.spec.context:
            parts.append(self._embed(batch, [f"context/{f}" for f in self.spec.context]))
        if self.spec.dense:
            parts.append(torch.stack([batch[f"dense/{f}"] for f in self.spec.dense], dim=-1).to(x_t.dtype))
        R = user["mask"].shape[0]
        out = {}
        if self.cfg.use_i2i:
            e, mask = user["hist_emb"], user["mask"].unsqueeze(1)  # [R, T, d_e], [R, 1, T]
            q = _in_slots(x_t, R)  # [R, g, d_t]
            a_hat = self.att_i2i.scores(user["i2i_keys"].unsqueeze(1), e.unsqueeze(1), q)  # [R, g, T]
            out["r_hat"] = (a_hat * mask).sum(dim=-1).reshape(-1)  # Eq. 11 over real behaviours only
            alpha = masked_softmax(a_hat, mask > 0)
            u_hat = torch.bmm(alpha, e).reshape(-1, e.shape[-1])  # Eq. 12-13
            out["i2i_weights"] = alpha.reshape(-1, alpha.shape[-1])
            parts += [u_hat, out["r_hat"].unsqueeze(-1)] if self.cfg.use_r_hat else [u_hat]
            if self.cfg.target_product:
                parts.append(self.match_product(u_hat, x_t))
        if self.cfg.use_u2i:
            v = self._v_out(batch[f"target/{self.cfg.match_field}"])
            out["r"] = (user["u"].unsqueeze(1) * _in_slots(v, R)).sum(dim=-1).reshape(-1)  # Eq. 5
            parts.append(out["r"].unsqueeze(-1))
        x_p = self._embed(batch, self.spec.profile_keys()) if self.spec.profile_keys() else None
        out["logit"] = self._head(x_p, torch.cat(parts, dim=-1)).squeeze(-1)
        return out

    def _head(self, x_p: Tensor | None, x: Tensor) -> Tensor:
        """The MLP over [x_p, x]: x_p [R, d_p] per user row, x [R * g, d] per candidate.

        In training (R = B) the two are concatenated for the batch norm's statistics. Otherwise the batch
        norm is a per-column affine and the first layer splits by input block: the profile block's share is
        computed once per user row and added to its g candidates, as the torch scorer and the exported
        candidate scorer (profile inputs once per slot) do."""
        if x_p is None:
            return self.mlp(self.normalise_input(x))
        if self.training:
            return self.mlp(self.normalise_input(torch.cat([x_p, x], dim=-1)))
        d_p, first = self.d_p, self.mlp[0]  # a Python int, so an exported graph slices the weight once
        if self.input_norm is not None:
            scale, shift = self.input_affine()
            x_p, x = x_p * scale[:d_p] + shift[:d_p], x * scale[d_p:] + shift[d_p:]
        pre = F.linear(x, first.weight[:, d_p:], first.bias)
        pre = (_in_slots(pre, x_p.shape[0]) + F.linear(x_p, first.weight[:, :d_p]).unsqueeze(1)).reshape(pre.shape)
        return self.mlp[1:](pre)

    def match_product(self, u_hat: Tensor, x_t: Tensor) -> Tensor:
        """u_hat * x_t over the fields behaviours and target share: the target-history match, per dimension."""
        return _columns(u_hat, self.prod_e) * _columns(x_t, self.prod_t)

    def normalise_input(self, x: Tensor) -> Tensor:
        """The MLP input's batch norm: batch statistics in training, else the per-column affine of the
        running statistics (exported as Mul and Add, which every runtime and precision handles)."""
        if self.input_norm is None:
            return x
        if self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            return _global_batch_norm(x, self.input_norm)
        if self.training and x.shape[0] > 1:  # a one-row batch (an epoch's last) has no statistics
            return self.input_norm(x)
        scale, shift = self.input_affine()
        return x * scale + shift

    def input_affine(self) -> tuple[Tensor, Tensor]:
        bn = self.input_norm
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    def score_grouped(self, user: dict[str, Tensor], user_row: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Candidates of many users: `user` holds one row per user (from encode_user); `user_row` [R] says
        which of those rows each slot of g = B / R consecutive candidates belongs to (R = B: one candidate
        per slot), and the batch's profile keys hold one row per slot. The history is encoded once per
        user, not per candidate."""
        return self.score_candidates({k: v.index_select(0, user_row) for k, v in user.items()}, batch)

    def forward(
        self, batch: dict[str, Tensor], negatives: Tensor | None = None, log_q: Tensor | None = None
    ) -> dict[str, Tensor]:
        """CTR logits (and r, r_hat) for aligned rows: user side and candidate side in one call.
        Given negatives (training), also the auxiliary loss "aux", reusing the user side's projections."""
        user = self.encode_user(batch)
        out = self.score_candidates(user, batch)
        if negatives is not None and self.cfg.use_u2i:
            out["aux"] = self.aux_loss(user, batch, negatives, log_q)
        return out

    # ---- training -----------------------------------------------------------------------------------
    def aux_loss(self, user: dict[str, Tensor], batch: dict[str, Tensor], negatives: Tensor, log_q: Tensor) -> Tensor:
        """Auxiliary match loss (Eq. 6-9): u_{T-1} predicts the most recent behaviour's match id.

        u_{T-1} is the User-to-Item network over all but the most recent behaviour, positions renumbered
        so that the second most recent is position 0; it reuses the projections W_e e_t of `user`.
        negatives: [k] match-table indices shared by the batch; log_q: log sampling probability of every
        match-table row (the sampled-softmax correction). Rows with fewer than 2 behaviours (no previous
        state, or no next behaviour) contribute nothing.
        """
        e, proj = user["hist_emb"][:, :-1], user["u2i_proj"][:, :-1]
        T = e.shape[1]
        length = (batch["hist_len"] - 1).clamp_min(0)
        mask = torch.arange(T, device=e.device).unsqueeze(0) >= (T - length).unsqueeze(1)
        valid = (batch["hist_len"] >= 2).to(e.dtype)
        u_prev = self._user_vector(proj, e, mask)
        pos_id = batch[f"hist/{self.cfg.match_field}"][:, -1]
        pos_logit = (u_prev * self._v_out(pos_id)).sum(-1)
        neg_logit = u_prev @ self._v_out(negatives).T  # [B, k]
        if self.cfg.aux_loss == "sigmoid_ns":  # Eq. 8
            loss = -(F.logsigmoid(pos_logit) + F.logsigmoid(-neg_logit).sum(-1))
        else:  # sampled softmax with log-Q correction and accidental hits removed, as the authors' code
            hit = negatives.unsqueeze(0) == pos_id.unsqueeze(1)
            neg_logit = (neg_logit - log_q[negatives]).masked_fill(hit, -1e4)
            logits = torch.cat([(pos_logit - log_q[pos_id]).unsqueeze(1), neg_logit], dim=1)
            loss = F.cross_entropy(
                logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), reduction="none"
            )
        return (loss * valid).sum() / valid.sum().clamp_min(1.0)
