"""Data-parallel training over torch.distributed (NCCL on GPUs, gloo on CPU), started by torchrun.

Every rank reads the same global batch and takes its own contiguous slice of rows, so the ranks' rows at
a step are exactly the single-process batch: a run on N ranks follows the single-process run up to float
rounding, with nothing lost or seen twice.

Gradients are averaged here rather than by DistributedDataParallel's reducer: the embedding tables take
sparse gradients (the point of a vocabulary-independent step), which DDP's reducer cannot all-reduce on
NCCL and has mishandled on gloo (pytorch/pytorch#111422, #87497). So dense gradients go through one
all-reduce of a flat buffer, and each sparse table's gradient through an all-gather of its (index, row)
pairs, summed by coalescing. Both work on NCCL and gloo.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dmrx.errors import DmrxError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of n rows."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def broadcast(self, obj):
        """rank 0's value of obj, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Concatenate every rank's arrays (validation predictions), on every rank."""
        if not self.active:
            return arrays
        parts: list = [None] * self.world
        dist.all_gather_object(parts, arrays)
        return {k: np.concatenate([p[k] for p in parts]) for k in arrays}

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Average gradients over ranks; a parameter without a gradient on a rank counts as zero there."""
        if not self.active:
            return
        dense, sparse = [], []
        for m in model.modules():
            for p in m.parameters(recurse=False):
                (sparse if isinstance(m, torch.nn.Embedding) and m.sparse else dense).append(p)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in dense:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        for p in sparse:
            p.grad = self._sum_sparse(p)

    def _sum_sparse(self, p: torch.Tensor) -> torch.Tensor:
        d = p.shape[1]
        if p.grad is not None:
            g = p.grad.coalesce()
            idx, val = g.indices()[0], g.values()
        else:
            idx = torch.zeros(0, dtype=torch.long, device=p.device)
            val = torch.zeros(0, d, dtype=p.dtype, device=p.device)
        sizes = [torch.zeros(1, dtype=torch.long, device=p.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(idx)], device=p.device))
        most = int(max(s.item() for s in sizes))
        pad = most - len(idx)  # all_gather needs equal shapes
        idx_p = torch.cat([idx, idx.new_zeros(pad)])
        val_p = torch.cat([val, val.new_zeros(pad, d)])
        idxs = [torch.empty_like(idx_p) for _ in range(self.world)]
        vals = [torch.empty_like(val_p) for _ in range(self.world)]
        dist.all_gather(idxs, idx_p)
        dist.all_gather(vals, val_p)
        keep_i = torch.cat([i[: int(s.item())] for i, s in zip(idxs, sizes, strict=True)])
        keep_v = torch.cat([v[: int(s.item())] for v, s in zip(vals, sizes, strict=True)]) / self.world
        # the indices are rows of p by construction
        return torch.sparse_coo_tensor(keep_i.unsqueeze(0), keep_v, p.shape, check_invariants=False).coalesce()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); a no-op when absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        present = torch.cuda.device_count()
        if local >= present:
            raise DmrxError(
                f"torchrun LOCAL_RANK={local} but this machine has {present} CUDA device(s): start at most "
                f"{present} process(es) per node (--nproc-per-node), or train on the CPU with --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # torch.distributed.nn.functional binds the default group into its functions' default arguments when
    # first imported, and torch imports it lazily (with torch._dynamo, at the first optimizer step).
    # Imported after init_process_group, it keeps the group and its gloo threads alive past
    # destroy_process_group; tearing them down with the interpreter now and then aborts a finished run.
    importlib.import_module("torch.distributed.nn.functional")

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)
