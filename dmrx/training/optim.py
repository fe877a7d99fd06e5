"""Lazy Adam for sparse embedding gradients: a step touches only the rows its batch looked up.

Same update as torch.optim.SparseAdam, which we would rather use, but on CPU its step costs 40-70 ms for
one table at batch 256 x T=50 (10k to 1M rows) and grows with the table, while the same arithmetic
through index_select/index_copy_ costs about 1 ms and does not grow (tests/test_optim.py checks the two
agree; benchmarks/train_speed.py shows the step time).

On the CPU a gradient's repeated rows are summed by `coalesce()`. On CUDA coalesce's output size depends
on the data, so the host would wait for the device once per table per step; there `_merge_rows_sync_free`
sums them with shapes that depend only on the number of gradient entries. On the CPU that form measured
2-3x slower than coalesce, so the CPU keeps coalesce.
"""

from __future__ import annotations

import torch


def _merge_rows_sync_free(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, values) of an uncoalesced sparse gradient with each entry's values replaced by the sum over
    every entry of its row. Repeated rows stay repeated, with identical values."""
    rows, values = grad._indices()[0], grad._values()
    rows, order = torch.sort(rows)
    values = values.index_select(0, order)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    run_id = first.cumsum(0) - 1
    sums = torch.zeros_like(values).index_add_(0, run_id, values)
    return rows, sums.index_select(0, run_id)


class LazyAdam(torch.optim.Optimizer):
    """`sync_free`: merge repeated rows with `_merge_rows_sync_free` rather than coalesce; None means
    on CUDA parameters only."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        sync_free: bool | None = None,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        # an attribute, not a group default: how rows are merged is no part of the state a checkpoint keeps
        self.sync_free = sync_free

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam takes sparse gradients; use Adam for dense parameters")
                sync_free = p.is_cuda if self.sync_free is None else self.sync_free
                if sync_free:
                    rows, values = _merge_rows_sync_free(p.grad)
                else:
                    grad = p.grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    # on the CPU even for a CUDA parameter, so reading it does not wait for the device
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
                update = m.div_(v.sqrt_().add_(group["eps"]))
                if sync_free:
                    # rows repeat here; index_add_ would apply a repeated row's update once per copy, while
                    # index_copy_ writes identical values for every copy
                    p.index_copy_(0, rows, p.index_select(0, rows).add_(update, alpha=-step_size))
                else:
                    p.index_add_(0, rows, update, alpha=-step_size)
