"""The torch scoring backend: DMR's user side once per distinct history, the candidate side per candidate.

`model.score_grouped` is the reference: it gathers every user-side tensor to every candidate
([B, T, d_e] and [B, T, hidden] copies) and runs the I2I attention over those copies. At ~20 candidates per
user that gather, and intermediates far larger than the CPU caches, cost ten times the arithmetic. The
grouped path here computes the same function from the same weights, rearranged:

- Candidates are laid out per user in slots of g ("virtual users": a user with n candidates takes
  ceil(n / g) rows of g slots), so the attention is a broadcast add of one user's keys [T, h] to its
  candidates' queries [g, h], a tanh, a matrix-vector product with z, and one bmm of the attention weights
  with the user's behaviours [T, d_e]: no per-candidate copy of the history. It runs in blocks sized to
  stay in cache.
- The first MLP layer splits by input block: the profile block (profile fields and user id) is constant
  for a user's run of candidates, so W1_p x_p is computed once per run of identical profile values and
  added as a bias; only the target-dependent rest goes through the per-candidate GEMM.
- On CPU in fp32 the attention itself runs in a fused C kernel (dmrx.scoring.kernel: one loop per candidate,
  no [T, h] intermediate) when a C compiler is available, else in torch ops as above.
- int8 (CPU): the MLP's linear layers run as dynamically quantised int8 GEMMs (fbgemm/oneDNN, VNNI where
  the CPU has it); the attention stays fp32.

The grouped path covers the additive attention of the paper (the default); other configurations (the DIN
scorer) take `model.score_grouped` in candidate blocks. At construction the grouped path is checked
against `model.score_grouped` on a random batch and falls back to it if they disagree (it never should).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmrx.errors import DmrxError
from dmrx.models.device import pick_device
from dmrx.models.dmr import DMR, masked_softmax
from dmrx.scoring.cores import available_cores

CHECK_TOL = 2e-4  # fp32 logits, grouped vs reference: reassociated sums differ by rounding only


def _quantize_int8(module: nn.Module) -> nn.Module:
    """Linear layers as dynamically quantised int8 (weights per tensor, activations per batch)."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "onednn"):
        if engine in engines:
            torch.backends.quantized.engine = engine
            break
    else:
        raise DmrxError(f"torch int8: no x86 quantized engine in this torch build (have {engines})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def _runs(cols: Tensor) -> tuple[Tensor, Tensor]:
    """Runs of identical consecutive rows of cols [B, k]: (first row of each run [R], run of each row [B])."""
    B = cols.shape[0]
    change = torch.ones(B, dtype=torch.bool, device=cols.device)
    if B > 1:
        change[1:] = (cols[1:] != cols[:-1]).any(dim=1)
    return torch.nonzero(change).squeeze(1), torch.cumsum(change.long(), 0) - 1


class GroupedCandidates(nn.Module):
    """DMR's candidate side (additive attention) over users encoded once: see the module docstring."""

    def __init__(self, model: DMR, int8: bool = False, block_elems: int = 1 << 18, kernel: bool = False):
        super().__init__()
        self.kernel = kernel  # the fused C kernel (dmrx.scoring.kernel) for the I2I attention on CPU fp32
        self.mlp_rows = 1024  # CPU row block of the MLP: [1024, 512] fp32 activations are 2 MiB (L2)
        cfg, spec = model.cfg, model.spec
        if cfg.attention != "additive":
            raise ValueError("the grouped path implements the additive attention only")
        self.model = model
        self.block_elems = block_elems  # floats per attention block (1 MiB in fp32: L2-sized)
        self.prof_keys = list(spec.profile_keys())
        self.target_keys = [f"target/{f}" for f in spec.target]
        self.ctx_keys = [f"context/{f}" for f in spec.context]
        self.dense_keys = [f"dense/{f}" for f in spec.dense]
        self.use_i2i, self.use_u2i = cfg.use_i2i, cfg.use_u2i
        self.use_r_hat = bool(getattr(cfg, "use_r_hat", True))
        self.target_product = cfg.target_product
        first: nn.Linear = model.mlp[0]
        tables = model.tables
        d_p = sum(tables[model.table_of[k]].embedding_dim for k in self.prof_keys)
        self.d_p = d_p
        w, b = first.weight.detach(), first.bias.detach()
        # The MLP input's batch norm is a per-column affine x * scale + shift. In float it folds into the
        # first layer (no extra pass); INT8 applies it to the activations, whose columns it brings to one
        # scale, and keeps the weights as trained.
        self.norm = self.norm_p = None
        if model.input_norm is not None:
            scale, shift = (a.detach() for a in model.input_affine())
            if int8:
                self.norm, self.norm_p = (scale[d_p:], shift[d_p:]), (scale[:d_p], shift[:d_p]) if d_p else None
            else:
                w, b = w * scale, b + w @ shift
        with torch.no_grad():
            rest = nn.Linear(w.shape[1] - d_p, w.shape[0]).to(w.device, w.dtype)
            rest.weight.copy_(w[:, d_p:])
            rest.bias.copy_(b)
        self.register_buffer("w1_p", w[:, :d_p].t().contiguous(), persistent=False)
        self.first = rest
        # the tail as (linear, PReLU slope) pairs: F.prelu on [B, C] is the model's last-axis PReLU, in one
        # pass instead of torch.where's three
        mods = list(model.mlp)[1:]
        self.slopes = [m.weight.detach() if not isinstance(m, nn.Linear) else None for m in mods]
        self.tail = nn.ModuleList([copy.deepcopy(m) for m in mods if isinstance(m, nn.Linear)])
        self.first_slope = self.slopes[0]
        self.tail_slopes = [w for w in self.slopes[1:] if w is not None] + [None]
        if self.first_slope is None or len(self.tail_slopes) != len(self.tail):
            raise ValueError("unexpected MLP layout (want Linear, PReLU, ..., Linear)")
        self.int8 = int8
        if int8:
            self.first = _quantize_int8(self.first)
            self.tail = _quantize_int8(self.tail)

    # -- pieces ----------------------------------------------------------------------------------------
    def _embed(self, cand: dict[str, Tensor], keys: list[str]) -> Tensor:
        return self.model._embed(cand, keys)

    def _layout(self, user_row: Tensor, U: int) -> tuple[int, Tensor, Tensor]:
        """Slots of g per virtual user: (g, user of each virtual row [V], slot of each candidate [B])."""
        B = user_row.shape[0]
        counts = torch.bincount(user_row, minlength=U)
        present = int((counts > 0).sum())
        mean = B / max(present, 1)
        g = max(1, math.ceil(mean / math.ceil(mean / 16)))  # <= 16, and ~no padding at the mean
        nv = (counts + g - 1) // g
        vstart = torch.cumsum(nv, 0) - nv
        cstart = torch.cumsum(counts, 0) - counts
        order = torch.argsort(user_row, stable=True)
        rs = user_row[order]
        p = torch.arange(B, device=user_row.device) - cstart[rs]
        slot = torch.empty_like(user_row)
        slot[order] = (vstart[rs] + p // g) * g + p % g
        vuser = torch.repeat_interleave(torch.arange(U, device=user_row.device), nv)
        return g, vuser, slot

    def _i2i(self, user: dict[str, Tensor], user_row: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """u_hat [B, d_e] and r_hat [B] of the I2I network."""
        att = self.model.att_i2i
        keys, e, mask = user["i2i_keys"], user["hist_emb"], user["mask"]
        U, T, H = keys.shape
        B = x_t.shape[0]
        q = att.w_q(x_t) if att.w_q is not None else x_t.new_zeros(B, H)
        z = att.z.weight.reshape(H, 1)
        if self.kernel and not keys.is_cuda and keys.dtype == torch.float32:
            from dmrx.scoring import kernel as score_kernel

            return score_kernel.i2i(keys, e, mask, q, z, user_row)
        g, vuser, slot = self._layout(user_row, U)
        V = vuser.shape[0]
        q_pad = q.new_zeros(V * g, H)
        q_pad[slot] = q
        q_pad = q_pad.view(V, g, H)
        uh = e.new_empty(V, g, e.shape[2])
        rh = e.new_empty(V, g)
        step = V if e.is_cuda else max(1, self.block_elems // (g * T * H))
        buf = keys.new_empty(min(step, V), g, T, H)
        for s in range(0, V, step):
            vu = vuser[s : s + step]
            n = vu.shape[0]
            h = torch.add(keys.index_select(0, vu).unsqueeze(1), q_pad[s : s + n].unsqueeze(2), out=buf[:n])
            h.tanh_()
            a = torch.mm(h.view(-1, H), z).view(n, g, T)
            m = mask.index_select(0, vu).unsqueeze(1)  # [n, 1, T]
            rh[s : s + n] = (a * m).sum(dim=-1)
            alpha = masked_softmax(a, m > 0)
            torch.bmm(alpha, e.index_select(0, vu), out=uh[s : s + n])
        return uh.view(V * g, -1)[slot], rh.view(V * g)[slot]

    def forward(self, user: dict[str, Tensor], user_row: Tensor, cand: dict[str, Tensor]) -> Tensor:
        """Logits [B] of candidates `cand` whose users are rows `user_row` of `user`."""
        model = self.model
        x_t = self._embed(cand, self.target_keys)
        parts = [x_t]
        if self.ctx_keys:
            parts.append(self._embed(cand, self.ctx_keys))
        if self.dense_keys:
            parts.append(torch.stack([cand[k] for k in self.dense_keys], dim=-1).to(x_t.dtype))
        if self.use_i2i:
            u_hat, r_hat = self._i2i(user, user_row, x_t)
            parts += [u_hat, r_hat.unsqueeze(-1)] if self.use_r_hat else [u_hat]
            if self.target_product:
                parts.append(model.match_product(u_hat, x_t))
        if self.use_u2i:
            v = model._v_out(cand[f"target/{model.cfg.match_field}"])
            parts.append((user["u"].index_select(0, user_row) * v).sum(dim=-1, keepdim=True))
        x = torch.cat(parts, dim=-1)
        if self.norm is not None:
            x = torch.addcmul(self.norm[1], x, self.norm[0])
        prof = None
        if self.d_p:
            first, row = _runs(torch.stack([cand[k] for k in self.prof_keys], dim=1))
            x_p = self._embed({k: cand[k].index_select(0, first) for k in self.prof_keys}, self.prof_keys)
            if self.norm_p is not None:
                x_p = torch.addcmul(self.norm_p[1], x_p, self.norm_p[0])
            prof = (x_p @ self.w1_p if self.int8 else torch.addmm(self.first.bias, x_p, self.w1_p), row)
        # the MLP in row blocks: a block's activations stay in cache from one layer to the next
        step = x.shape[0] if x.is_cuda else self.mlp_rows
        return torch.cat([self._mlp(x[s : s + step], prof, s) for s in range(0, x.shape[0], step)])

    def _mlp(self, x: Tensor, prof: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        if prof is None:
            pre = self.first(x)
        else:
            p, row = prof
            bias = p.index_select(0, row[start : start + x.shape[0]])
            if self.int8:
                pre = self.first(x).add_(bias)
            else:
                pre = bias.addmm_(x, self.first.weight.t())  # in place: no second [rows, h1] buffer
        h = F.prelu(pre, self.first_slope)
        for lin, slope in zip(self.tail, self.tail_slopes, strict=False):
            h = lin(h)
            if slope is not None:
                h = F.prelu(h, slope)
        return h.squeeze(-1)


def fold_input_norm(model: DMR) -> DMR:
    """A copy of the model with the MLP input's batch norm (eval: a per-column affine) folded into the
    first linear layer, computed in the model's own precision: fold an fp32 model, then cast the copy to
    fp16/bf16. Folded after the cast, the product columns' running variance (about 1e-6) would be a
    subnormal fp16 number, their scale (about 300) computed from a few bits."""
    model = copy.deepcopy(model)
    if model.input_norm is None:
        return model
    first: nn.Linear = model.mlp[0]
    with torch.no_grad():
        scale, shift = model.input_affine()
        first.bias.add_(first.weight @ shift)
        first.weight.mul_(scale)
    model.input_norm = None
    return model


class TorchBackend:
    """Scores prepared batches (see dmrx.scoring.scorer.Work) with the run's torch model."""

    name = "torch"

    def __init__(
        self,
        bundle,
        precision: str = "fp32",
        device: str | None = None,
        threads: int | None = None,
        grouped: bool = True,
        kernel: bool = True,
    ):
        kernel_ok = kernel
        self.kernel_note: str | None = None
        self.device = pick_device(device)
        self.precision = precision
        cuda = self.device.type == "cuda"
        if precision in ("fp16", "bf16") and not cuda:
            raise DmrxError(
                f"--backend torch --precision {precision} needs a CUDA GPU (on CPU torch scores "
                "fp32 or int8; onnxruntime runs the exported FP16 graphs)"
            )
        if precision == "int8" and cuda:
            raise DmrxError(
                "--backend torch --precision int8 runs on CPU only (dynamic int8 GEMMs); on a GPU "
                "use --backend tensorrt with the exported INT8 engines"
            )
        if precision not in ("fp32", "fp16", "bf16", "int8"):
            raise DmrxError(f"--precision must be fp32, fp16, bf16 or int8, got {precision!r}")
        # CPU parallelism: `threads` workers each score whole batches with one torch thread. No OpenMP
        # barrier per op (on a busy machine a descheduled team member stalls every op of the others), and
        # a batch's bytes do not depend on the thread count.
        self.workers = 1
        if not cuda:
            self.workers = int(threads or available_cores())
            torch.set_num_threads(1)
        self.threads = self.workers
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        model = bundle.model
        if cuda or self.dtype != torch.float32:
            model = fold_input_norm(model).to(self.device, self.dtype)
        self.model = model.eval()
        self.max_len = model.cfg.max_len
        self.grouped: GroupedCandidates | None = None
        self.path = "score_grouped (reference, candidate blocks)"
        # a baseline (dmrx train --arch lr, din, ...) has no user/candidate split: its forward, per row
        self.per_row = model.cfg.model != "dmr"
        if self.per_row:
            self.path = "forward per row (baseline)"
        elif grouped and model.cfg.attention == "additive":
            fast = GroupedCandidates(model).eval()
            if self._agrees(fast):
                kernel = False
                if kernel_ok and not cuda:
                    from dmrx.scoring import kernel as score_kernel

                    if score_kernel.load() is not None:
                        fast.kernel = True
                        fast.kernel = kernel = self._agrees(fast)
                        if not kernel:
                            warnings.warn(
                                "dmrx score: the fused I2I kernel disagrees with torch on a check "
                                "batch; using torch ops",
                                RuntimeWarning,
                                stacklevel=2,
                            )
                    self.kernel_note = score_kernel.reason
                if precision == "int8":
                    fast = GroupedCandidates(model, int8=True, kernel=kernel).eval()
                self.grouped = fast
                self.path = ("grouped, fused C attention kernel" if kernel else "grouped, torch attention") + (
                    ", int8 MLP" if precision == "int8" else ""
                )
            else:
                warnings.warn(
                    "dmrx score: the grouped torch path disagrees with model.score_grouped on a "
                    "check batch; using the reference path",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self.grouped is None and precision == "int8":
            self.model = copy.deepcopy(self.model)
            self.model.mlp = _quantize_int8(self.model.mlp)

    # -- helpers ---------------------------------------------------------------------------------------
    def _tensor(self, x: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device, non_blocking=True)

    def _reference(
        self, user: dict[str, Tensor], user_row: Tensor, cand: dict[str, Tensor], block: int = 2048
    ) -> Tensor:
        outs = []
        for s in range(0, user_row.shape[0], block):
            sl = slice(s, s + block)
            outs.append(self.model.score_grouped(user, user_row[sl], {k: v[sl] for k, v in cand.items()})["logit"])
        return torch.cat(outs) if outs else user_row.new_zeros(0, dtype=self.dtype)

    @torch.inference_mode()
    def _agrees(self, fast: GroupedCandidates) -> bool:
        """The grouped path against model.score_grouped on a random batch of a few users."""
        model = self.model
        gen = torch.Generator().manual_seed(0)
        U, B, T = 5, 23, model.cfg.max_len
        sizes = {k: model.tables[model.table_of[k]].num_embeddings for k in model.table_of}

        def ids(key: str, shape) -> Tensor:
            return torch.randint(0, sizes[key], shape, generator=gen).to(self.device)

        hist = {f"hist/{f}": ids(f"hist/{f}", (U, T)) for f in model.spec.behaviors}
        hist["hist_len"] = torch.tensor([0, 1, T // 2, T, 3])[:U].to(self.device)
        cand = {k: ids(k, (B,)) for k in fast.target_keys + fast.ctx_keys + fast.prof_keys}
        for k in fast.dense_keys:
            cand[k] = torch.randn(B, generator=gen).to(self.device, self.dtype)
        user_row = torch.randint(0, U, (B,), generator=gen).to(self.device)
        user = model.encode_user(hist)
        ref = self._reference(user, user_row, cand).float()
        got = fast(user, user_row, cand).float()
        tol = CHECK_TOL if self.dtype == torch.float32 else 5e-2
        return bool(torch.allclose(got, ref, atol=tol, rtol=tol))

    # -- scoring ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, work) -> Tensor:
        hist = {k: self._tensor(v) for k, v in work.hist.items()}
        hist["hist_len"] = self._tensor(work.hist_len)
        if self.per_row:
            user_row = self._tensor(work.user_row)
            batch = {k: v[user_row] for k, v in hist.items()}
            batch.update({k: self._tensor(v) for k, v in work.cand.items()})
            return self.model(batch)["logit"]
        user = self.model.encode_user(hist)
        user_row = self._tensor(work.user_row)
        cand = {k: self._tensor(v) for k, v in work.cand.items()}
        if self.grouped is not None:
            return self.grouped(user, user_row, cand)
        return self._reference(user, user_row, cand)

    def score(self, work) -> np.ndarray:
        """CTRs (float32 [B]) of a prepared batch."""
        if len(work.user_row) == 0:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            return torch.sigmoid(self.logits(work).float()).cpu().numpy()

    def describe(self) -> dict:
        d = {"backend": "torch", "precision": self.precision, "device": str(self.device), "path": self.path}
        if self.kernel_note:
            d["kernel"] = self.kernel_note
        if self.device.type == "cpu":
            d["threads"] = self.threads
        else:
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d
